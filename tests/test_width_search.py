"""Width-pruning search (--space width): rate-vector space, uniform/owl/evo/self-pruner, runs, resume, export."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evoprune.spaces import GenomeError, RateVector
from evoprune.search import drive, make_strategy
from evoprune.search.width.oneshot import owl_rates
from evoprune.spaces import SearchError, WidthSpace
from tests.test_llm_operator import FakeServer
from tests.test_run import _cmd, _env, _history, _kill_resume


# -- pure: genome and space ------------------------------------------------------------------

def test_rate_vector_key_roundtrip_and_validation():
    g = RateVector((0.1, 0.2000004, 0.3))
    assert g.rates == (0.1, 0.2, 0.3) and RateVector.from_key(g.key) == g
    for bad in [(), (0.1, 1.2), (float("nan"),), (-0.1,)]:
        with pytest.raises(GenomeError):
            RateVector(bad)


def test_width_space_operators_stay_feasible():
    rng = np.random.default_rng(0)
    for n, beta, lo, hi in [(30, 0.3, 0.0, 1.0), (7, 0.5, 0.2, 0.8), (1, 0.4, 0.0, 1.0)]:
        space = WidthSpace(n, beta, lo, hi)
        assert space.feasible(space.uniform()) and space.uniform().rates == (beta,) * n
        for _ in range(50):
            a, b = space.sample(rng), space.sample(rng)
            for g in (a, b, space.mutate(a, rng), space.crossover(a, b, rng), space.project(rng.normal(0.5, 2, n))):
                assert space.feasible(g), g
                assert round(sum(g.rates) * 1e5) == round(beta * n * 1e5)  # exact on the grid
        assert space.project(a.rates) == a  # feasible grid vectors are fixed points
    with pytest.raises(SearchError):
        WidthSpace(4, 0.3).project([0.3] * 3)
    with pytest.raises(SearchError):
        WidthSpace(4, 1.2)


def test_owl_rates_follow_outliers():
    space = WidthSpace(5, 0.4)
    r = owl_rates(space, [0.01, 0.02, 0.03, 0.04, 0.05], lam=0.08)
    assert space.feasible(r)
    assert list(r.rates) == sorted(r.rates, reverse=True)  # more outliers -> pruned less
    assert r.rates[0] - r.rates[-1] == pytest.approx(0.16, abs=1e-4)  # spread 2 * lambda


def _toy(n):
    target = np.linspace(0.05, 0.6, n)
    return lambda g: float(((np.asarray(g.rates) - target) ** 2).sum())


def test_width_evo_beats_uniform_and_resumes_identically():
    space, f = WidthSpace(12, 0.3), _toy(12)
    s = make_strategy("evo", space, np.random.default_rng(0), population=8, mutations=4, crossovers=4, generations=12,
                      tokens_per_stage=None, probe=0.0)
    best = drive(s, f)
    assert s.n_evaluations == 8 + 12 * 8 and best[1] < 0.3 * f(space.uniform())
    a = make_strategy("evo", space, np.random.default_rng(5), population=6, generations=6, tokens_per_stage=None)
    for _ in range(3):
        c = a.ask()
        a.tell(c, [f(g) for g in c])
    b = make_strategy("evo", space, np.random.default_rng(99), population=6, generations=6, tokens_per_stage=None)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert drive(a, f) == drive(b, f)


def test_width_evo_staged_selection():
    """Width evo with two stages: generation 0 on the whole set; each later generation's M + S children
    screened at stage 0, the best `promote` of them (by the stage-0 fitness) on the whole set, and only those
    compete for the population; a state saved between the two stages continues identically."""
    space, f = WidthSpace(12, 0.3), _toy(12)
    bias = np.random.default_rng(7)
    noisy = {}

    def fit(r):  # stage 0: the true fitness plus a fixed per-genome error (a cheap, noisy slice)
        if r.stage == 0:
            noisy.setdefault(r.key, f(r.pattern) + float(bias.normal(0, 0.01)))
            return noisy[r.key]
        return f(r.pattern)

    s = make_strategy("evo", space, np.random.default_rng(0), population=6, mutations=3, crossovers=3, generations=5,
                      tokens_per_stage="auto", probe=0.0)
    assert s.config.n_stages == 2 and s.config.promote == 2
    rounds = []
    while not s.done:
        c = s.ask()
        rounds.append([(r.stage, r.key) for r in c])
        s.tell(c, [fit(r) for r in c])
    assert [len(r) for r in rounds] == [6] + [6, 2] * 5 and s.n_evaluations == 6 + 5 * 8
    assert all(st == 1 for st, _ in rounds[0])
    for screen, full in zip(rounds[1::2], rounds[2::2]):
        assert {st for st, _ in screen} == {0} and {st for st, _ in full} == {1}
        best2 = sorted(screen, key=lambda x: noisy[x[1]])[:2]
        assert [k for _, k in full] == [k for _, k in best2]
    assert s.best[1] == min(f(space.from_key(k)) for r in rounds for st, k in r if st == 1)
    assert all(s._memo[g.key] < np.inf for g in s.population)  # only whole-set scores enter the population
    # resume between the screening and the whole-set stage, and mid-screening
    for cut in (2, 3):
        a = make_strategy("evo", space, np.random.default_rng(3), population=6, mutations=3, crossovers=3, generations=4,
                          tokens_per_stage="auto", probe=0.0)
        for _ in range(cut):
            c = a.ask()
            a.tell(c[:1], [fit(c[0])]) if cut == 3 and _ == cut - 1 else a.tell(c, [fit(r) for r in c])
        b = make_strategy("evo", space, np.random.default_rng(99), population=6, mutations=3, crossovers=3,
                          generations=4, tokens_per_stage="auto", probe=0.0)
        b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        assert [(r.key, r.stage) for r in a.ask()] == [(r.key, r.stage) for r in b.ask()]
        assert drive(a, fit) == drive(b, fit)


def test_width_evo_resumes_states_saved_with_its_own_selection_fields():
    """Width evo's selection is the staged one; a state saved while width evo kept its own fields (``population``,
    ``screening``, unprefixed screening fitnesses; run format 2) resumes to what an uninterrupted run gives.
    ``fixtures/width_evo_states_format2.json``: states written by commit 15e984f on an 8-layer toy (rates squared,
    weighted; stage 0 adds a fixed per-genome error), seed 0, cut while probing, mid-screening, between screening
    and promotion, mid-promotion and between generations, with two stages and with one."""
    import zlib

    space = WidthSpace(8, 0.3)
    w = np.random.default_rng(1).uniform(0.5, 3.0, 8)

    def fit(r):
        g = getattr(r, "pattern", r)
        noise = 0.003 * (zlib.crc32(g.key.encode()) % 7) if getattr(r, "stage", None) == 0 else 0.0
        return float(np.sum(w * np.asarray(g.rates) ** 2)) + noise

    def finish(s):
        best = drive(s, fit)
        return best[0].key, best[1], s.n_evaluations, s.generation, [g.key for g in s.population], s.result_extras()

    saved = json.loads((Path(__file__).parent / "fixtures" / "width_evo_states_format2.json").read_text())
    assert len(saved) == 8
    for case in saved:
        options = case["state"]["options"]  # every option as saved (defaults have moved since)
        whole = finish(make_strategy("evo", space, np.random.default_rng(0), **options))
        s = make_strategy("evo", space, np.random.default_rng(99), **options)
        s.load_state_dict(case["state"])
        assert finish(s) == whole, case["cut"]


class FakeOperator:
    """Answers like an LLM that returns a few good, a duplicate and a short-by-one configuration."""

    def __init__(self, space, rng_seed=12345):  # not the strategy seed: its samples would repeat the fallback's
        self.space, self.rng, self.calls = space, np.random.default_rng(rng_seed), []

    def _result(self, k, kind):
        from evoprune.search.llm.operator import OperatorResult

        good = [self.space.sample(self.rng).rates for _ in range(max(k - 2, 0))]
        configs = good + good[:1]  # the duplicate must be rejected by the strategy
        return OperatorResult(kind=kind, configs=configs, requested=k, proposals=k, valid=len(configs), invalid=k - len(configs),
                              calls=1)

    def initialize(self, k, seen=()):
        self.calls.append(("init", k))
        return self._result(k, "init")

    def mutate(self, population, m, seen=()):
        assert all(len(r) == self.space.n_layers and f > 1 for r, f in population)  # fitness shown as ppl
        self.calls.append(("mutation", m))
        return self._result(m, "mutation")

    def crossover(self, population, s, seen=()):
        self.calls.append(("crossover", s))
        return self._result(s, "crossover")

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, d):
        pass


def test_self_pruner_fills_missing_proposals_and_ablations():
    space, f = WidthSpace(10, 0.3), _toy(10)
    op = FakeOperator(space)
    s = make_strategy("self-pruner", space, np.random.default_rng(0), operator=op, population=6, mutations=3,
                      crossovers=3, generations=4, tokens_per_stage=None)
    drive(s, lambda g: 1.0 + f(g))
    assert s.n_evaluations == 6 + 4 * 6  # every generation complete despite short / duplicate replies
    assert op.calls[0] == ("init", 6) and op.calls.count(("mutation", 3)) == 4
    st = s.result_extras()["llm"]
    assert st["by_kind"]["init"]["used"] == 4 and st["by_kind"]["mutation"]["used"] == 4
    assert st["used"] == 4 + 8 * 1 and st["fallback"] == 2 + 8 * 2 and st["duplicates"] >= 9
    for flags, kinds in [(dict(llm_init=False), {"mutation", "crossover"}), (dict(llm_mutation=False), {"init", "crossover"}),
                         (dict(llm_crossover=False), {"init", "mutation"})]:
        op = FakeOperator(space)
        s = make_strategy("self-pruner", space, np.random.default_rng(0), operator=op, population=4, generations=2, **flags)
        drive(s, f)
        assert {c[0] for c in op.calls} == kinds
    with pytest.raises(SearchError, match="needs an LLM operator"):
        make_strategy("self-pruner", space, np.random.default_rng(0))
    s = make_strategy("self-pruner", space, np.random.default_rng(0), llm_init=False, llm_mutation=False,
                      llm_crossover=False, population=4, generations=2)
    assert drive(s, f) is not None


# -- runs on a tiny model ---------------------------------------------------------------------

def _width_args(model, calib, out, method, extra=()):
    return ["search", "--model", str(model), "--space", "width", "--method", method, "--sparsity", "0.4",
            "--calib", f"text:{calib}", "--sampling", "random", "--nsamples", "2", "--seqlen", "32", "--seed", "1",
            "--population", "4", "--mutations", "2", "--crossovers", "2", "--generations", "3", "--out", str(out), *extra]


def _smart_reply(body):
    """A fake LLM: as many valid configurations as the prompt asks for, derived from the prompt's hash."""
    text = body["messages"][-1]["content"]
    n = int(re.search(r"Contain (\d+) decimals", text).group(1))
    k = int(re.search(r"(?:generate|exactly) (\d+)", text).group(1))
    beta = float(re.search(r"average of these numbers equals ([0-9]+\.[0-9]+)", text).group(1))
    space = WidthSpace(n, beta)
    rng = np.random.default_rng(int(hashlib.sha1(text.encode()).hexdigest()[:8], 16))
    return "\n".join(str(list(space.sample(rng).rates)) for _ in range(k)) + "\nHope this helps!"


def test_width_runs_end_to_end(tiny_dirs, calib_text, tmp_path):
    from evoprune import load_model
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    model = tiny_dirs["llama"]
    common = dict(model=str(model), space="width", sparsity=0.4, calib=f"text:{calib_text}", sampling="random",
                  nsamples=2, seqlen=32, seed=1)
    uni = run_search(SearchConfig.build(method="uniform", **common), tmp_path / "u", progress=False)
    assert uni["evaluations"] == 1 and uni["rates"] == [0.4] * 6
    assert 0.3 < uni["param_sparsity"] < 0.5 and uni["prunable_params_kept"] < uni["prunable_params_total"]
    assert uni["params_dense"] - uni["params"] == uni["prunable_params_total"] - uni["prunable_params_kept"]
    owl = run_search(SearchConfig.build(method="owl", **common), tmp_path / "o", progress=False)
    assert owl["evaluations"] == 1 and abs(np.mean(owl["rates"]) - 0.4) < 1e-4
    evo = run_search(SearchConfig.build(method="evo", population=4, mutations=2, crossovers=2, generations=3, probe=0.0,
                                        tokens_per_stage="none", **common),
                     tmp_path / "e", progress=False)
    assert evo["evaluations"] == 4 + 3 * 4 and evo["calib_loss"] <= uni["calib_loss"]  # uniform is in generation 0
    rows = [json.loads(l) for l in (tmp_path / "e" / "history.jsonl").read_text().splitlines()]
    assert min(r["loss"] for r in rows) == evo["calib_loss"] and all(len(r["rates"]) == 6 for r in rows)
    assert (tmp_path / "e" / "importance.pt").is_file()
    # the run directory loads as the width-pruned model, with the calibration loss the search measured
    lm = load_model(str(tmp_path / "e"), progress=False)
    assert sum(p.numel() for p in lm.model.parameters()) < sum(
        p.numel() for p in load_model(str(model), progress=False).model.parameters())
    from evoprune.data.calibration import CalibSet
    from evoprune.fitness import NLLEvaluator
    from evoprune.spaces import DropPattern

    loss = NLLEvaluator(lm, CalibSet.load(tmp_path / "e" / "calib.pt"), prefix_cache=False).evaluate(
        DropPattern(6, ())).loss
    assert loss == pytest.approx(evo["calib_loss"], rel=1e-5)


def test_width_cli_errors(tiny_dirs, calib_text, tmp_path):
    base = ["search", "--model", str(tiny_dirs["llama"]), "--space", "width", "--calib", f"text:{calib_text}",
            "--out", str(tmp_path / "x")]
    for extra, msg in [(["--method", "self-pruner", "--sparsity", "0.3"], "needs --operator-url"),
                       (["--method", "evo", "--drop-count", "2"], "needs --sparsity"),
                       (["--method", "sleb", "--sparsity", "0.3"], "unknown method 'sleb' for --space width"),
                       (["--method", "uniform", "--sparsity", "0.3", "--fitness", "kl"], "nll only")]:
        r = subprocess.run(_cmd(*base, *extra), env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_self_pruner_run_kill_resume_and_export(tiny_dirs, calib_text, tmp_path):
    """self-pruner against an HTTP endpoint: kill -9 / resume == uninterrupted (logged replies replayed);
    the run exports as a trust_remote_code model whose logits match the run directory's model."""
    srv = FakeServer([_smart_reply])
    try:
        op = ["--operator-url", srv.url, "--operator-model", "fake", "--operator-retries", "0"]
        ref = tmp_path / "ref"
        model = tiny_dirs["llama"]
        r = subprocess.run(_cmd(*_width_args(model, calib_text, ref, "self-pruner", op)), env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        a = json.loads((ref / "result.json").read_text())
        assert a["evaluations"] == 4 + 3 * 4 and a["llm"]["used"] >= 8 and a["llm"]["calls"] == 1 + 2 * 3
        assert len((ref / "llm_calls.jsonl").read_text().splitlines()) == 7
        from evoprune.report import write_report

        rep = write_report(ref)
        md = (ref / "report.md").read_text()
        assert rep["plots"][-1].endswith("origin.png") and (ref / "origin.png").stat().st_size > 10_000
        total = next(line for line in md.splitlines() if line.startswith("| total |")).split("|")[2:-1]
        assert [int(x) for x in total][0] == a["llm"]["calls"] and "## The LLM operator" in md
        run = tmp_path / "killed"
        _kill_resume(_width_args(model, calib_text, run, "self-pruner", op), run, [7])
        assert (run / "history.jsonl").read_text() == (ref / "history.jsonl").read_text()
        b = json.loads((run / "result.json").read_text())
        assert {k: v for k, v in b.items() if k != "wall_s"} == {k: v for k, v in a.items() if k != "wall_s"}
    finally:
        srv.close()
    out = tmp_path / "export"
    r = subprocess.run(_cmd("export", str(ref), "--out", str(out)), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["params"] < rec["params_dense"] and rec["params"] == a["params"]
    code = ("import sys, torch, json; from transformers import AutoModelForCausalLM as A; "
            "m = A.from_pretrained(sys.argv[1], trust_remote_code=True); ids = torch.arange(20)[None] % 300; "
            "print(json.dumps([sum(p.numel() for p in m.parameters()), m(ids).logits[0, -1, :5].tolist()])); "
            "assert 'evoprune' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    n, logits = json.loads(r.stdout)
    import torch

    from evoprune import load_model

    lm = load_model(str(ref), progress=False)
    assert n == rec["params"] == sum(p.numel() for p in lm.model.parameters())
    with torch.no_grad():
        mine = lm.model(torch.arange(20)[None] % 300).logits[0, -1, :5].tolist()
    assert mine == pytest.approx(logits, abs=1e-5)


def test_width_staged_run_exact_and_resumable(tiny_dirs, calib_text, tmp_path):
    """--tokens-per-stage auto on width: children screened on the first window (31 tokens), the best 2 on both;
    whole-set scores equal an unstaged evaluation; kill -9 + resume gives the same history."""
    model = tiny_dirs["llama"]
    ref = tmp_path / "ref"
    extra = ["--tokens-per-stage", "auto", "--generations", "4", "--probe", "0", "--cache-mb", "0"]
    r = subprocess.run(_cmd(*_width_args(model, calib_text, ref, "evo", extra)), env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a = json.loads((ref / "result.json").read_text())
    rows = [json.loads(x) for x in _history(ref).splitlines()]
    assert a["evaluations"] == 4 + 4 * (4 + 2) == len(rows)
    assert {x["tokens"] for x in rows if x["stage"] == 0} == {31} and {x["tokens"] for x in rows if x["stage"] == 1} == {62}
    assert [x["stage"] for x in rows if x["generation"] == 0] == [1] * 4
    assert a["calib_loss"] == min(x["loss"] for x in rows if x["stage"] == 1)
    # setup: importance and the reconstruction's Hessians, one dense pass each; a promoted child continues from the
    # window it was screened on: its whole-set score runs one window (192)
    assert a["token_layers"] == rows[-1]["token_layers"] == 2 * 32 * 2 * 6 + 4 * 384 + 4 * (4 * 192 + 2 * 192)
    from evoprune import load_model
    from evoprune.data.calibration import CalibSet
    from evoprune.fitness.whole_model import WidthEvaluator
    from evoprune.prune.importance import WidthImportance
    from evoprune.prune.reconstruct import Reconstruction

    lm, calib = load_model(str(model)), CalibSet.load(ref / "calib.pt")
    ev = WidthEvaluator(lm, calib, WidthImportance.load(ref / "importance.pt"), recon=Reconstruction(lm, calib))
    for x in [x for x in rows if x["stage"] == 1][::3]:
        assert ev.evaluate(x["rates"]).loss == pytest.approx(x["loss"], rel=1e-6)
    run = tmp_path / "killed"
    _kill_resume(_width_args(model, calib_text, run, "evo", extra), run, [9])
    assert _history(ref) == _history(run)
