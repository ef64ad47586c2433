"""Search strategies: correctness on synthetic fitness, determinism, resume, registry, torch-freedom."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evoprune.spaces import DropPattern
from evoprune.search import drive, get_strategy, make_strategy, methods
from evoprune.search.layers.evop import EvopConfig
from evoprune.spaces import LayerDropSpace

SRC = Path(__file__).resolve().parents[1] / "src"


def synthetic(n: int, seed: int = 0, pair: float = 0.6):
    """Separable per-block cost plus a penalty for dropping adjacent blocks (not separable)."""
    r = np.random.default_rng(seed)
    cost = r.random(n)

    def f(p: DropPattern) -> float:
        d = p.dropped
        adj = sum(1 for a, b in zip(d, d[1:]) if b == a + 1)
        return float(sum(cost[i] for i in d) + pair * adj)

    return f, cost


def brute_force(space: LayerDropSpace, f):
    best = min(itertools.combinations(space.droppable, space.k), key=lambda c: f(DropPattern(space.n_layers, c)))
    return DropPattern(space.n_layers, best)


def trajectory(strategy, f, resume_after: int | None = None, make=None, partial: bool = False):
    """Drive to completion, recording every ask. With ``resume_after=r``: after r rounds
    (and, with ``partial``, after telling half of round r+1) snapshot through JSON and
    continue in a freshly constructed strategy (``make()``, whose generator is seeded
    differently, so continuing identically proves the generator state is restored)."""
    asks, rounds = [], 0
    while not strategy.done:
        cands = strategy.ask()
        assert strategy.ask() == cands  # idempotent
        if not cands:
            break
        asks.append([p.key for p in cands])
        if resume_after is not None and rounds == resume_after:
            if partial and len(cands) > 1:
                h = len(cands) // 2
                strategy.tell(cands[:h], [f(p) for p in cands[:h]])
                cands = cands[h:]
            blob = json.dumps(strategy.state_dict(), allow_nan=False)
            strategy = make()
            strategy.load_state_dict(json.loads(blob))
            assert strategy.ask() == cands
        strategy.tell(cands, [f(p) for p in cands])
        rounds += 1
    return asks, strategy.best, strategy


CASES = {
    "evop": dict(population=12, generations=8, mutation_rate=0.1),
    "evop_onepoint": dict(population=12, generations=8, mutation_rate=0.1, crossover="one_point"),
    "sleb": {},
    "exhaustive": dict(batch_size=50),
    "random": dict(budget=90, batch_size=16),
}


def _make(case, space, seed):
    method = "evop" if case.startswith("evop") else case
    return make_strategy(method, space, np.random.default_rng(seed), **CASES[case])


# -- exhaustive ----------------------------------------------------------------------


def test_exhaustive_finds_true_optimum():
    space = LayerDropSpace(12, 4, (0,))
    f, _ = synthetic(12, seed=3)
    s = make_strategy("exhaustive", space, np.random.default_rng(0), batch_size=64)
    asks, best, s = trajectory(s, f)
    assert best[0] == brute_force(space, f) and best[1] == pytest.approx(f(best[0]))
    assert s.n_evaluations == space.size() == math.comb(11, 4)
    assert [len(a) for a in asks] == [64] * 5 + [330 - 320]
    assert s.generation == 6


def test_exhaustive_refuses_above_limit_and_says_how_many():
    space = LayerDropSpace(30, 9)
    with pytest.raises(ValueError, match=r"C\(30, 9\) = 14307150 patterns would take 14307150 evaluations.*force"):
        make_strategy("exhaustive", space, np.random.default_rng(0))
    with pytest.raises(ValueError, match="would take 495 evaluations"):
        make_strategy("exhaustive", LayerDropSpace(12, 4), np.random.default_rng(0), limit=100)
    s = make_strategy("exhaustive", space, np.random.default_rng(0), force=True)
    assert len(s.ask()) == 64  # lazily enumerated, not materialised


# -- SLEB / ShortGPT -------------------------------------------------------------------


def test_sleb_separable_finds_k_cheapest():
    space = LayerDropSpace(16, 5)
    f, cost = synthetic(16, seed=4, pair=0.0)
    s = make_strategy("sleb", space, np.random.default_rng(0))
    asks, best, s = trajectory(s, f)
    assert set(best[0].dropped) == set(np.argsort(cost)[:5].tolist())
    assert list(s.removal_order) == np.argsort(cost)[:5].tolist()  # cheapest first
    assert [len(a) for a in asks] == [16, 15, 14, 13, 12] and s.generation == 5


def test_sleb_respects_space_protection():
    space = LayerDropSpace(10, 3, (0, 4, 9))  # --protect-ends protects 0 and 9 in the space, for every method
    cost = np.array([0.0, 5, 5, 5, 0.0, 1, 2, 3, 4, 0.0])  # ends and 4 are cheapest but protected
    f = lambda p: float(cost[list(p.dropped)].sum())
    s = make_strategy("sleb", space, np.random.default_rng(0))
    _, best, _ = trajectory(s, f)
    assert best[0].dropped == (5, 6, 7)
    with pytest.raises(ValueError, match="droppable"):
        LayerDropSpace(5, 2, (0, 2, 4))


def test_shortgpt_drops_lowest_bi_once():
    space = LayerDropSpace(8, 3, (0,))
    scores = [0.01, 0.5, 0.02, 0.3, 0.02, 0.9, 0.1, 0.8]
    s = make_strategy("shortgpt", space, np.random.default_rng(0), scores=scores)
    (p,) = s.ask()
    assert p.dropped == (2, 4, 6)  # 0 is lowest but protected
    s.tell([p], [3.25])
    assert s.done and s.best == (p, 3.25) and s.ask() == []
    with pytest.raises(ValueError, match="one Block Influence score per layer: got 3"):
        make_strategy("shortgpt", space, np.random.default_rng(0), scores=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        make_strategy("shortgpt", space, np.random.default_rng(0), scores=[float("nan")] * 8)


# -- EPPS ---------------------------------------------------------------------------------


def test_evop_reaches_optimum_small_n():
    space = LayerDropSpace(12, 4)
    hits = 0
    for seed in range(10):
        f, _ = synthetic(12, seed=seed)
        s = make_strategy("evop", space, np.random.default_rng(seed), population=16, generations=25, mutation_rate=0.1)
        _, best, s = trajectory(s, f)
        hits += best[0] == brute_force(space, f)
        assert s.n_evaluations < space.size()  # cheaper than enumerating
    assert hits >= 9


def test_evop_asks_only_feasible_unscored_patterns():
    space = LayerDropSpace(14, 5, (0, 13))
    for seed in range(5):
        for crossover in ("uniform", "one_point"):
            f, _ = synthetic(14, seed=seed)
            s = make_strategy("evop", space, np.random.default_rng(seed), population=10, generations=15,
                              mutation_rate=0.3, crossover=crossover)
            asks, _, s = trajectory(s, f)
            flat = [k for a in asks for k in a]
            assert len(flat) == len(set(flat)) == s.n_evaluations  # never re-evaluated
            assert len(asks[0]) == 10
            assert all(len(a) <= 10 - EvopConfig(population=10).n_elite for a in asks[1:])
            assert all(space.feasible(p) for p in s.population)
            assert s.generation == 15 and s.done


def test_evop_config_validation_and_elites():
    assert EvopConfig(population=10).n_elite == 3
    assert EvopConfig(population=2, elite_fraction=0.9).n_elite == 1
    space = LayerDropSpace(10, 3)
    for bad, match in [
        (dict(population=1), "population"),
        (dict(generations=0), "generations"),
        (dict(mutation_rate=1.5), "mutation_rate"),
        (dict(elite_fraction=0.0), "elite_fraction"),
        (dict(crossover="two_point"), "crossover must be one of uniform, one_point"),
        (dict(populaton=5), r"unknown option\(s\) populaton for method evop \(valid: population, generations"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_strategy("evop", space, np.random.default_rng(0), **bad)


# -- common contract ----------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_same_seed_same_trajectory(case):
    space = LayerDropSpace(11, 3, (0,))
    f, _ = synthetic(11)
    a = trajectory(_make(case, space, 7), f)
    b = trajectory(_make(case, space, 7), f)
    assert a[0] == b[0] and a[1] == b[1]


@pytest.mark.parametrize("case", ["evop", "evop_onepoint", "random"])
def test_different_seed_different_trajectory(case):
    space = LayerDropSpace(11, 3, (0,))
    f, _ = synthetic(11)
    ref = trajectory(_make(case, space, 0), f)[0]
    assert sum(trajectory(_make(case, space, s), f)[0] != ref for s in range(1, 6)) >= 4


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_resume_mid_run_continues_identically(case, partial):
    space = LayerDropSpace(11, 3, (0,))
    f, _ = synthetic(11, seed=5)
    ref_asks, ref_best, ref = trajectory(_make(case, space, 3), f)
    for r in range(min(len(ref_asks), 4)):
        asks, best, s = trajectory(_make(case, space, 3), f, resume_after=r,
                                   make=lambda: _make(case, space, 999), partial=partial)
        assert asks == ref_asks and best == ref_best
        assert (s.generation, s.n_evaluations) == (ref.generation, ref.n_evaluations)


def test_resume_with_different_arguments_is_refused():
    space = LayerDropSpace(11, 3)
    s = make_strategy("evop", space, np.random.default_rng(0), population=8, generations=3)
    state = json.loads(json.dumps(s.state_dict()))
    with pytest.raises(ValueError, match="options"):
        make_strategy("evop", space, np.random.default_rng(0), population=9, generations=3).load_state_dict(state)
    with pytest.raises(ValueError, match="space"):
        make_strategy("evop", LayerDropSpace(11, 4), np.random.default_rng(0), population=8,
                      generations=3).load_state_dict(state)
    with pytest.raises(ValueError, match="method"):
        make_strategy("random", space, np.random.default_rng(0)).load_state_dict(state)


def test_corrupted_state_is_a_clear_value_error():
    space = LayerDropSpace(11, 3)
    good = make_strategy("evop", space, np.random.default_rng(0), population=8).state_dict()
    for broken in ({**good, "memo": {"L11:dx": 1.0}}, {k: v for k, v in good.items() if k != "pending"}, [1, 2]):
        with pytest.raises(ValueError, match="corrupted search state"):
            make_strategy("evop", space, np.random.default_rng(0), population=8).load_state_dict(broken)


def test_state_roundtrip_with_other_bit_generator():
    space = LayerDropSpace(11, 3)
    mk = lambda seed: make_strategy("evop", space, np.random.Generator(np.random.MT19937(seed)), population=6,
                                    generations=4)
    f, _ = synthetic(11)
    ref = trajectory(mk(1), f)
    assert trajectory(mk(1), f, resume_after=1, make=lambda: mk(2))[:2] == ref[:2]


def test_shortgpt_state_roundtrip():
    space = LayerDropSpace(6, 2)
    s = make_strategy("shortgpt", space, np.random.default_rng(0), scores=[0.5, 0.1, 0.2, 0.3, 0.4, 0.6])
    t = make_strategy("shortgpt", space, np.random.default_rng(0), scores=(0.5, 0.1, 0.2, 0.3, 0.4, 0.6))
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.ask() == s.ask()


def test_tell_contract():
    space = LayerDropSpace(8, 2)
    s = make_strategy("random", space, np.random.default_rng(0), budget=10, batch_size=4)
    cands = s.ask()
    with pytest.raises(ValueError, match="4 candidates but 3 fitnesses"):
        s.tell(cands, [1.0, 2.0, 3.0])
    other = next(p for p in space.enumerate() if p not in cands)
    with pytest.raises(ValueError, match="not outstanding"):
        s.tell([other], [1.0])
    with pytest.raises(ValueError, match="twice"):
        s.tell([cands[0], cands[0]], [1.0, 1.0])
    s.tell(cands[:1], [float("nan")])  # NaN counts as the worst loss
    with pytest.raises(ValueError, match="not outstanding"):
        s.tell(cands[:1], [1.0])  # already told
    assert s.ask() == cands[1:]
    s.tell(cands[1:], [5.0, 4.0, 6.0])
    assert s.best == (cands[2], 4.0) and s.fitness_of(cands[0]) == math.inf
    json.dumps(s.state_dict(), allow_nan=False)  # inf is stored as strict JSON


def test_random_search_unique_and_capped_by_space():
    space = LayerDropSpace(7, 2)  # 21 patterns
    s = make_strategy("random", space, np.random.default_rng(0), budget=100, batch_size=8)
    asks, best, s = trajectory(s, synthetic(7)[0])
    flat = [k for a in asks for k in a]
    assert len(flat) == len(set(flat)) == 21 and s.done
    s = make_strategy("random", LayerDropSpace(20, 5), np.random.default_rng(0), budget=30, batch_size=8)
    asks, _, s = trajectory(s, synthetic(20)[0])
    assert [len(a) for a in asks] == [8, 8, 8, 6] and s.n_evaluations == 30


def test_registry():
    assert set(methods("layers")) == {"evo", "evop", "sleb", "shortgpt", "exhaustive", "random"}
    with pytest.raises(ValueError, match=r"unknown method 'evx' for --space layers \(choose from evo, evop, exhaustive, random, shortgpt, sleb\)"):
        make_strategy("evx", LayerDropSpace(8, 2), np.random.default_rng(0))
    assert set(methods("width")) == {"uniform", "owl", "evo", "self-pruner"}
    with pytest.raises(ValueError, match="searches --space width, got a layers space"):
        get_strategy("evo", "width")(LayerDropSpace(8, 2), np.random.default_rng(0))


def test_drive_returns_best():
    space = LayerDropSpace(8, 2)
    f, _ = synthetic(8)
    best = drive(make_strategy("exhaustive", space, np.random.default_rng(0)), f)
    assert best[0] == brute_force(space, f)


def test_search_core_does_not_import_torch():
    code = (
        "import sys; import evoprune.search as s, evoprune.spaces, evoprune.runner.config; "
        "[s.get_strategy(m, k) for k in s.SPACE_KINDS for m in s.methods(k)]; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
