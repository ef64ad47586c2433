"""Strategies of the sub-layer space on synthetic fitness functions (pure: no model)."""
from __future__ import annotations

import numpy as np
import pytest

from evoprune.search import drive, make_strategy
from evoprune.spaces import SearchError, SublayerPattern, SublayerSpace

N = 8
A, M = (1,) * N, (3,) * N  # SmolLM2's proportions: an MLP weighs three attentions


def _costs(seed=0):
    return np.random.default_rng(seed).uniform(0.1, 1.0, 2 * N)


def _fitness(costs, pair=0.4):
    """Additive costs plus a penalty for dropping both halves of a block (so whole blocks are not free)."""
    def f(r):
        p = getattr(r, "pattern", r)
        both = len(p.blocks)
        return float(sum(costs[u] for u in p.units) + pair * both)
    return f


def _optimum(space, f):
    return min((f(p), p.key) for p in space.enumerate())


@pytest.mark.parametrize("budget", [dict(k=5), dict(sparsity=0.25)])
def test_evo_stays_feasible_and_finds_the_optimum(budget):
    sp = SublayerSpace(N, A, M, **budget)
    hits = 0
    for seed in range(4):
        f = _fitness(_costs(seed))
        asked = []

        def g(r, f=f):
            asked.append(r.pattern)
            return f(r)

        s = make_strategy("evo", sp, np.random.default_rng(seed), generations=30, offspring=12)
        best = drive(s, g)
        assert all(sp.feasible(p) for p in asked) and len({p.key for p in asked}) == len(asked)
        hits += best[1] == pytest.approx(_optimum(sp, f)[0])
    assert hits == 4, hits  # 30 x 12 evaluations of a space of 1,233 or 4,368 patterns


def test_evo_moves_cross_kinds_under_a_parameter_budget():
    sp = SublayerSpace(N, A, M, sparsity=0.25)  # 8 units of 32: e.g. 2 MLP + 2 attention, or 8 attention
    s = make_strategy("evo", sp, np.random.default_rng(0), generations=2, offspring=40)
    mixes = {(len(p.attention), len(p.mlp)) for p in s.cohort}
    s.parents = [SublayerPattern(N, (0, 1, 2, 3, 4), (7,))]  # 5 attentions + 1 MLP
    kids = [s._child(s.parents[0]) for _ in range(300)]
    assert all(k is None or sp.feasible(k) for k in kids)
    kinds = {(len(k.attention), len(k.mlp)) for k in kids if k is not None}
    assert {(5, 1), (8, 0), (2, 2)} <= kinds, kinds  # same-kind swaps, MLP -> 3 attentions, 3 attentions -> MLP
    assert len(mixes) >= 2


def test_scores_seed_the_initial_cohort():
    sp = SublayerSpace(N, A, M, k=4)
    scores = tuple(float(u) for u in range(2 * N))  # unit 0 the most droppable
    s = make_strategy("evo", sp, np.random.default_rng(0), scores=scores, offspring=8)
    assert s.cohort[0].units == (0, 1, 2, 3)
    with pytest.raises(SearchError, match="16 entries"):
        make_strategy("evo", sp, np.random.default_rng(0), scores=(1.0,) * N)


def test_greedy_is_optimal_for_additive_costs_and_never_overshoots():
    costs = _costs(3)
    f = _fitness(costs, pair=0.0)
    sp = SublayerSpace(N, A, M, k=5)
    best = drive(make_strategy("greedy", sp, np.random.default_rng(0)), f)
    assert best[1] == pytest.approx(_optimum(sp, f)[0])
    with pytest.raises(SearchError, match="last --survivors-per-stage must be 1"):
        make_strategy("greedy", sp, np.random.default_rng(0), tokens_per_stage=(10, 100), survivors=(4, 2))
    sp = SublayerSpace(N, A, M, sparsity=0.25)
    asked = []
    s = make_strategy("greedy", sp, np.random.default_rng(0))
    best = drive(s, lambda r: asked.append(r.pattern) or f(r))
    assert sp.feasible(best[0]) and s.generation == len(s.removal_order) and set(s.removal_order) == set(best[0].units)
    # screening on a cheap stage, the best 2 re-scored: the same answer here (the stage-0 fitness is the same)
    two = make_strategy("greedy", sp, np.random.default_rng(0), tokens_per_stage=(10, 100), survivors=(2, 1))
    assert drive(two, lambda r: f(r.pattern)) == best
    lo, hi = sp.window
    assert all(sp.removed(p.units) <= hi and sp.completable(p.units) for p in asked)


def test_random_and_exhaustive():
    sp = SublayerSpace(4, (1,) * 4, (3,) * 4, sparsity=0.25)
    f = _fitness(_costs(1)[:8])
    ex = make_strategy("exhaustive", sp, np.random.default_rng(0))
    assert drive(ex, f)[1] == pytest.approx(_optimum(sp, f)[0]) and ex.n_evaluations == sp.size() == 17
    rs = make_strategy("random", sp, np.random.default_rng(0), budget=10)
    drive(rs, f)
    assert rs.n_evaluations == 10
    big = SublayerSpace(30, (1,) * 30, (3,) * 30, sparsity=0.2)
    with pytest.raises(SearchError, match="sub-layer patterns that drop 20% of the parameters"):
        make_strategy("exhaustive", big, np.random.default_rng(0))


def test_evo_resumes_from_its_state():
    sp = SublayerSpace(N, A, M, sparsity=0.25)
    f = _fitness(_costs(2))
    ref = make_strategy("evo", sp, np.random.default_rng(5), generations=6, offspring=8)
    drive(ref, f)
    a = make_strategy("evo", sp, np.random.default_rng(5), generations=6, offspring=8)
    drive(a, f, max_rounds=3)
    state = a.state_dict()
    b = make_strategy("evo", sp, np.random.default_rng(99), generations=6, offspring=8)
    b.load_state_dict(state)
    drive(b, f)
    assert b.best == ref.best and b.n_evaluations == ref.n_evaluations


def test_a_block_start_leads_the_cohort_and_sets_the_budget():
    sp = SublayerSpace(N, A, M, sparsity=0.25)  # 8 of 32 units' weight: two whole blocks
    start = {"dropped_layers": [2, 5], "calib_loss": 4.0, "token_layers": 1000}
    s = make_strategy("evo", sp, np.random.default_rng(0), start=start, offspring=8)
    assert s.cohort[0].units == (4, 5, 10, 11) and len(s.cohort) == 8
    assert all(sp.feasible(p) for p in s.cohort)
    # its children: a few moves away from the start, never the random patterns of a cold start
    assert all(len(set(p.units) ^ set(s.cohort[0].units)) <= 2 * 8 for p in s.cohort)
    assert s.default_budget((100,)) == 2000 and s.result_extras()["start"]["dropped_layers"] == [2, 5]
    # the best of a run is never worse than its start: it is scored first and kept while unbeaten
    f = _fitness(_costs(1))
    best = drive(make_strategy("evo", sp, np.random.default_rng(0), start=start, generations=5, offspring=8), f)
    assert best[1] <= f(SublayerPattern.from_units(N, (4, 5, 10, 11)))
    # a window between block sizes: the start's sub-layers first, then the rest by scores
    sp = SublayerSpace(N, A, M, sparsity=0.22)  # 7.04 of 32: one block (4) and three attentions
    scores = tuple(float(u) for u in range(2 * N))
    s = make_strategy("evo", sp, np.random.default_rng(0), start=start, scores=scores, offspring=4)
    assert s.cohort[0].units == (0, 2, 4, 5, 10)  # block 2, the attention of block 5 (its MLP overshoots), then the attentions of blocks 0, 1
    # no start: the cold start of before, no default budget
    assert make_strategy("evo", sp, np.random.default_rng(0)).default_budget((100,)) is None
    with pytest.raises(SearchError, match="start must have"):
        make_strategy("evo", sp, np.random.default_rng(0), start={"calib_loss": 1.0})


def test_the_start_is_promoted_through_every_stage():
    sp = SublayerSpace(N, A, M, sparsity=0.25)
    start = {"dropped_layers": [2, 5], "calib_loss": 4.0, "token_layers": 1000}
    s = make_strategy("evo", sp, np.random.default_rng(0), start=start, offspring=8, generations=2,
                      tokens_per_stage=(10, 100), survivors=(2, 2))
    first = s.ask()
    assert len(first) == 8 and {r.stage for r in first} == {0}
    s.tell(first, [100.0 if r.key == s.start_genome.key else float(i) for i, r in enumerate(first)])  # worst cheap
    promoted = s.ask()
    assert {r.stage for r in promoted} == {1} and len(promoted) == 3
    assert s.start_genome.key in {r.key for r in promoted}
