"""The ``evo`` strategy: swap mutation, duplicate rejection, elitism, BI seeding, stages, resume, optimality."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from evoprune.spaces import DropPattern
from evoprune.search import make_strategy
from evoprune.search.layers.evo import EvoStrategy, Request  # noqa: F401  (registers "evo")
from evoprune.spaces import LayerDropSpace, SearchError


def _toy(n: int, seed: int):
    """Separable + pairwise fitness over dropped sets: sum w_i + sum_{i<j} J_ij."""
    r = np.random.default_rng(1000 + seed)
    w = r.normal(0, 1, n)
    J = np.triu(r.normal(0, 0.5, (n, n)), 1)

    def f(p: DropPattern) -> float:
        d = list(p.dropped)
        return float(w[d].sum() + sum(J[i, j] for i, j in itertools.combinations(d, 2)))

    return f, w


def _run(strategy, fitness, stage_noise=None, max_rounds=10_000):
    """Drive a (possibly multi-stage) strategy; returns every (key, stage) asked, in order."""
    asked = []
    for _ in range(max_rounds):
        reqs = strategy.ask()
        if not reqs:
            break
        fits = []
        for r in reqs:
            asked.append((r.key, r.stage))
            x = fitness(r.pattern)
            if stage_noise is not None and r.stage < strategy.last:
                x += stage_noise(r.pattern, r.stage)
            fits.append(x)
        strategy.tell(reqs, fits)
    return asked


def test_swap_mutation_keeps_k_and_feasibility():
    space = LayerDropSpace(12, 4, (0, 11))
    s = make_strategy("evo", space, np.random.default_rng(0))
    p = space.sample(np.random.default_rng(1))
    changed = 0
    for _ in range(500):
        c = s._swap(p)
        assert space.feasible(c) and c.k == 4
        changed += c != p  # two swaps may undo each other
    assert changed >= 450
    assert len({s._swap(p).key for _ in range(500)}) > 20
    one = [s._swap(p) for _ in range(2000)]  # half are a single swap: symmetric difference of 2 blocks
    single = sum(len(set(c.dropped) ^ set(p.dropped)) == 2 for c in one) / 2000
    assert 0.45 < single < 0.7


def test_no_duplicates_elitism_and_counts():
    f, _ = _toy(14, 0)
    space = LayerDropSpace(14, 3)
    s = make_strategy("evo", space, np.random.default_rng(5), generations=8, offspring=10, survivors=(3,))
    best_parent = []
    asked = []
    while not s.done:
        reqs = s.ask()
        if not reqs:
            break
        asked += [r.key for r in reqs]
        s.tell(reqs, [f(r.pattern) for r in reqs])
        if s.parents:
            best_parent.append(s.fitness_of(s.parents[0]))
    assert len(asked) == len(set(asked)) == s.n_evaluations
    assert s.generation == 8
    assert all(b <= a for a, b in zip(best_parent, best_parent[1:]))  # elitism: the best never gets worse
    assert s.best[1] == min(f(DropPattern(14, tuple(map(int, k.split(":d")[1].split(","))))) for k in asked)
    assert s.best[1] == best_parent[-1]
    assert len(asked) <= 10 * 8


def test_bi_seeding():
    space = LayerDropSpace(10, 3)
    scores = [0.9, 0.1, 0.8, 0.05, 0.7, 0.6, 0.2, 0.5, 0.4, 0.3]
    s = make_strategy("evo", space, np.random.default_rng(0), offspring=8, scores=scores, seed_fraction=0.5,
                      tokens_per_stage=None)
    assert s.cohort[0] == DropPattern(10, (1, 3, 6))  # ShortGPT: the 3 lowest scores
    low = {1, 3, 6, 9, 8}
    seeded = s.cohort[:4]
    assert sum(len(set(p.dropped) & low) for p in seeded) / (3 * 4) > 0.6
    assert len({p.key for p in s.cohort}) == 8
    with pytest.raises(SearchError):
        make_strategy("evo", space, np.random.default_rng(0), scores=[0.1] * 9)
    with pytest.raises(SearchError):
        make_strategy("evo", space, np.random.default_rng(0), survivors=(20, 1), offspring=8)
    with pytest.raises(SearchError):
        make_strategy("evo", space, np.random.default_rng(0), survivors=())


def test_multi_stage_promotion_and_memo():
    f, _ = _toy(14, 1)
    space = LayerDropSpace(14, 3)
    s = make_strategy("evo", space, np.random.default_rng(2), generations=5, offspring=12, survivors=(4, 2),
                      greedy_seed=False)
    noise = lambda p, st: 0.01 * (hash(p.key) % 7)  # noqa: E731 (deterministic "low-fidelity" error)
    asked = _run(s, f, noise)
    assert len(asked) == len(set(asked))
    by_stage = {st: [k for k, s_ in asked if s_ == st] for st in (0, 1)}
    assert set(by_stage[1]) <= set(by_stage[0])  # only stage-0 survivors reach the full stage
    # per cohort: 12 at stage 0 (first cohort may be smaller only if the space is small), 4 at stage 1
    assert len(by_stage[0]) == 12 * 5 and len(by_stage[1]) == 4 * 5
    assert s.best[1] == min(f(DropPattern(14, tuple(map(int, k.split(":d")[1].split(","))))) for k in by_stage[1])


@pytest.mark.parametrize("survivors", [(4,), (6, 2)])
def test_state_dict_roundtrip_mid_run(survivors):
    f, w = _toy(14, 2)
    space = LayerDropSpace(14, 3)
    opts = dict(generations=6, offspring=8, survivors=survivors, scores=tuple(w))
    ref = make_strategy("evo", space, np.random.default_rng(9), **opts)
    full = _run(ref, f)
    for cut in (1, 3, 7):
        s = make_strategy("evo", space, np.random.default_rng(9), **opts)
        asked = _run(s, f, max_rounds=cut)
        reqs = s.ask()
        if reqs:  # tell half a round, then snapshot
            s.tell(reqs[:1], [f(reqs[0].pattern)])
            asked.append((reqs[0].key, reqs[0].stage))
        state = json.loads(json.dumps(s.state_dict()))
        t = make_strategy("evo", space, np.random.default_rng(123), **opts)
        t.load_state_dict(state)
        asked += _run(t, f)
        assert asked == full
        assert t.best == ref.best
    with pytest.raises(SearchError):
        make_strategy("evo", space, np.random.default_rng(9), generations=7).load_state_dict(state)


def test_greedy_seeding_phase():
    """Multi-stage evo starts with a SLEB-like greedy pass: each step scores every candidate at stage 0, re-scores
    the best 2 (greedy_promote) at the full stage and keeps the best of those; the last step is the first cohort."""
    f, w = _toy(14, 3)
    lure = int(np.argmax(w))  # the worst block to drop; stage 0 is made to like it best
    f0 = (lambda p: f(p) - 100.0 * (lure in p.dropped))
    space = LayerDropSpace(14, 3)
    s = make_strategy("evo", space, np.random.default_rng(0), generations=3, offspring=8, survivors=(4, 2),
                      scores=tuple(w), greedy_promote=2, race_margin=0, greedy_screen=1)
    steps = []
    for _ in range(6):  # three greedy steps of two batches: 14, 13, 12 candidates at stage 0, 2 of each at stage 1
        reqs = s.ask()
        steps.append((len(reqs), {r.pattern.k for r in reqs}, {r.stage for r in reqs}))
        s.tell(reqs, [f0(r.pattern) if r.stage == 0 else f(r.pattern) for r in reqs])
    assert steps == [(14, {1}, {0}), (2, {1}, {1}), (13, {2}, {0}), (2, {2}, {1}), (12, {3}, {0}), (2, {3}, {1})]
    g = []
    for j in range(3):  # the full-fitness greedy, which never drops the lure
        g = min((sorted(g + [i]) for i in range(14) if i not in g and i != lure),
                key=lambda d: f(DropPattern(14, tuple(d))))
    assert s.fitness_of(DropPattern(14, tuple(g))) == f(DropPattern(14, tuple(g)))  # promoted at the last step
    # next: at most seed_fraction * offspring = 4 one-shot seeds at stage 0, then the stage-0 top 4 at full
    reqs = s.ask()
    assert {r.stage for r in reqs} == {0} and len(reqs) <= 4 and all(r.pattern.k == 3 for r in reqs)
    s.tell(reqs, [f0(r.pattern) for r in reqs])
    _run(s, f)
    assert s.best[1] <= f(DropPattern(14, tuple(g)))
    # without promotion the greedy follows the stage-0 lure
    t = make_strategy("evo", space, np.random.default_rng(0), generations=3, offspring=8, survivors=(4, 2),
                      greedy_promote=0)
    reqs = t.ask()
    t.tell(reqs, [f0(r.pattern) for r in reqs])
    nxt = t.ask()  # the greedy moves on when asked
    assert t.greedy == [lure] and {r.stage for r in nxt} == {0} and all(lure in r.dropped for r in nxt)


def test_finds_exhaustive_optimum():
    """N=14, k=3 (364 patterns): evo with <= 112 evaluations (31% of the space) finds the optimum in >= 19 of 20 seeds."""
    space = LayerDropSpace(14, 3)
    hits, evals = 0, []
    for seed in range(20):
        f, w = _toy(14, seed)
        opt = min(f(p) for p in space.enumerate())
        noisy = tuple(w + np.random.default_rng(seed).normal(0, 0.5, 14))  # an imperfect one-shot proxy
        s = make_strategy("evo", space, np.random.default_rng(seed), generations=14, offspring=8, survivors=(4,),
                          scores=noisy)
        _run(s, f)
        evals.append(s.n_evaluations)
        hits += s.best[1] == opt
    assert hits >= 19, hits
    assert max(evals) <= 112
