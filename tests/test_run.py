"""Run directories: results, history, bad input, and kill -9 / resume equivalence."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _cmd(*args):
    return [sys.executable, "-m", "evoprune.cli", *args]


def _env(delay=0.0):
    return {**os.environ, "EVOPRUNE_NO_PROGRESS": "1", "EVOPRUNE_EVAL_DELAY_S": str(delay)}


def _search_args(model, calib, out, method="evop", extra=()):
    return ["search", "--model", str(model), "--method", method, "--drop-count", "2", "--calib", f"text:{calib}",
            "--sampling", "random", "--nsamples", "3", "--seqlen", "48", "--seed", "3", "--population", "8",
            "--generations", "5", "--out", str(out), *extra]


def _history(run):
    return (Path(run) / "history.jsonl").read_text()


def test_search_writes_run(tiny_dirs, calib_text, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(_cmd(*_search_args(tiny_dirs["llama"], calib_text, run)), env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "result.json").read_text())
    assert json.loads(r.stdout.strip().splitlines()[-1]) == res
    assert {"method", "model", "sparsity", "n_layers", "dropped_layers", "calib_loss", "calib_ppl", "evaluations",
            "token_layers", "wall_s", "seed"} <= set(res)
    rows = [json.loads(l) for l in _history(run).splitlines()]
    assert len(rows) == res["evaluations"] and len(res["dropped_layers"]) == 2
    assert min(r["loss"] for r in rows) == res["calib_loss"]
    assert rows[-1]["token_layers"] == res["token_layers"]
    assert all(b["token_layers"] == a["token_layers"] + b["eval_token_layers"] for a, b in zip(rows, rows[1:]))
    dense = 3 * 48 * 6  # the prefix cache: one dense forward over 3 x 48 tokens, 6 blocks
    assert rows[0]["token_layers"] == dense + rows[0]["eval_token_layers"]
    # a candidate runs only its kept blocks from its first dropped block on, or from a deeper state the default
    # shared-prefix LRU kept (a candidate's first evaluation without any earlier one: exactly that)
    naive = [3 * 48 * sum(1 for i in range(r["dropped"][0], 6) if i not in r["dropped"]) for r in rows]
    assert rows[0]["eval_token_layers"] == naive[0]
    assert all(r["eval_token_layers"] <= n for r, n in zip(rows, naive))
    assert sum(r["eval_token_layers"] for r in rows) < sum(naive)
    # a run directory is a model spec: ppl and export use its best pattern
    out = tmp_path / "exp"
    r = subprocess.run(_cmd("export", str(run), "--out", str(out)), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "pruning.json").read_text())["dropped_layers"] == res["dropped_layers"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


@pytest.mark.parametrize("kill_after", [[0], [3], [9, 20]])
def test_kill_and_resume_equals_uninterrupted(deep_model, calib_text, tmp_path, kill_after):
    ref = tmp_path / "ref"
    args = _search_args(deep_model, calib_text, ref)
    args[args.index("--drop-count") + 1] = "4"
    args[args.index("--generations") + 1] = "10"
    subprocess.run(_cmd(*args), env=_env(), check=True, capture_output=True, timeout=300)
    assert json.loads((ref / "result.json").read_text())["evaluations"] > 25
    run = tmp_path / "killed"
    args[args.index("--out") + 1] = str(run)
    _kill_resume(args, run, kill_after)
    a, b = json.loads((ref / "result.json").read_text()), json.loads((run / "result.json").read_text())
    for key in ("dropped_layers", "calib_loss", "evaluations", "token_layers"):
        assert a[key] == b[key], key
    assert _history(ref) == _history(run)


@pytest.mark.parametrize("extra,needle", [
    (["--sparsity", "1.5"], "sparsity must be in (0, 1)"),
    (["--method", "nosuch"], "unknown method"),
])
def test_bad_search_input(tiny_dirs, calib_text, tmp_path, extra, needle):
    args = _search_args(tiny_dirs["llama"], calib_text, tmp_path / "r")
    args = [a for a in args if a not in ("--drop-count", "2")] if "--sparsity" in extra else args
    if "--method" in extra:
        i = args.index("--method")
        del args[i:i + 2]
    r = subprocess.run(_cmd(*args, *extra), env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


def test_bad_k_and_calib(tiny_dirs, calib_text, tmp_path):
    args = _search_args(tiny_dirs["llama"], calib_text, tmp_path / "r")
    i = args.index("--drop-count")
    args[i + 1] = "6"
    r = subprocess.run(_cmd(*args), env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "cannot drop 6 of 6" in r.stderr, r.stderr
    short = tmp_path / "short.txt"
    short.write_text("too short")
    args = _search_args(tiny_dirs["llama"], short, tmp_path / "r2")
    r = subprocess.run(_cmd(*args), env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "calibration" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_resume_bad_dirs_left_intact(tiny_dirs, calib_text, tmp_path):
    notrun = tmp_path / "notrun"
    notrun.mkdir()
    (notrun / "x.txt").write_text("keep")
    r = subprocess.run(_cmd("resume", str(notrun)), env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "not an evoprune run" in r.stderr
    assert [p.name for p in notrun.iterdir()] == ["x.txt"]
    run = tmp_path / "run"
    subprocess.run(_cmd(*_search_args(tiny_dirs["llama"], calib_text, run)), env=_env(), check=True,
                   capture_output=True)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    # same --out with different arguments
    args = _search_args(tiny_dirs["llama"], calib_text, run, extra=["--mutation-rate", "0.2"])
    r = subprocess.run(_cmd(*args), env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "different arguments" in r.stderr and "mutation_rate" in r.stderr
    # corrupted state
    (run / "result.json").unlink()
    (run / "state").write_text("{not json")
    r = subprocess.run(_cmd("resume", str(run)), env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "corrupted state" in r.stderr, r.stderr
    assert (run / "state").read_text() == "{not json"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name not in ("state", "result.json")} == \
        {k: v for k, v in before.items() if k not in ("state", "result.json")}


def test_ccds_search_and_calib_reuse(tiny_dirs, tmp_path):
    """A CCDS-calibrated search (real MiniLM encoder) saves its sample set; --calib-from reuses it exactly."""
    topics = ["The river flows past the old mill and the water is cold.",
              "Stock prices fell sharply as the market reacted to rates.",
              "The team scored twice in the second half to win the cup."]
    text = tmp_path / "topics.txt"
    text.write_text("\n".join(topics[i % 3] for i in range(120)))
    run = tmp_path / "ccds"
    args = ["search", "--model", str(tiny_dirs["qwen2"]), "--method", "evop", "--drop-count", "2", "--calib",
            f"text:{text}", "--sampling", "ccds", "--clusters", "3", "--samples-per-cluster", "2",
            "--chunk-sentences", "4", "--seqlen", "32", "--population", "6", "--generations", "2", "--out", str(run)]
    r = subprocess.run(_cmd(*args), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from evoprune.data.calibration import CalibSet

    calib = CalibSet.load(run / "calib.pt")
    assert calib.input_ids.shape == (6, 32) and sorted(calib.cluster_ids) == [0, 0, 1, 1, 2, 2]
    run2 = tmp_path / "reuse"
    args2 = args[:args.index("--population")] + ["--method", "sleb", "--calib-from", str(run), "--out", str(run2)]
    del args2[args2.index("--method"):args2.index("--method") + 2]
    r = subprocess.run(_cmd(*args2), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert CalibSet.load(run2 / "calib.pt") == calib
    assert json.loads((run2 / "result.json").read_text())["method"] == "sleb"


def _kill_resume(args, run, kill_after):
    for i, n in enumerate(kill_after):
        cmd = _cmd(*args) if i == 0 else _cmd("resume", str(run))
        p = subprocess.Popen(cmd, env=_env(0.05), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            h = run / "history.jsonl"
            lines = h.read_text().count("\n") if h.exists() else 0
            if (n == 0 and (run / "config.json").exists()) or (n > 0 and lines >= n):
                break
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert not (run / "result.json").exists()
    r = subprocess.run(_cmd("resume", str(run)), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


_EVO_ARGS = ["--offspring", "8", "--tokens-per-stage", "40,144", "--survivors-per-stage", "3,2", "--cache-mb", "1"]


@pytest.mark.parametrize("kill_after", [[5], [13, 30]])
def test_evo_multifidelity_kill_and_resume(deep_model, calib_text, tmp_path, kill_after):
    """evo with two fidelity stages and the shared-prefix LRU: kill -9 / resume == uninterrupted."""
    ref = tmp_path / "ref"
    args = _search_args(deep_model, calib_text, ref, method="evo", extra=_EVO_ARGS)
    del args[args.index("--population"):args.index("--population") + 2]  # evop-only
    args[args.index("--drop-count") + 1] = "4"
    subprocess.run(_cmd(*args), env=_env(), check=True, capture_output=True, timeout=300)
    a = json.loads((ref / "result.json").read_text())
    rows = [json.loads(l) for l in _history(ref).splitlines()]
    assert a["evaluations"] == len(rows) > 35
    done = [r for r in rows if not r.get("raced")]  # raced rows hold partial scores (fewer tokens)
    assert {r["stage"] for r in rows} == {0, 1} and {r["tokens"] for r in done} == {39, 3 * 47}
    full = [r for r in rows if r["stage"] == 1]
    # (the greedy phase's promoted patterns with fewer than k blocks are full-stage rows too)
    assert a["calib_loss"] == min(r["loss"] for r in full if not r.get("raced") and len(r["dropped"]) == 4)
    assert len({(r["pattern"], r["stage"]) for r in rows}) == len(rows)  # nothing evaluated twice
    # the LRU saved work: some candidates ran fewer blocks than from their first dropped block
    naive_from_f = [3 * 48 * sum(1 for i in range(r["dropped"][0], 12) if i not in r["dropped"]) for r in full]
    assert sum(r["eval_token_layers"] for r in full) < sum(naive_from_f)
    run = tmp_path / "killed"
    args[args.index("--out") + 1] = str(run)
    _kill_resume(args, run, kill_after)
    b = json.loads((run / "result.json").read_text())
    for key in ("dropped_layers", "calib_loss", "evaluations", "token_layers"):
        assert a[key] == b[key], key
    assert _history(ref) == _history(run)


def test_budget_token_layers_stops(deep_model, calib_text, tmp_path):
    args = _search_args(deep_model, calib_text, tmp_path / "r", method="evo",
                        extra=["--offspring", "8", "--budget-token-layers", "6000", "--survivors-per-stage", "4"])
    del args[args.index("--population"):args.index("--population") + 2]
    r = subprocess.run(_cmd(*args), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "r" / "result.json").read_text())
    rows = [json.loads(l) for l in _history(tmp_path / "r").splitlines()]
    assert res["stopped_early"] is True
    assert rows[-2]["token_layers"] < 6000 <= rows[-1]["token_layers"]
    assert res["token_layers"] == rows[-1]["token_layers"] and res["calib_loss"] == min(r["loss"] for r in rows)
