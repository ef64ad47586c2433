"""DarwinLM-style levels: structured OBS, level databases, the level space, darwinlm search, training-aware runs."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from evoprune import load_model
from evoprune.finetune.brief import BriefTrainConfig, disjoint_windows
from evoprune.fitness.levels import LevelEvaluator
from evoprune.spaces import GenomeError, LevelVector
from evoprune.models.slicing import width_linears, width_masked, width_sliced, width_spec
from evoprune.prune.levels_db import AppliedLevels, LevelDatabase, level_ladders
from evoprune.prune.obs import obs_error, structured_obs
from evoprune.search import drive, make_strategy
from evoprune.spaces import SearchError
from evoprune.spaces import LevelSpace
from tests.conftest import TINY_VOCAB, random_calib
from tests.test_run import _cmd, _env, _history, _kill_resume


pytestmark = pytest.mark.usefixtures("one_thread")


# -- structured OBS -----------------------------------------------------------------

def test_structured_obs_is_exact_greedy_and_beats_zeroing():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    h = x.T @ x
    for size in (1, 3):
        n = 12 // size
        order, ws = structured_obs(w, h, size, [0, 1, 2, n], damp=0.0)
        assert len(order) == n and sorted(order) == list(range(n))
        assert torch.equal(ws[0], w) and torch.count_nonzero(ws[-1]) == 0
        hinv = torch.linalg.inv(h)
        # the first removal is the structure of least OBS error, and the update achieves exactly that error
        scores = []
        for j in range(n):
            q = list(range(j * size, (j + 1) * size))
            scores.append(float(torch.einsum("os,st,ot->", w[:, q], torch.linalg.inv(hinv[q][:, q]), w[:, q])))
        assert order[0] == int(np.argmin(scores))
        assert obs_error(w, ws[1], h) == pytest.approx(min(scores), rel=1e-9)
        for level, count in ((1, 1), (2, 2)):
            removed = [c for j in order[:count] for c in range(j * size, (j + 1) * size)]
            assert torch.count_nonzero(ws[level][:, removed]) == 0
            zeroed = w.clone()
            zeroed[:, removed] = 0
            assert obs_error(w, ws[level], h) < 0.5 * obs_error(w, zeroed, h)
    with pytest.raises(ValueError):
        structured_obs(w, h, 5, [1])  # 5 does not divide 12
    with pytest.raises(ValueError):
        structured_obs(w, h, 1, [3, 2])  # not nondecreasing


# -- genome and space ----------------------------------------------------------------

def _smol_space(sparsity, separate=False):
    """SmolLM2-135M's ladders: 3 groups of 294,912 parameters, 9 MLP steps of 170-171 channels x 1,728."""
    attn = [c * 294912 for c in (0, 1, 2, 3)]
    mlp = [int(np.floor(l * 1536 / 9 + 0.5)) * 1728 for l in range(10)]
    return LevelSpace(30, attn, mlp, sparsity, 30 * (884736 + 2654208), separate=separate)


def test_level_vector_key_and_validation():
    g = LevelVector((1, 0, 2), (3, 3, 0))
    assert g.key == "V3:a1,0,2;m3,3,0" and LevelVector.from_key(g.key) == g
    for bad in (((), ()), ((1,), (1, 2)), ((-1,), (0,))):
        with pytest.raises(GenomeError):
            LevelVector(*bad)
    with pytest.raises(GenomeError):
        LevelVector.from_key("V2:a1;m1")


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("sparsity", [0.2, 0.3, 0.5])
def test_level_space_uniform_and_level_switches_keep_the_budget(sparsity, separate):
    sp = _smol_space(sparsity, separate)
    u = sp.uniform()
    assert sp.feasible(u) and abs((1 - sp.cost(u)) - sparsity) < 0.002
    assert max(u.attn) - min(u.attn) <= 1 and max(u.mlp) - min(u.mlp) <= 1  # as uniform as the ladders allow
    rng = np.random.default_rng(0)
    g = u
    for _ in range(300):
        child = sp.mutate(g, rng, flips=int(rng.integers(1, 4)))
        assert child is not None and child != g and sp.feasible(child)
        if separate:  # within-pool switches: each pool's level sum is exactly the uniform one
            assert (sum(child.attn), sum(child.mlp)) == (sum(u.attn), sum(u.mlp))
        g = child
    assert abs(sp.removed(g) - sparsity * sp.total) <= sp.pools()[0][2] * (1 if not separate else 2)
    assert g != u
    assert not sp.feasible(LevelVector((3,) * 30, (9,) * 30)) and not sp.feasible(LevelVector((4,) * 30, (0,) * 30))
    with pytest.raises(SearchError):
        LevelSpace(3, (0, 5), (0, 7), 1.5, 100)


def test_darwinlm_strategy_improves_on_uniform_and_resumes():
    sp = _smol_space(0.3)
    w_attn = np.linspace(2.0, 0.5, 30)  # synthetic sensitivities: later blocks prune more cheaply
    w_mlp = np.linspace(1.0, 0.2, 30) ** 2

    def fit(g):
        return float(np.dot(w_attn, np.square(g.attn)) + np.dot(w_mlp, np.square(g.mlp)))

    def run(stop_after=None):
        s = make_strategy("darwinlm", sp, np.random.default_rng(7), generations=25, offspring=6, survivors=(3, 1))
        n = 0
        while not s.done:
            if stop_after is not None and n == stop_after:
                state = json.loads(json.dumps(s.state_dict()))
                s = make_strategy("darwinlm", sp, np.random.default_rng(99), generations=25, offspring=6,
                                  survivors=(3, 1))
                s.load_state_dict(state)
                stop_after = None
            reqs = s.ask()
            s.tell(reqs, [fit(r.pattern) + 0.01 * r.stage for r in reqs])
            n += 1
        return s

    a = run()
    assert a.best is not None and sp.feasible(a.best[0]) and a.best[1] < fit(sp.uniform()) + 0.01 - 1.0
    assert a.generation == 25
    b = run(stop_after=17)
    assert a.best[0] == b.best[0] and a.best[1] == b.best[1] and a.n_evaluations == b.n_evaluations
    u = make_strategy("uniform", sp, np.random.default_rng(0))
    assert drive(u, fit)[0] == sp.uniform() and u.done


# -- level database and evaluation -----------------------------------------------------

@pytest.fixture(scope="module")
def dbs(tiny_dirs, tmp_path_factory):
    """family -> (LoadedModel, obs database, wanda_sp database) on one calibration set."""
    out = {}
    root = tmp_path_factory.mktemp("levels")
    for fam in ("llama", "opt"):
        lm = load_model(str(tiny_dirs[fam]))
        spec = width_spec(lm.model, lm.adapter)
        a, m = level_ladders(spec)
        calib = random_calib()
        obs = LevelDatabase.build(lm, calib, root / f"{fam}-obs", attn_counts=a, mlp_counts=m)
        wsp = LevelDatabase.build(lm, calib, root / f"{fam}-wsp", method="wanda_sp", attn_counts=a, mlp_counts=m)
        out[fam] = (lm, obs, wsp, calib)
    return out


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "opt"])
@torch.no_grad()
def test_database_levels_slice_exactly_and_restore(dbs, family):
    lm, obs, wsp, calib = dbs[family]
    spec = width_spec(lm.model, lm.adapter)
    assert obs.counts("attn") == level_ladders(spec)[0] and obs.counts("attn")[-1] == spec.layers[0].groups
    db = LevelDatabase.load(obs.path)  # reopened from disk
    dense = _state(lm.model)
    applied = AppliedLevels(lm, db)
    g = LevelVector((1, 0, 2, 1, 0, 1), (1, 2, 0, 3, 1, 0))
    assert applied.apply(g.attn, g.mlp) == sum(x > 0 for x in g.attn + g.mlp)
    plan = db.plan(g.attn, g.mlp, spec)
    ids = torch.randint(0, TINY_VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    masked = lm.model(input_ids=ids, use_cache=False).logits
    with width_masked(lm.model, plan, lm.adapter):  # removed columns are zero already: the same function
        assert torch.equal(lm.model(input_ids=ids, use_cache=False).logits, masked)
    with width_sliced(lm.model, plan, lm.adapter) as width:
        assert width["num_kv_groups"] == [spec.layers[0].groups - db.counts("attn")[a] for a in g.attn]
        assert (lm.model(input_ids=ids, use_cache=False).logits - masked).abs().max() < 1e-5
    g2 = LevelVector((1, 0, 2, 1, 0, 2), (1, 2, 0, 3, 1, 0))
    assert applied.apply(g2.attn, g2.mlp) == 1  # only the unit whose level changed is loaded
    applied.restore()
    assert all(torch.equal(v, dense[k]) for k, v in lm.model.state_dict().items())


@torch.no_grad()
def test_obs_levels_reconstruct_better_than_wanda_sp(dbs):
    """At the same level, the OBS database's MLP outputs on the calibration inputs are closer to the dense ones."""
    lm, obs, wsp, calib = dbs["llama"]
    blocks = lm.adapter.get_blocks(lm.model)
    errs = {}
    for name, db in (("obs", obs), ("wsp", wsp)):
        applied = AppliedLevels(lm, db)
        total = 0.0
        for i in range(len(blocks)):
            inputs = []
            down = width_linears(lm.adapter, blocks[i])["mlp_out"]
            h = down.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach().clone()))
            lm.model(input_ids=calib.input_ids, use_cache=False)
            h.remove()
            ref = down(inputs[0])
            applied.apply((0,) * 6, tuple(2 if j == i else 0 for j in range(6)))
            total += float((down(inputs[0]) - ref).pow(2).sum())
            applied.restore()
        errs[name] = total
    assert errs["obs"] < 0.7 * errs["wsp"], errs


def test_training_windows_are_disjoint_from_calibration():
    g = torch.Generator().manual_seed(1)
    pool = torch.randint(0, 50, (40, 32), generator=g)
    calib = torch.cat([pool[3, 5:29], pool[17, :24]]).view(2, 24)  # two windows overlap the calibration text
    kept = disjoint_windows(pool, calib, n=16)
    assert kept.shape[0] == 38
    grams = {tuple(r[i:i + 16]) for r in calib.tolist() for i in range(9)}
    assert not any(tuple(r[i:i + 16]) in grams for r in kept.tolist() for i in range(17))


def test_training_aware_fitness_is_deterministic_and_leaves_the_model_alone(dbs):
    lm, obs, _, calib = dbs["llama"]
    dense = _state(lm.model)
    applied = AppliedLevels(lm, obs)
    windows = torch.randint(0, TINY_VOCAB, (4, 24), generator=torch.Generator().manual_seed(9))
    g = LevelVector((1, 1, 0, 1, 2, 1), (1, 0, 2, 1, 0, 1))
    one_shot = LevelEvaluator(applied, calib)
    results = {}
    for mode in ("lora", "full"):
        ev = LevelEvaluator(applied, calib, train_windows=windows, train_cfg=BriefTrainConfig(mode=mode, lr=5e-3))
        a, b = ev.evaluate(g), ev.evaluate(g)
        assert a.loss == b.loss  # same windows, same seed: a function of the candidate
        results[mode] = a
        assert a.token_layers == calib.n_tokens * 6 + 3 * windows.numel() * 6
    base = one_shot.evaluate(g)
    assert base.token_layers == calib.n_tokens * 6
    kl = LevelEvaluator(applied, calib, metric="kl")
    applied.restore()  # KL targets come from the dense model
    kl.prepare()
    assert kl.evaluate(LevelVector((0,) * 6, (0,) * 6)).loss == pytest.approx(0.0, abs=1e-6)
    assert kl.evaluate(g).loss > 1e-3 and kl.evaluate(g).loss == kl.evaluate(g).loss  # tiny random model: small KL
    assert results["lora"].loss != base.loss and results["full"].loss != base.loss
    applied.restore()
    assert all(torch.equal(v, dense[k]) for k, v in lm.model.state_dict().items())


# -- runs ----------------------------------------------------------------------------

def _levels_args(model, calib, out, extra=()):
    return ["search", "--model", str(model), "--space", "levels", "--method", "darwinlm", "--sparsity", "0.3",
            "--calib", f"text:{calib}", "--sampling", "random", "--nsamples", "3", "--seqlen", "48", "--seed", "2",
            "--offspring", "4", "--generations", "4", "--tokens-per-stage", "48,144", "--survivors-per-stage", "2,1",
            "--train-tokens-per-stage", "96,144", "--train-lr", "0.005", "--start-from", "none", "--out", str(out),
            *extra]


def test_darwinlm_run_export_and_kill_resume(tiny_dirs, calib_text, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))  # the level database goes here
    env = _env()
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(*_levels_args(tiny_dirs["llama"], calib_text, ref)), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a = json.loads((ref / "result.json").read_text())
    rows = [json.loads(l) for l in _history(ref).splitlines()]
    assert a["space"] == "levels" and a["training_aware"] and a["levels_db"]["built_by_this_run"]
    assert abs(a["param_sparsity"] - 0.3) < 0.05 and a["params"] < a["params_dense"]
    # 1 uniform start through both stages, then 3 generations of 4 offspring at stage 0 and 2 at stage 1
    assert a["evaluations"] == len(rows) == 2 + 3 * (4 + 2)
    stage0 = [r for r in rows if r["stage"] == 0]
    assert {r["eval_token_layers"] for r in stage0} == {48 * 6 + 3 * 96 * 6}
    assert a["calib_loss"] == min(r["loss"] for r in rows if r["stage"] == 1)
    assert all(len(r["rates"]) == 6 for r in rows) and a["rates"] in [r["rates"] for r in rows]
    r = subprocess.run(_cmd("report", str(ref)), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    md = (ref / "report.md").read_text()
    assert "levels: mean rate 0.3 over 6 blocks" in md and (ref / "pattern.png").stat().st_size > 0
    setup = rows[0]["token_layers"] - rows[0]["eval_token_layers"]
    assert setup == a["levels_db"]["token_layers"] == 3 * 48 * 6  # the database's one dense pass

    # a second run with the same calibration set reuses the database
    other = tmp_path / "oneshot"
    args = _levels_args(tiny_dirs["llama"], calib_text, other, ["--training-aware", "off"])
    i = args.index("--train-tokens-per-stage")
    del args[i:i + 4]
    subprocess.run(_cmd(*args), env=env, check=True, capture_output=True, timeout=300)
    b = json.loads((other / "result.json").read_text())
    assert not b["training_aware"] and not b["levels_db"]["built_by_this_run"]
    assert b["levels_db"]["path"] == a["levels_db"]["path"] and b["evaluations"] == a["evaluations"]

    # export: reloaded with trust_remote_code and no evoprune import, equal logits; ppl of run == of export
    exp = tmp_path / "exp"
    r = subprocess.run(_cmd("export", str(ref), "--out", str(exp)), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["max_abs_diff"] == 0.0 and rec["params"] == a["params"]
    code = ("import json, sys, torch; from transformers import AutoModelForCausalLM as A; "
            f"m = A.from_pretrained({str(exp)!r}, trust_remote_code=True); "
            "assert 'evoprune' not in sys.modules; print(sum(p.numel() for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == a["params"]
    ppl = [json.loads(subprocess.run(_cmd("ppl", "--model", str(m), "--dataset", f"text:{calib_text}", "--seqlen",
                                          "48", "--max-windows", "3"), env=env, capture_output=True, text=True,
                                     timeout=300).stdout.strip().splitlines()[-1])["ppl"] for m in (ref, exp)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-6)

    # killed twice mid-run and resumed: the same history and result as the uninterrupted run
    killed = tmp_path / "killed"
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache2"))  # builds its own database, as ref did
    _kill_resume(_levels_args(tiny_dirs["llama"], calib_text, killed), killed, [3, 11])
    c = json.loads((killed / "result.json").read_text())
    for key in ("attn_levels", "mlp_levels", "calib_loss", "evaluations", "token_layers"):
        assert a[key] == c[key], key
    assert _history(ref) == _history(killed)


def test_levels_bad_input(tiny_dirs, calib_text, tmp_path):
    base = _levels_args(tiny_dirs["llama"], calib_text, tmp_path / "x")
    for extra, needle in ((["--database", "magic"], "--database"), (["--train-mode", "sgd"], "--train-mode"),
                          (["--train-tokens-per-stage", "96"], "one entry per selection stage")):
        args = list(base)
        if extra[0] in args:
            i = args.index(extra[0])
            del args[i:i + 2]
        r = subprocess.run(_cmd(*args, *extra), env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_levels_config_parses_stage_lists():
    from evoprune.runner.config import SearchConfig
    from evoprune.errors import UserError

    kw = dict(space="levels", method="darwinlm", sparsity=0.3, tokens_per_stage="512,2048",
              survivors_per_stage="2,1", seqlen=512, nsamples=4)
    from evoprune.runner.problems.levels import train_tokens, trains

    cfg = SearchConfig.build(**kw, train_tokens_per_stage="1024,4096")
    assert cfg.training.tokens_per_stage == (1024, 4096) and trains(cfg)
    assert train_tokens(cfg, 4, 512) == [1024, 4096] and cfg.strategy_options()["survivors"] == (2, 1)
    assert train_tokens(SearchConfig.build(**kw), 4, 512) == [512, 2048]  # default: the fitness tokens
    assert train_tokens(SearchConfig.build(**kw, training_aware=False), 4, 512) is None
    for bad in (dict(train_tokens_per_stage="1024,2048,4096"), dict(train_tokens_per_stage="1024", tokens_per_stage=None,
                                                                   survivors_per_stage=None, training_aware=False)):
        with pytest.raises(UserError):
            SearchConfig.build(**{**kw, **bad})


def test_darwinlm_length_one_shot_budget_training_aware_generations():
    """One-shot darwinlm runs until a default budget of budget_evals whole-set evaluations (tokens x blocks);
    training-aware runs (the runner's ``trains`` input) have none and stop after 10 generations; a given
    ``--generations`` or ``budget_evals=0`` (what a run recorded before the option means) restores a count."""
    from evoprune.runner.config import SearchConfig

    space = _smol_space(0.3)
    one = make_strategy("darwinlm", space, np.random.default_rng(0))
    assert one.config.tokens_per_stage == "auto" and one.config.survivors == (2, 1)
    assert one.default_budget((64, 512)) == 35 * 512 * 30 and one.max_generations > 1000
    trained = make_strategy("darwinlm", space, np.random.default_rng(0), trains=True)
    assert trained.default_budget((64, 512)) is None and trained.max_generations == 10
    fixed = make_strategy("darwinlm", space, np.random.default_rng(0), generations=7, budget_evals=0)
    assert fixed.default_budget((512,)) is None and fixed.max_generations == 7
    with pytest.raises(SearchError):
        make_strategy("darwinlm", space, np.random.default_rng(0), budget_evals=-1)
    cfg = SearchConfig.build(space="levels", sparsity=0.3, training_aware=False)
    assert "budget_evals" in cfg.to_dict()["method_options"] and "trains" not in cfg.to_dict()["method_options"]
    old = {"evoprune_run": 2, **cfg.to_dict()}
    del old["method_options"]["budget_evals"]  # a run record from before the option: no default budget
    assert SearchConfig.from_dict(old).method_options.budget_evals == 0.0


def test_darwinlm_starts_from_the_block_answer_on_the_ladders():
    """The block search's answer (both halves of a dropped block at their top level) joins generation 0 beside the
    uniform vector, reaches the last stage whatever its cheap fitness, and sets a budget of twice its cost."""
    space = _smol_space(0.3)
    start = {"dropped_layers": [3, 5, 8, 11, 14, 17, 20, 23, 26], "calib_loss": 4.6, "token_layers": 10_000}
    s = make_strategy("darwinlm", space, np.random.default_rng(0), start=start)
    top_a, top_m = space.max_level("attn"), space.max_level("mlp")
    g = s.start_genome
    assert [i for i in range(30) if g.attn[i] == top_a and g.mlp[i] == top_m] == start["dropped_layers"]
    assert sum(g.attn) == 9 * top_a and sum(g.mlp) == 9 * top_m and space.feasible(g)
    assert [p.key for p in s.cohort] == [space.uniform().key, g.key]
    assert s.default_budget((64, 512)) == 20_000 and s.result_extras()["start"]["calib_loss"] == 4.6
    first = s.ask()
    s.tell(first, [1.0 if r.key != g.key else 9.0 for r in first])  # the start: worst on the cheap slice
    assert g.key in {r.key for r in s.ask()}
    trained = make_strategy("darwinlm", space, np.random.default_rng(0), start=start, trains=True)
    assert trained.default_budget((64, 512)) is None
    # a start the budget's tolerance cannot take (8 blocks at 30%) is left out: the uniform start alone
    short = make_strategy("darwinlm", space, np.random.default_rng(0), start={**start, "dropped_layers": [3, 5]})
    assert short.start_genome is None and len(short.cohort) == 1


def test_levels_default_starts_from_the_block_search(tiny_dirs, calib_text, tmp_path, monkeypatch):
    """One-shot darwinlm at its defaults: the block search runs first (RUN/blocks), its pattern on the ladders
    scores what the block search scored, the result is no worse, at <= twice the block search's token-layers."""
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = ["search", "--model", str(tiny_dirs["llama"]), "--space", "levels", "--sparsity", "0.34", "--calib",
            f"text:{calib_text}", "--sampling", "random", "--nsamples", "3", "--seqlen", "48", "--seed", "2",
            "--training-aware", "off", "--out", str(run)]
    r = subprocess.run(_cmd(*args), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "result.json").read_text())
    blocks = json.loads((run / "blocks" / "result.json").read_text())
    assert blocks["k"] == 2 and res["start"]["dropped_layers"] == blocks["dropped_layers"]
    rows = [json.loads(l) for l in _history(run).splitlines()]
    top = [r for r in rows if r["stage"] == 1 and all(r["rates"][i] == 1.0 for i in blocks["dropped_layers"])]
    assert top and top[0]["loss"] == pytest.approx(blocks["calib_loss"], rel=1e-5)  # the same model
    assert res["calib_loss"] <= top[0]["loss"]
    assert res["budget_token_layers"] == 2 * blocks["token_layers"]
    assert res["token_layers"] <= res["budget_token_layers"] + max(r["eval_token_layers"] for r in rows)
