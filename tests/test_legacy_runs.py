"""Run directories written by evoprune before the redesign (flat ``config.json``, ``evoprune_run: 1``) keep working.

The fixtures under ``tests/fixtures/v1`` were written by the code at commit 1614941 (the last main with the flat
format) on the bundled SmolLM2-135M:

- ``evo_killed``: ``evoprune search --method evo --drop-count 3 --calib wikitext2 --sampling random --nsamples 2
  --seqlen 64 --tokens-per-stage 32,128 --survivors-per-stage 2,2 --offspring 4 --generations 3 --seed 0``
  killed with SIGKILL after 70 logged evaluations (the saved state holds 63); ``evo_expected_*`` are the
  history and result of the same command run without interruption;
- ``width_owl``: ``evoprune search --space width --method owl --sparsity 0.3 --calib wikitext2 --sampling
  random --nsamples 1 --seqlen 64 --seed 0``, finished.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_run import _cmd, _env

FIXTURES = Path(__file__).parent / "fixtures" / "v1"
pytestmark = pytest.mark.slow


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _run(*args) -> dict:
    r = subprocess.run(_cmd(*args), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _no_wall(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "wall_s"}


def _same(a, b) -> bool:
    """Equal, floats to 1e-6 relative: the fixtures were recorded on another CPU, whose float32 kernels (AVX2 vs
    AVX-512 code paths) round sums differently in the last bits; patterns, counts and token-layers are exact."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == pytest.approx(b, rel=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_v1_layer_run_resumes_exports_reports(tmp_path):
    run = _copy("evo_killed", tmp_path)
    res = _run("resume", str(run))
    expected = json.loads((FIXTURES / "evo_expected_result.json").read_text())
    # the result every space now records beside the fixture's: the pruned model's size (27 of 30 blocks kept)
    size = {k: res.pop(k) for k in ("params", "params_dense", "param_sparsity")}
    assert size["param_sparsity"] == pytest.approx(0.1) and size["params"] < size["params_dense"]
    assert _same(_no_wall(res), _no_wall(expected)), (res, expected)
    rows = [(run / "history.jsonl").read_text(), (FIXTURES / "evo_expected_history.jsonl").read_text()]
    got, want = ([json.loads(x) for x in text.splitlines()] for text in rows)
    assert _same(got, want)
    rec = _run("export", str(run), "--out", str(tmp_path / "exp"))
    assert rec["dropped_layers"] == [13, 14, 15] and rec["n_layers"] == 27 and rec["max_abs_diff"] <= 1e-5
    rep = _run("report", str(run))
    assert rep["dropped_layers"] == [13, 14, 15] and rep["calib_loss"] == res["calib_loss"]
    assert (run / "report.md").is_file() and (run / "fitness.png").is_file()


def test_v1_width_run_exports_and_reports(tmp_path):
    run = _copy("width_owl", tmp_path)
    res = json.loads((run / "result.json").read_text())
    assert _run("resume", str(run))["calib_loss"] == res["calib_loss"]  # finished: resume returns the result
    rec = _run("export", str(run), "--out", str(tmp_path / "exp"))
    assert rec["params"] == res["params"] == 102662784 and rec["rates"] == res["rates"]
    rep = _run("report", str(run))
    assert rep["calib_loss"] == res["calib_loss"] and (run / "pattern.png").is_file()
