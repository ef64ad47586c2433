"""``evoprune bench`` (dense vs pruned speed / memory), ``evoprune report`` and ``evoprune compare``.

Everything runs on the tiny random llama of ``tiny_dirs`` and on two tiny
search runs (EvoP and SLEB, k=2 of 6 blocks) made once per module through the
CLI. The ``gpu`` test repeats the bench on CUDA and is skipped without one.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
from pathlib import Path

import pytest

from evoprune import cli
from evoprune.evaluate.flops import forward_flops, ideal_speedup


@pytest.fixture
def evo(monkeypatch, capsys):
    """Run the evoprune CLI in-process -> (exit code, last-line JSON or None, stdout, stderr)."""

    def run(*argv):
        capsys.readouterr()
        rc = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        lines = out.strip().splitlines()
        js = json.loads(lines[-1]) if rc == 0 and lines else None
        return rc, js, out, err

    return run


def _png_ok(path: Path) -> tuple[int, int]:
    """Assert ``path`` is a PNG over 1 KB; return its (width, height) from the IHDR chunk."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 1024, (path, len(data))
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def runs(tiny_dirs, tmp_path_factory):
    """Two finished tiny runs: {"evop": dir, "sleb": dir} (k=2 of 6 blocks, same random calibration windows)."""
    root = tmp_path_factory.mktemp("runs")
    text = root / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = {}
    for method in ("evop", "sleb"):
        extra = ["--population", 6, "--generations", 2] if method == "evop" else []
        rc = cli.main([str(a) for a in ["search", "--model", tiny_dirs["llama"], "--method", method,
                                        "--drop-count", 2, "--calib", f"text:{text}", "--sampling", "random",
                                        "--nsamples", 2, "--seqlen", 32, *extra, "--out", root / method]])
        assert rc == 0
        out[method] = root / method
    return out


def _result(run: Path) -> dict:
    return json.loads((run / "result.json").read_text())


def _history(run: Path) -> list[dict]:
    return [json.loads(s) for s in (run / "history.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# ideal speedup


def test_ideal_speedup_layer_drop_and_width():
    dense = {"layers": 30, "block_params": 30 * 3.5e6, "heads": 9, "head_dim": 64, "hidden": 576, "vocab": 49152}
    pruned = {**dense, "layers": 24, "block_params": 24 * 3.5e6}
    assert ideal_speedup(dense, pruned) == pytest.approx(30 / 24)
    # the attention term scales with the blocks too, so L/(L-k) holds at any context
    assert ideal_speedup(dense, pruned, new_tokens=512, ctx=256) == pytest.approx(30 / 24)
    # the LM head is a fixed cost: with it the ideal is lower, more so in decode (head on every token)
    with_head = ideal_speedup(dense, pruned, new_tokens=1, ctx=100, logits_tokens=1)
    assert 1 < with_head < 30 / 24
    # width pruning: per-block params / heads (as width pruning will report them) give the FLOP ratio
    w = {"layers": 2, "layer_params": [100.0, 40.0], "layer_heads": [4, 2], "head_dim": 8, "hidden": 16, "vocab": 10}
    d = {"layers": 2, "block_params": 200.0, "heads": 4, "head_dim": 8, "hidden": 16, "vocab": 10}
    assert forward_flops(d, new_tokens=3, ctx=5) == pytest.approx(2 * 200 * 3 + 2 * 4 * 4 * 8 * 5 * 3)
    assert ideal_speedup(d, w) == pytest.approx(200 / 140)
    assert ideal_speedup(d, w, new_tokens=3, ctx=5) == pytest.approx(
        (2 * 200 * 3 + 4 * 8 * 8 * 5 * 3) / (2 * 140 * 3 + 4 * 6 * 8 * 5 * 3))
    with pytest.raises(ValueError):
        ideal_speedup(d, {**w, "layer_params": [1.0]})


# ---------------------------------------------------------------------------------------------------------------
# bench


def _check_bench(js: dict, n_dense: int, n_pruned: int):
    assert [r["name"] for r in js["rows"]] == ["dense", "pruned"]
    dense, pruned = js["rows"]
    assert (dense["layers"], pruned["layers"]) == (n_dense, n_pruned)
    assert pruned["params"] < dense["params"]
    assert js["ideal_speedup"] == pytest.approx(n_dense / n_pruned)
    for r in js["rows"]:
        assert len(r["prefill_ms_all"]) == len(r["decode_tok_s_all"]) == js["repeats"]
        assert r["prefill_ms"] > 0 and r["decode_tok_s"] > 0
        assert r["weight_bytes"] >= 4 * r["params"]  # fp32 weights (+ buffers)
        assert r["peak_mem_bytes"] >= r["weight_bytes"]
        assert r["logits_to_keep"] == 1
    s = js["speedup"]
    assert s["prefill"] == pytest.approx(dense["prefill_ms"] / pruned["prefill_ms"])
    assert s["decode"] == pytest.approx(pruned["decode_tok_s"] / dense["decode_tok_s"])
    assert js["speedup_over_ideal"]["prefill"] == pytest.approx(s["prefill"] / js["ideal_speedup"])
    assert js["params_ratio"] == pytest.approx(pruned["params"] / dense["params"])
    assert all(math.isfinite(v) and v > 0 for v in (*s.values(), *js["ideal_speedup_with_head"].values()))


def test_bench_export(tiny_dirs, tmp_path, evo):
    from evoprune.export import export_dropped
    from evoprune import load_model

    base = load_model(str(tiny_dirs["llama"]))
    dense_params = sum(p.numel() for p in base.model.parameters())
    rec = export_dropped(base, [1, 4], tmp_path / "pruned")
    out = tmp_path / "bench.json"
    rc, js, stdout, _ = evo("bench", tmp_path / "pruned", "--repeats", 2, "--seqlen", 16, "--decode-tokens", 4,
                            "--out", out)
    assert rc == 0
    _check_bench(js, 6, 4)
    assert js["base"] == str(tiny_dirs["llama"]) and js["base_from"] == "pruning.json"
    assert js["dropped_layers"] == [1, 4]
    assert js["rows"][0]["params"] == dense_params
    assert js["rows"][1]["params"] == rec["params"]
    assert js["ideal_speedup"] == 1.5
    assert js["mem_method"] in ("vmhwm", "psutil", "ru_maxrss")
    assert (js["batch"], js["seqlen"], js["decode_tokens"], js["repeats"]) == (1, 16, 4, 2)
    assert json.loads(out.read_text()) == js
    table = stdout.splitlines()
    assert table[0].split()[:3] == ["model", "layers", "params"]
    assert table[2].split()[:2] == ["dense", "6"] and table[3].split()[:2] == ["pruned", "4"]
    assert any("ideal (block FLOPs) 1.500x" in line for line in table)


def test_bench_run_dir_and_drop(runs, tiny_dirs, evo):
    rc, js, _, _ = evo("bench", runs["evop"], "--repeats", 1, "--seqlen", 8, "--decode-tokens", 2, "--batch", 2)
    assert rc == 0
    _check_bench(js, 6, 4)
    assert js["base"] == str(tiny_dirs["llama"]) and js["base_from"] == "run config"
    assert js["dropped_layers"] == _result(runs["evop"])["dropped_layers"]
    # a plain model pruned in memory
    rc, js, _, _ = evo("bench", tiny_dirs["llama"], "--drop", "0,2,5", "--repeats", 1, "--seqlen", 8,
                       "--decode-tokens", 2)
    assert rc == 0
    _check_bench(js, 6, 3)
    assert js["base_from"] == "--drop" and js["dropped_layers"] == [0, 2, 5]


def test_bench_errors(tiny_dirs, tmp_path, evo):
    rc, _, out, err = evo("bench", tiny_dirs["llama"], "--repeats", 1, "--seqlen", 32)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "give --base" in err
    rc, _, _, err = evo("bench", tiny_dirs["llama"], "--base", tiny_dirs["llama"], "--repeats", 0)
    assert rc == 2 and "--repeats must be >= 1" in err


@pytest.mark.gpu
def test_bench_cuda(tiny_dirs, tmp_path, evo):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from evoprune.export import export_dropped
    from evoprune import load_model

    export_dropped(load_model(str(tiny_dirs["llama"])), [1, 4], tmp_path / "pruned")
    rc, js, _, _ = evo("bench", tmp_path / "pruned", "--device", "cuda", "--repeats", 2, "--seqlen", 64,
                       "--decode-tokens", 4)
    assert rc == 0
    _check_bench(js, 6, 4)
    assert js["mem_method"] == "cuda" and js["device_name"]


# ---------------------------------------------------------------------------------------------------------------
# report / compare


def test_report(runs, evo):
    for method, run in runs.items():
        res, hist = _result(run), _history(run)
        rc, js, _, _ = evo("report", run)
        assert rc == 0
        md = (run / "report.md").read_text()
        assert js["report"] == str(run / "report.md")
        for name in ("fitness.png", "pattern.png"):
            w, h = _png_ok(run / name)
            assert w > 400 and h > 200
            assert f"]({name})" in md
        dropped = ", ".join(str(i) for i in res["dropped_layers"])
        assert f"| dropped layers | {dropped} |" in md
        assert f"| method | {method} |" in md
        assert f"| k (dropped / blocks) | 2 / 6 (sparsity 33.3%) |" in md
        assert f"| calib loss | {res['calib_loss']:.4f} |" in md
        assert f"| calib ppl | {res['calib_ppl']:.2f} |" in md
        assert f"| evaluations | {len(hist)} |" in md and res["evaluations"] == len(hist)
        assert f"| token-layers | {res['token_layers']:,} (" in md
        assert js["dropped_layers"] == res["dropped_layers"] and js["calib_loss"] == res["calib_loss"]
        # the best-candidates table starts with the result's pattern
        assert f"| 1 | {dropped} | {res['calib_loss']:.4f} |" in md
        partial = sum(1 for r in hist if len(r["dropped"]) < 2)
        if method == "sleb":
            assert partial == 6 and f"{partial} hollow dots" in md  # step 1 tries each of the 6 blocks alone
        else:
            assert partial == 0 and "hollow" not in md


def test_report_in_progress_and_errors(runs, tmp_path, evo):
    part = tmp_path / "part"
    shutil.copytree(runs["evop"], part)
    (part / "result.json").unlink()
    rc, js, _, _ = evo("report", part)
    assert rc == 0 and js["finished"] is False
    hist = [r for r in _history(part) if len(r["dropped"]) == 2]
    assert js["calib_loss"] == min(r["loss"] for r in hist)
    assert f"unfinished, interrupted (continue with: evoprune resume {part})" in (part / "report.md").read_text()
    # compare shows an unfinished run's best so far, marked, and says so
    rc, js, _, err = evo("compare", runs["sleb"], part, "--out", tmp_path / "c")
    assert rc == 0 and f"run {part} is unfinished, interrupted" in err
    row = next(r for r in js["rows"] if r["run"] == str(part))
    assert row["name"] == "part (unfinished)" and row["calib_loss"] == min(r["loss"] for r in hist)
    assert row["evaluations"] == len(_history(part)) and "(unfinished)" in (tmp_path / "c" / "compare.md").read_text()
    rc, _, _, err = evo("report", tmp_path)
    assert rc == 2 and "not an evoprune run" in err


def test_compare(runs, tmp_path, evo):
    evop = tmp_path / "evop_run"
    shutil.copytree(runs["evop"], evop)
    (evop / "eval_zeroshot.json").write_text(json.dumps(
        {"tasks": {"arc_easy": {"acc": 0.25, "acc_norm": 0.3}, "piqa": {"acc": 0.55, "acc_norm": None}},
         "mean_acc": 0.4}))
    ppl = tmp_path / "ppl.json"
    ppl.write_text(json.dumps({"evop_run": {"wikitext2": 123.5}, str(runs["sleb"]): {"wikitext2": 98.25},
                               "dense": {"wikitext2": 50.0, "mean acc": 0.5}}))
    out = tmp_path / "cmp"
    rc, js, stdout, _ = evo("compare", evop, runs["sleb"], "--out", out, "--ppl-json", ppl)
    assert rc == 0
    _png_ok(out / "compare.png")
    md = (out / "compare.md").read_text()
    assert "![compare](compare.png)" in md
    assert js["methods"] == ["evop", "sleb"]
    assert js["metrics"] == ["arc_easy acc", "piqa acc", "mean acc", "wikitext2 ppl"]
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method"))
    cols = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("| "):  # the first table ends; the fronts follow
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(cols, cells))
    assert set(rows) == {"evop", "sleb", "dense"}
    for method, run in (("evop", evop), ("sleb", runs["sleb"])):
        res = _result(run)
        r = rows[method]
        assert r["calib loss"] == f"{res['calib_loss']:.4f}"
        assert r["dropped layers"] == ", ".join(map(str, res["dropped_layers"]))
        assert r["sparsity"] == "33.3%" and r["k / n"] == "2 / 6"
    assert rows["evop"]["wikitext2 ppl"] == "123.50" and rows["sleb"]["wikitext2 ppl"] == "98.25"
    assert rows["evop"]["mean acc"] == "0.4000" and rows["sleb"]["mean acc"] == "-"
    assert rows["evop"]["arc_easy acc"] == "0.2500"
    assert rows["dense"]["wikitext2 ppl"] == "50.00" and rows["dense"]["sparsity"] == "0%"
    assert "different calibration sets" not in md  # both runs share the same calib.pt content
    # across spaces: both runs drop 2 of 6 blocks (the same size), so the one with the lower held-out ppl wins both
    params = _result(runs["sleb"])["params"]
    assert rows["sleb"]["params"] == f"{params / 1e6:.2f}M" == rows["evop"]["params"] and params < _result(evop)["params_dense"]
    assert js["quality"] == "wikitext2 ppl" and js["front"]["params"] == [runs["sleb"].name] and js["front"]["decode"] == []
    assert js["best"] == [{"budget": 0.35, "run": runs["sleb"].name, "wikitext2 ppl": 98.25, "params": params,
                           "method": "sleb"}]
    _png_ok(out / "front.png")
    assert "## Pareto front: wikitext2 ppl against parameters" in md and "## Best run at each budget" in md
    assert "| evop |" in stdout and "| sleb |" in stdout
