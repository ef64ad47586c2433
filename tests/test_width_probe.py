"""Width evo's sensitivity probes (``--probe``): the probe vectors, the initial population they give,
and resume in the middle of probing. Torch-free."""
from __future__ import annotations

import numpy as np

from evoprune.search import make_strategy
from evoprune.search.width.evo import PROBE_STRENGTHS, probe_rates, probe_vector
from evoprune.spaces import WidthSpace

SPACE = WidthSpace(6, 0.3)


def _loss(g) -> float:
    # layer 2 is the fragile one: its rate costs 10x the others'
    r = np.asarray(g.rates)
    return float(r.sum() + 9.0 * r[2])


def test_probe_vector_and_rates():
    v = probe_vector(SPACE, 2, 0.3)
    assert SPACE.feasible(v) and v.rates[2] == 0.0 and all(abs(r - 0.36) < 1e-9 for i, r in enumerate(v.rates) if i != 2)
    losses = [5.0, 4.0, 1.0, 6.0, 3.0, 2.0]  # lower = protecting the layer helps more
    r = probe_rates(SPACE, losses, 0.2)
    assert SPACE.feasible(r)
    assert np.argsort(r.rates, kind="stable").tolist() == np.argsort(losses, kind="stable").tolist()
    assert abs(r.rates[2] - 0.1) < 1e-9 and abs(r.rates[3] - 0.5) < 1e-9


def _strategy(seed=0):
    return make_strategy("evo", SPACE, np.random.default_rng(seed), probe=0.3, population=8,
                         generations=2)


def test_probes_come_first_and_seed_the_population():
    s = _strategy()
    probes = s.ask()
    assert [g.key for g in probes] == [probe_vector(SPACE, i, 0.3).key for i in range(6)]
    s.tell(probes, [_loss(g) for g in probes])
    assert s.generation == 0  # probing is not a generation
    init = s.ask()
    keys = [g.key for g in init]
    assert keys[0] == SPACE.uniform().key
    for a in PROBE_STRENGTHS:
        assert probe_rates(SPACE, [_loss(g) for g in probes], a).key in keys
    assert len(init) == 8 and len(set(keys)) == 8 and all(SPACE.feasible(g) for g in init)
    assert all(s.origin_of(g) == "init" for g in init)


def test_resume_while_probing_is_identical():
    def run(cut):
        s, told = _strategy(3), 0
        while not s.done:
            cands = s.ask()
            if told == cut:
                state = s.state_dict()
                s = _strategy(3)
                s.load_state_dict(state)
                assert [c.key for c in s.ask()] == [c.key for c in cands]
            s.tell(cands, [_loss(g) for g in cands])
            told += 1
        return s.best[0].key, s.best[1], s.n_evaluations

    assert run(-1) == run(0) == run(1)
