"""Width evo's sensitivity rounds (``--probe``): probes, commits, the population they seed, staged requests
and resume in the middle of a round. Torch-free."""
from __future__ import annotations

import numpy as np
import pytest

from evoprune.search import make_strategy
from evoprune.search.staged import Request
from evoprune.search.width.sensitivity import commit, probe_of
from evoprune.spaces import RateVector, SearchError, WidthSpace

SPACE = WidthSpace(6, 0.3)


def _loss(g) -> float:
    # layer 2 is the fragile one: its rate costs 10x the others'
    r = np.asarray(g.rates)
    return float(r.sum() + 9.0 * r[2])


def test_probe_of_and_commit():
    base = SPACE.uniform()
    p = probe_of(SPACE, base, 2, 0.25)
    assert p.rates[2] == pytest.approx(0.05) and [r for i, r in enumerate(p.rates) if i != 2] == [0.3] * 5
    assert not SPACE.feasible(p)  # a measurement, below the target
    assert probe_of(SPACE, base, 2, 1.0).rates[2] == SPACE.lo  # capped at the lower bound
    v = commit(SPACE, probe_of(SPACE, base, 2, 1.0), 2)
    assert SPACE.feasible(v) and v.rates[2] == SPACE.lo
    assert all(r == pytest.approx(0.36, abs=0.01) for i, r in enumerate(v.rates) if i != 2)
    w = commit(SPACE, probe_of(SPACE, v, 4, 1.0), 4, fixed=[2])  # layer 2 stays where the first round put it
    assert SPACE.feasible(w) and w.rates[2] == SPACE.lo and w.rates[4] == SPACE.lo
    assert probe_of(SPACE, w, 2, 1.0) is None  # at the bound: nothing to probe
    with pytest.raises(SearchError):  # five layers at 0: the last would need rate 1.8
        commit(SPACE, RateVector((0.0, 0.0, 0.0, 0.0, 0.0, 1.0)), 4, fixed=[0, 1, 2, 3])


def _strategy(seed=0, **kw):
    return make_strategy("evo", SPACE, np.random.default_rng(seed), **{
        "tokens_per_stage": None, "population": 4, "mutations": 4, "crossovers": 0, "generations": 2, **kw})


def test_rounds_move_the_fragile_layer_then_seed_the_population():
    s = _strategy()
    first = s.ask()
    assert first[0].key == SPACE.uniform().key and len(first) == 7  # the vector and one probe per layer
    assert [s.origin_of(g) for g in first] == ["init"] + ["probe"] * 6
    s.tell(first, [_loss(g) for g in first])
    assert s.generation == 0  # rounds are not generations
    second = s.ask()
    assert second[0].rates[2] == SPACE.lo and SPACE.feasible(second[0])  # layer 2 moved and kept there
    assert len(second) == 6 and all(g.rates[2] == SPACE.lo for g in second)  # layer 2 is not probed again
    s.tell(second, [_loss(g) for g in second])
    # lowering another layer now helps by 0.3 - 0.3/4 nats (its rate moves to the others): above probe_gain,
    # so rounds go on until probe_rounds (4) or no gain
    while s._probing:
        c = s.ask()
        s.tell(c, [_loss(g) for g in c])
    init = s.ask()
    # four rounds each moved a layer; the last one's vector is not scored yet: it heads the initial population
    assert s._rounds == 4 and len(s._moved) == 4 and s.population == [] and init[0].key == s._base.key
    assert all(SPACE.feasible(g) for g in init) and init[0].rates[2] == SPACE.lo
    assert len(init) == len({g.key for g in init}) == 4 and all(s.origin_of(g) == "init" for g in init)


def test_rounds_end_without_gain_and_probe_zero_skips_them():
    s = _strategy(probe_gain=100.0)  # no probe can gain 100 nats: one round, nothing moved
    c = s.ask()
    s.tell(c, [_loss(g) for g in c])
    init = s.ask()
    # one stage: the round's vector is scored on the whole set already; it joins the population unasked
    assert s._moved == [] and not s._probing and [g.key for g in s.population] == [SPACE.uniform().key]
    assert len(init) == 3 and SPACE.uniform().key not in {g.key for g in init}
    t = _strategy(probe=0.0)
    assert all(t.origin_of(g) == "init" for g in t.ask())  # straight to the initial population


def test_staged_rounds_ask_the_first_stage():
    s = _strategy(tokens_per_stage=(64, 512), promote=2)
    c = s.ask()
    assert all(isinstance(r, Request) and r.stage == 0 for r in c)
    s.tell(c, [_loss(r.pattern) for r in c])
    c2 = s.ask()
    assert all(r.stage == 0 for r in c2) and c2[0].pattern.rates[2] == SPACE.lo


def _run(cut: int, **kw):
    """The whole search, saved and restored right after the ``cut``-th ask (-1: never)."""
    s, told, keys = _strategy(3, **kw), 0, []
    while not s.done:
        cands = s.ask()
        if told == cut:
            state = s.state_dict()
            s = _strategy(3, **kw)
            s.load_state_dict(state)
            assert [c.key for c in s.ask()] == [c.key for c in cands]
        keys.append([c.key for c in cands])
        s.tell(cands, [_loss(getattr(c, "pattern", c)) for c in cands])
        told += 1
    return keys, s.best[0].key, s.best[1], s.n_evaluations


@pytest.mark.parametrize("kw", [{}, {"tokens_per_stage": (64, 512), "promote": 2}])
def test_resume_while_probing_is_identical(kw):
    ref = _run(-1, **kw)
    assert ref[0][0][0] == SPACE.uniform().key
    for cut in (0, 1, 2, 4):
        assert _run(cut, **kw) == ref
