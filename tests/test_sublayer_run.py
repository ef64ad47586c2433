"""``--space sublayers`` end to end: run directory, kill -9 / resume, bad input, export on every family, reload."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from evoprune import load_model
from tests.conftest import FAMILIES, TINY_VOCAB
from tests.test_run import _cmd, _env, _history, _kill_resume


def _args(model, calib, out, method="evo", extra=()):
    return ["search", "--model", str(model), "--space", "sublayers", "--method", method, "--sparsity", "0.25",
            "--calib", f"text:{calib}", "--sampling", "random", "--nsamples", "3", "--seqlen", "48", "--seed", "3",
            "--out", str(out), *extra]


_STAGED = ["--generations", "4", "--offspring", "8", "--tokens-per-stage", "40,144", "--survivors-per-stage", "3,2",
           "--cache-mb", "1"]


def test_sublayer_run_result_history_and_reload(deep_model, calib_text, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(_cmd(*_args(deep_model, calib_text, run, extra=_STAGED)), env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["space"] == "sublayers" and res["n_layers"] == 12 and abs(res["sparsity"] - 0.25) <= 0.0334
    assert res["k"] == len(res["dropped_attention"]) + len(res["dropped_mlp"])
    assert res["dropped_layers"] == sorted(set(res["dropped_attention"]) & set(res["dropped_mlp"]))
    rows = [json.loads(x) for x in _history(run).splitlines()]
    assert {x["stage"] for x in rows} == {0, 1} and all(x["feasible"] for x in rows)
    full = [x for x in rows if x["stage"] == 1]
    assert min(x["loss"] for x in full) == res["calib_loss"]
    # it started from the block search at the same budget (3 of 12 blocks), run first in RUN/blocks and counted
    blocks = json.loads((run / "blocks" / "result.json").read_text())
    assert blocks["space"] == "layers" and blocks["k"] == 3 and res["start"]["dropped_layers"] == blocks["dropped_layers"]
    assert rows[0]["dropped_attention"] == rows[0]["dropped_mlp"] == blocks["dropped_layers"]
    start_full = [x["loss"] for x in full if x["dropped_attention"] == x["dropped_mlp"] == blocks["dropped_layers"]]
    assert start_full[0] == pytest.approx(blocks["calib_loss"], rel=1e-5) and res["calib_loss"] <= start_full[0]
    assert rows[0]["token_layers"] > blocks["token_layers"] and res["token_layers"] <= 2 * blocks["token_layers"] + max(
        x["eval_token_layers"] for x in rows)
    assert all(b["token_layers"] == a["token_layers"] + b["eval_token_layers"] for a, b in zip(rows, rows[1:]))
    # the run directory is a model spec: the pruned model's loss on the run's calibration set is the search's
    from evoprune.data.calibration import CalibSet
    from evoprune.fitness import NLLEvaluator
    from evoprune.spaces import DropPattern

    lm = load_model(str(run), progress=False)
    loss = NLLEvaluator(lm, CalibSet.load(run / "calib.pt"), prefix_cache=False).evaluate(
        DropPattern(lm.n_layers, ())).loss
    assert loss == pytest.approx(res["calib_loss"], rel=1e-6)
    rep = subprocess.run(_cmd("report", str(run)), env=_env(), capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    md = (run / "report.md").read_text()
    assert "dropped attention" in md and (run / "pattern.png").stat().st_size > 10_000


@pytest.mark.parametrize("kill_after", [[4], [10, 25]])
def test_sublayer_kill_and_resume_equals_uninterrupted(deep_model, calib_text, tmp_path, kill_after):
    """Two fidelity stages and the shared-prefix LRU, KL fitness: kill -9 / resume == uninterrupted."""
    extra = [*_STAGED, "--fitness", "kl"]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(*_args(deep_model, calib_text, ref, extra=extra)), env=_env(), check=True,
                   capture_output=True, timeout=600)
    run = tmp_path / "run"
    _kill_resume(_args(deep_model, calib_text, run, extra=extra), run, kill_after)
    assert _history(run) == _history(ref)
    a, b = (json.loads((d / "result.json").read_text()) for d in (ref, run))
    assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}


def test_greedy_and_budget_stop(tiny_dirs, calib_text, tmp_path):
    run = tmp_path / "g"
    r = subprocess.run(_cmd(*_args(tiny_dirs["llama"], calib_text, run, method="greedy", extra=["--sparsity", "0.2"])),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in _history(run).splitlines()]
    res = json.loads((run / "result.json").read_text())
    assert rows[-1]["feasible"] and not rows[0]["feasible"] and res["calib_loss"] == min(
        x["loss"] for x in rows if x["feasible"])
    stop = tmp_path / "b"
    r = subprocess.run(_cmd(*_args(tiny_dirs["llama"], calib_text, stop, extra=["--budget-token-layers", "3000"])),
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((stop / "result.json").read_text())
    assert res["stopped_early"] and res["evaluations"] < 20 * 16


def test_sublayer_bad_input_is_one_line(tiny_dirs, calib_text, tmp_path):
    base = ["search", "--model", str(tiny_dirs["llama"]), "--space", "sublayers", "--calib", f"text:{calib_text}",
            "--sampling", "random", "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "x")]
    for extra, msg in [(["--sparsity", "0.999"], "no sub-layer pattern removes 99.9%"),
                       (["--sparsity", "1.5"], "--sparsity must be in (0, 1)"),
                       (["--drop-count", "12"], "cannot drop 12 sub-layers"),
                       (["--method", "sleb", "--drop-count", "2"], "unknown method 'sleb' for --space sublayers")]:
        r = subprocess.run(_cmd(*base, *extra), env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)
        assert not (tmp_path / "x" / "history.jsonl").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_sublayer_export_reloads_with_equal_logits(tiny_dirs, family, tmp_path):
    """A mixed pattern (whole block, attention-free and MLP-free blocks) in the remote-code format; whole blocks
    only as plain HF. Reloaded in a fresh interpreter that never imports evoprune."""
    from evoprune.export import export_sublayers

    lm = load_model(str(tiny_dirs[family]), progress=False)
    ids = torch.randint(0, TINY_VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    attention, mlp = (1, 2, 4), (2, 3)
    with torch.no_grad(), lm.adapter.skipped(lm.model, attention, mlp):
        want = lm.model(input_ids=ids, use_cache=False).logits[0, -1]
    rec = export_sublayers(lm, attention, mlp, tmp_path / "mixed")
    assert rec["max_abs_diff"] <= 1e-5 and rec["skipped_max_abs_diff"] <= 1e-5 and rec["dropped_layers"] == [2]
    assert rec["params"] < rec["params_dense"]
    code = ("import sys, json, torch; from transformers import AutoModelForCausalLM as A; "
            "m = A.from_pretrained(sys.argv[1], trust_remote_code=True).eval(); ids = torch.tensor([json.loads(sys.argv[2])]); "
            "print(json.dumps(m(input_ids=ids).logits[0, -1].tolist())); assert 'evoprune' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "mixed"), json.dumps(ids[0].tolist())],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (torch.tensor(json.loads(r.stdout)) - want).abs().max() <= 1e-5
    plain = export_sublayers(lm, (1, 3), (1, 3), tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "auto_map" not in cfg and cfg["num_hidden_layers"] == 4 and plain["max_abs_diff"] <= 1e-5
