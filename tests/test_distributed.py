"""Ray workers: same history and result as one process, a SIGKILLed worker survived, a killed driver resumed.

Ray starts once (a module-scoped local 2-CPU cluster): the in-process runs join
it, a CLI driver subprocess connects with --ray-address. The layer searches are
small evo runs with two fidelity stages and the shared-prefix LRU on the
12-block tiny llama; each reference is the same run in one process without Ray.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from evoprune.errors import UserError

ray = pytest.importorskip("ray")

# no derived budget (budget_share 0): the run is long enough to kill; racing (evo's default margin) stays on
_KW = dict(method="evo", drop_count=4, sampling="random", nsamples=3, seqlen=48, seed=3, generations=3,
           offspring=8, tokens_per_stage=(40, 144), survivors_per_stage=(3, 2), cache_mb=1.0, budget_share=0.0)


def _cfg(model, calib, **kw):
    from evoprune.runner.config import SearchConfig

    return SearchConfig.build(model=str(model), calib=f"text:{calib}", **{**_KW, **kw})


def _rows(run) -> str:
    return (Path(run) / "history.jsonl").read_text()


def _result(run) -> dict:
    res = json.loads((Path(run) / "result.json").read_text())
    res.pop("wall_s")
    return res


def _events(run) -> list[dict]:
    p = Path(run) / "workers.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.exists() else []


def _wait(cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(deep_model, calib_text, tmp_path_factory):
    """The single-process run (no Ray) every distributed run must reproduce."""
    from evoprune.runner.loop import run_search

    out = tmp_path_factory.mktemp("ref") / "run"
    res = run_search(_cfg(deep_model, calib_text), out, progress=False)
    assert res["evaluations"] > 40
    return out


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU cluster for the in-process tests (run_search joins it and leaves it running)."""
    tmp = tempfile.mkdtemp(prefix="evoprune-ray-test-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def test_two_workers_same_as_one_process_budget(deep_model, calib_text, reference, ray_cluster, tmp_path):
    """Under --budget-token-layers: 2 workers stop at the same candidate as one process and dispatch nothing past it."""
    from evoprune.runner.loop import run_search

    # 80%: past the greedy phase (its full-fidelity promotions come first), short of the end
    budget = json.loads((reference / "result.json").read_text())["token_layers"] * 4 // 5
    one = run_search(_cfg(deep_model, calib_text, budget_token_layers=budget), tmp_path / "w1", progress=False)
    rows = [json.loads(l) for l in _rows(tmp_path / "w1").splitlines()]
    assert one["stopped_early"] and rows[-2]["token_layers"] < budget <= rows[-1]["token_layers"]
    res = run_search(_cfg(deep_model, calib_text, budget_token_layers=budget, workers=2), tmp_path / "w2",
                     progress=False)
    assert _rows(tmp_path / "w2") == _rows(tmp_path / "w1")  # losses, order and token-layers of every evaluation
    assert {k: v for k, v in res.items() if k != "wall_s"} == _result(tmp_path / "w1")
    ev = _events(tmp_path / "w2")
    assert [e["event"] for e in ev] == ["start", "start", "close"]
    assert {e["threads"] for e in ev[:2]} == {1}  # 2 CPUs split between 2 actors
    assert ev[-1]["evaluations"] == len(rows) and ev[-1]["lost"] == 0  # no evaluation past the budget


def test_worker_killed_mid_run_same_result(deep_model, calib_text, reference, ray_cluster, tmp_path, monkeypatch):
    """SIGKILL one of 2 workers after 10 evaluations: it is replaced, its candidate re-run, the run unchanged."""
    from evoprune.runner import loop as run_mod

    monkeypatch.setattr(run_mod, "_EVAL_DELAY", 0.1)  # evaluations last long enough to be killed inside one
    out = tmp_path / "killed"
    box = {}

    def target():
        try:
            box["res"] = run_mod.run_search(_cfg(deep_model, calib_text, workers=2), out, progress=False)
        except BaseException as e:  # reported below
            box["err"] = e

    th = threading.Thread(target=target)
    th.start()
    try:
        _wait(lambda: (out / "history.jsonl").exists() and _rows(out).count("\n") >= 10, "10 evaluations")
        victim = [e for e in _events(out) if e["event"] == "start"][1]["pid"]
        os.kill(victim, signal.SIGKILL)
    finally:
        th.join(timeout=180)
    assert not th.is_alive() and "err" not in box, box.get("err")
    ev = _events(out)
    # replaced once (the replacement's start is logged only if it came up before the run ended)
    assert [e["event"] for e in ev if e["event"] != "start"] == ["lost", "close"] and ev[-1]["lost"] == 1, ev
    assert ev[2]["event"] == "lost" and ev[2]["worker"] == 1 and "Actor" in ev[2]["error"], ev
    assert all(e["pid"] != victim for e in ev[3:] if e["event"] == "start")
    assert _rows(out) == _rows(reference)
    assert {k: v for k, v in box["res"].items() if k != "wall_s"} == _result(reference)


def test_driver_killed_then_resumed_with_other_worker_count(deep_model, calib_text, reference, ray_cluster, tmp_path):
    """kill -9 of a driver whose 2 workers run on an existing cluster (--ray-address) mid-run;
    `evoprune resume --workers 1 --ray-address none` (one process, no Ray) ends with the same history and result."""
    out = tmp_path / "run"
    address = ray.get_runtime_context().gcs_address
    args = ["search", "--model", str(deep_model), "--method", "evo", "--drop-count", "4", "--calib",
            f"text:{calib_text}", "--sampling", "random", "--nsamples", "3", "--seqlen", "48", "--seed", "3",
            "--generations", "3", "--offspring", "8", "--tokens-per-stage", "40,144", "--survivors-per-stage", "3,2",
            "--cache-mb", "1", "--budget-share", "0", "--workers", "2", "--ray-address", address, "--out", str(out)]
    env = {**os.environ, "EVOPRUNE_NO_PROGRESS": "1", "EVOPRUNE_EVAL_DELAY_S": "0.1"}
    log = tmp_path / "driver.log"
    with open(log, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "evoprune.cli", *args], env=env, stdout=subprocess.DEVNULL,
                             stderr=f)
    try:
        _wait(lambda: p.poll() is not None or ((out / "history.jsonl").exists() and _rows(out).count("\n") >= 15),
              "15 evaluations", timeout=150)
        assert p.poll() is None, log.read_text()[-2000:]
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not (out / "result.json").exists() and [e["event"] for e in _events(out)] == ["start", "start"]
    env["EVOPRUNE_EVAL_DELAY_S"] = "0"
    r = subprocess.run([sys.executable, "-m", "evoprune.cli", "resume", str(out), "--workers", "1", "--ray-address",
                        "none"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _rows(out) == _rows(reference)
    assert _result(out) == _result(reference)
    assert len(_events(out)) == 2  # the resumed run used no workers


def test_width_run_two_workers_same_as_one_process(deep_model, calib_text, ray_cluster, tmp_path):
    """--space width: the workers get the driver's importance.pt (not recomputed) and reproduce the run."""
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    kw = dict(space="width", method="evo", model=str(deep_model), sparsity=0.3, calib=f"text:{calib_text}",
              sampling="random", nsamples=2, seqlen=32, seed=1, population=4, mutations=2, crossovers=2,
              generations=1)
    one = run_search(SearchConfig.build(**kw), tmp_path / "w1", progress=False)
    two = run_search(SearchConfig.build(**kw, workers=2), tmp_path / "w2", progress=False)
    assert _rows(tmp_path / "w2") == _rows(tmp_path / "w1")
    assert {k: v for k, v in two.items() if k != "wall_s"} == {k: v for k, v in one.items() if k != "wall_s"}
    ev = _events(tmp_path / "w2")
    assert ev[-1]["evaluations"] == two["evaluations"] and ev[-1]["setup_token_layers"] == 0


def test_sublayer_run_two_workers_same_as_one_process(deep_model, calib_text, ray_cluster, tmp_path):
    """--space sublayers with two fidelity stages and the LRU: 2 workers reproduce the one-process run."""
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    kw = dict(space="sublayers", method="evo", model=str(deep_model), sparsity=0.25, calib=f"text:{calib_text}",
              sampling="random", nsamples=3, seqlen=48, seed=2, generations=3, offspring=8,
              tokens_per_stage=(40, 144), survivors_per_stage=(3, 2), cache_mb=1.0)
    one = run_search(SearchConfig.build(**kw), tmp_path / "s1", progress=False)
    two = run_search(SearchConfig.build(**kw, workers=2), tmp_path / "s2", progress=False)
    assert _rows(tmp_path / "s2") == _rows(tmp_path / "s1")
    assert {k: v for k, v in two.items() if k != "wall_s"} == {k: v for k, v in one.items() if k != "wall_s"}
    assert _events(tmp_path / "s2")[-1]["evaluations"] == two["evaluations"]


def test_worker_that_cannot_start_is_a_user_error(calib_text, reference, ray_cluster, tmp_path):
    """A worker whose constructor fails (here: a model path its node lacks) stops the pool with that one line."""
    from evoprune.runner.distributed import WorkerPool

    events = []
    with pytest.raises(UserError, match="a Ray worker failed to start: .*model path not found"):
        WorkerPool(_cfg(tmp_path / "no-such-model", calib_text), reference, log=events.append)
    assert [e["event"] for e in events] == ["close"]


def test_execution_options_validated(deep_model, calib_text, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad, needle in [({"workers": 0}, "--workers"), ({"gpus_per_worker": 1.0}, "--device cuda"),
                        ({"gpus_per_worker": 0.0, "device": "cuda"}, "must be > 0"),
                        ({"ray_address": " "}, "--ray-address")]:
        with pytest.raises(UserError, match=needle):
            _cfg(deep_model, calib_text, **bad)
    assert not _cfg(deep_model, calib_text).distributed and _cfg(deep_model, calib_text, workers=2).distributed
    from evoprune.cli import main

    for extra, needle in [(["--workers", "0"], "--workers must be"), (["--gpus-per-worker", "1"], "--device cuda")]:
        rc = main(["search", "--model", str(deep_model), "--drop-count", "2", "--out", "unused", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_device_map_loading_gives_the_same_search(deep_model, calib_text, tmp_path):
    """--device-map auto (accelerate places the model; with no GPU every block stays on the CPU): same run."""
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    kw = dict(model=str(deep_model), calib=f"text:{calib_text}", **{**_KW, "generations": 2})
    one = run_search(SearchConfig.build(**kw), tmp_path / "plain", progress=False)
    mapped = run_search(SearchConfig.build(**kw, device_map="auto"), tmp_path / "mapped", progress=False)
    assert _rows(tmp_path / "plain") == _rows(tmp_path / "mapped")
    assert one["calib_loss"] == mapped["calib_loss"] and one["dropped_layers"] == mapped["dropped_layers"]
    assert SearchConfig.build(**kw, device="cuda", gpus_per_worker=2).load_device_map == "auto"
    assert SearchConfig.build(**kw, device="cuda", gpus_per_worker=1).load_device_map is None
    with pytest.raises(UserError, match="--device-map"):
        SearchConfig.build(**kw, device_map=" ")


def test_actor_resources():
    from evoprune.runner.distributed import actor_resources

    assert actor_resources([2], 2) == 1 and actor_resources([16], 4) == 4 and actor_resources([3], 2) == 1
    assert actor_resources([8, 8], 3) == 4  # 2 actors on one node, 1 on the other
    assert actor_resources([8, 8], 4) == 4 and actor_resources([16, 4], 2) == 8
    assert actor_resources([2], 4) == 0.5 and actor_resources([2], 3) == 0.66  # more workers than CPUs: shared


@pytest.mark.gpu
def test_gpu_workers_same_as_one_process(deep_model, calib_text, ray_cluster, tmp_path):
    import torch

    if not torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("needs CUDA")
    from evoprune.runner.loop import run_search

    one = run_search(_cfg(deep_model, calib_text, device="cuda"), tmp_path / "one", progress=False)
    two = run_search(_cfg(deep_model, calib_text, device="cuda", workers=2, gpus_per_worker=0.5), tmp_path / "two",
                     progress=False)
    assert two["dropped_layers"] == one["dropped_layers"]
    assert two["calib_loss"] == pytest.approx(one["calib_loss"], rel=1e-5)
    assert {e["device"] for e in _events(tmp_path / "two") if e["event"] == "start"} == {"cuda"}
