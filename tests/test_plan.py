"""`evoprune plan`: offline plans for shipped configs, and the planner calibrated against real runs."""
from __future__ import annotations

import json
import time

import pytest

from evoprune.cli import main
from evoprune.plan import make_plan, meta_model, reference_configs, resolve_config
from evoprune.runner.config import SearchConfig
from evoprune.runner.loop import run_search

pytestmark = pytest.mark.usefixtures("one_thread")


def _plan(model_dir, **kw):
    cfg = SearchConfig.build(model=str(model_dir), **kw)
    config, _ = resolve_config(str(model_dir))
    return cfg, make_plan(cfg, meta_model(config, cfg.model.dtype), tflops=100, gpus=1)


def test_plan_70b_offline_in_seconds(capsys):
    t0 = time.time()
    rc = main(["plan", "--model-config", "llama-3.1-70b", "--method", "evo", "--sparsity", "0.25", "--gpus", "8",
               "--tflops", "400", "--dtype", "bfloat16", "--sampling", "ccds", "--seqlen", "2048"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and time.time() - t0 < 60
    p = json.loads(out[-1])
    assert p["model"]["params"] == 70_553_706_496 and p["model"]["n_layers"] == 80
    pl = p["placement"]
    assert pl["fits"] and pl["gpus_per_worker"] == 2 and pl["workers"] == 4  # 131 GiB of bf16 weights
    assert pl["memory"]["weights"] == 70_553_706_496 * 2
    # dense caches: 81 states x (1 x 1280 + 5 x 2048) tokens x 8192 x 2 bytes
    assert pl["memory"]["dense caches"] == 81 * (1280 + 5 * 2048) * 8192 * 2
    run, sleb = p["token_layers"]["run"], p["sleb"]
    assert run["setup"]["dense caches"] == (1280 + 10240) * 80
    assert sleb["evaluations"] == sum(80 - j for j in range(20))  # SLEB's schedule: k = 20 greedy steps
    assert run["token_layers"] < 0.25 * sleb["token_layers"]
    assert 0 < p["time"]["run_s"] < p["time"]["sleb_s"]
    assert any(line.startswith("GPUs per worker / Ray workers") for line in out)
    assert {"llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2.5-14b", "smollm2-135m"} <= set(reference_configs())


@pytest.mark.parametrize("name,params", [("llama-3.1-8b", 8_030_261_248), ("mistral-7b", 7_248_023_552),
                                         ("qwen2.5-14b", 14_770_033_664), ("smollm2-135m", 134_515_008)])
def test_shipped_configs_param_counts(name, params):
    config, _ = resolve_config(name)
    lm = meta_model(config)
    assert sum(p.numel() for p in lm.model.parameters()) == params
    assert next(lm.model.parameters()).device.type == "meta"


def test_plan_bad_input_exit_2(capsys):
    assert main(["plan", "--model-config", "no-such-model-xyz/abc/def", "--sparsity", "0.25"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evoprune: error: --model-config")
    assert main(["plan", "--model-config", "llama-3.1-8b", "--sparsity", "0.25", "--gpus", "0"]) == 2


_CALIB = dict(sampling="random", nsamples=3, seqlen=48, seed=2)


@pytest.mark.parametrize("kw", [
    dict(space="layers", method="random", drop_count=2, budget=7),
    dict(space="layers", method="exhaustive", drop_count=2),
    dict(space="layers", method="random", drop_count=2, budget=7, cache_every=2),  # sparse checkpoints
    dict(space="sublayers", method="random", drop_count=3, budget=6),
    dict(space="sublayers", method="random", drop_count=3, budget=6, cache_every=3),
    dict(space="width", method="uniform", sparsity=0.3),
    dict(space="levels", method="uniform", sparsity=0.3),
], ids=lambda kw: f"{kw['space']}-{kw['method']}-every{kw.get('cache_every', 1)}")
def test_planned_token_layers_exact(tiny_dirs, calib_text, tmp_path, monkeypatch, kw):
    """Methods whose choices do not depend on the losses: the plan's evaluations and token-layers are the run's."""
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))  # a fresh level database, counted
    cfg, p = _plan(tiny_dirs["llama"], calib=f"text:{calib_text}", **_CALIB, **kw)
    res = run_search(cfg, tmp_path / "run", progress=False)
    run = p["token_layers"]["run"]
    assert run["evaluations"] == res["evaluations"]
    assert run["token_layers"] == res["token_layers"]


def test_planned_schedule_and_bounds(tiny_dirs, calib_text, tmp_path):
    """SLEB: the evaluation count is its schedule's; evo: the same budget and an evaluation count within 25%."""
    base = dict(calib=f"text:{calib_text}", **_CALIB, drop_count=2)
    cfg, p = _plan(tiny_dirs["llama"], method="sleb", **base)
    res = run_search(cfg, tmp_path / "sleb", progress=False)
    assert p["token_layers"]["run"]["evaluations"] == res["evaluations"] == 6 + 5
    naive = sum((6 - j) * (6 - j - 1) for j in range(2)) * 3 * 48 + p["token_layers"]["run"]["setup"]["dense caches"]
    assert res["token_layers"] <= naive and p["token_layers"]["run"]["token_layers"] <= naive
    cfg, p = _plan(tiny_dirs["llama"], method="evo", **base)
    res = run_search(cfg, tmp_path / "evo", progress=False)
    run = p["token_layers"]["run"]
    # evo is adaptive: the dry run (a synthetic landscape) is a sample; its budget rule and schedule are the run's
    assert run["budget"] == res["budget_token_layers"]
    assert abs(run["evaluations"] - res["evaluations"]) <= 0.25 * res["evaluations"], (run, res["evaluations"])


def test_planned_memory_equals_held_tensors(tiny_dirs, calib_text, tmp_path):
    """Weights, dense caches (full and sparse) and KL targets: the plan's bytes are the tensors' bytes."""
    from evoprune import load_model
    from evoprune.fitness import NLLEvaluator

    lm = load_model(str(tiny_dirs["llama"]))
    weights = sum(t.numel() * t.element_size() for t in lm.model.parameters())
    from tests.conftest import random_calib

    calib = random_calib(n=3, seqlen=48)
    for every in (1, 4):
        cfg, p = _plan(tiny_dirs["llama"], calib=f"text:{calib_text}", **_CALIB, method="sleb", drop_count=2,
                       fitness="kl", cache_every=every)
        ev = NLLEvaluator(lm, calib, metric="kl", cache_every=every)
        ev.prepare()
        mem = p["placement"]["memory"]
        held = sum(t.numel() * t.element_size() for b in ev._cache for t in b if t is not None)
        targets = sum(t.logp.numel() * t.logp.element_size() for t in ev._targets)
        assert mem["weights"] == weights
        assert mem["dense caches"] == held == ev.cache_bytes
        assert mem["KL targets"] == targets
        assert p["placement"]["cache_every"] == every


def _all_methods():
    from evoprune.search import SPACE_KINDS, methods

    return [(s, m) for s in SPACE_KINDS for m in methods(s) if m != "self-pruner"]


@pytest.mark.parametrize("space,method", _all_methods())
def test_every_method_plans(tiny_dirs, space, method):
    """Every method of every space (self-pruner aside: it asks an LLM) dry-runs: one-shot inputs of the right
    length, a positive cost, a placement that fits; staged methods show their stages' caches."""
    size = dict(drop_count=2) if space == "layers" else dict(sparsity=0.3)
    extra = dict(budget=5) if method in ("random",) else {}
    cfg, p = _plan(tiny_dirs["llama"], space=space, method=method, **_CALIB, **size, **extra)
    run = p["token_layers"]["run"]
    assert run["simulated"] and run["evaluations"] >= 1 and run["token_layers"] > 0 and not run["capped"]
    assert p["placement"]["fits"] and p["flops_per_candidate_max"]
    if space in ("layers", "sublayers"):
        assert p["placement"]["memory"]["dense caches"] > 0


def test_self_pruner_plan_says_not_simulated(tiny_dirs):
    cfg, p = _plan(tiny_dirs["llama"], space="width", method="self-pruner", sparsity=0.3, **_CALIB,
                   operator_url="http://127.0.0.1:9/v1", operator_model="m")
    run = p["token_layers"]["run"]
    assert run["simulated"] is False and "LLM" in run["note"] and run["setup"]["importance"] == 3 * 48 * 6
