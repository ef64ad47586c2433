"""LayerDropSpace: validation, sampling, repair ("double mutation"), enumeration, cost."""
from __future__ import annotations

import math

import numpy as np
import pytest

from evoprune.errors import UserError
from evoprune.spaces import DropPattern
from evoprune.spaces import LayerDropSpace, SearchError, k_from_sparsity


def test_search_error_is_value_error_and_user_error():
    assert issubclass(SearchError, ValueError) and issubclass(SearchError, UserError)


@pytest.mark.parametrize(
    "args, match",
    [
        ((10, 0), "k must be >= 1"),
        ((10, -1), "k must be >= 1"),
        ((10, 10), "fewer than the 10 droppable"),
        ((10, 8, (0, 9)), r"fewer than the 8 droppable blocks \(10 layers - 2 protected\)"),
        ((10, 3, (10,)), "protected layer out of range"),
        ((10, 3, (1, 1)), "protected layer repeated"),
        ((1, 1), "n_layers must be >= 2"),
        ((10, 2.5), "k must be an integer"),
        ((10, True), "k must be an integer"),
    ],
)
def test_validation(args, match):
    with pytest.raises(ValueError, match=match):
        LayerDropSpace(*args)


def test_normalises_protected_and_accepts_numpy_ints():
    s = LayerDropSpace(np.int64(8), np.int64(2), (7, 0))
    assert s.protected == (0, 7) and type(s.n_layers) is int and type(s.k) is int
    assert s.droppable == (1, 2, 3, 4, 5, 6) and s.n_droppable == 6
    assert s == LayerDropSpace(8, 2, (0, 7))  # frozen value type
    with pytest.raises(Exception):
        s.k = 3  # type: ignore[misc]


@pytest.mark.parametrize("n, s, k", [(30, 0.1, 3), (30, 0.2, 6), (30, 0.3, 9), (5, 0.5, 3), (24, 0.25, 6), (10, 0.04, 0)])
def test_k_from_sparsity_rounds_half_up(n, s, k):
    assert k_from_sparsity(n, s) == k


@pytest.mark.parametrize("s", [0.0, 1.0, -0.1, 1.5])
def test_k_from_sparsity_rejects_out_of_range(s):
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
        k_from_sparsity(30, s)


def test_from_sparsity_validates_resulting_k():
    assert LayerDropSpace.from_sparsity(30, 0.2).k == 6
    with pytest.raises(ValueError, match="k must be >= 1"):
        LayerDropSpace.from_sparsity(10, 0.04)


def test_feasible():
    s = LayerDropSpace(10, 3, (0,))
    assert s.feasible(DropPattern(10, (1, 2, 3)))
    assert not s.feasible(DropPattern(10, (1, 2)))  # too few
    assert not s.feasible(DropPattern(10, (1, 2, 3, 4)))  # too many
    assert not s.feasible(DropPattern(10, (0, 2, 3)))  # protected
    assert not s.feasible(DropPattern(11, (1, 2, 3)))  # other model
    assert not s.feasible((1, 2, 3))  # not a pattern


def test_sample_is_feasible_and_roughly_uniform():
    s = LayerDropSpace(12, 4, (0, 11))
    rng = np.random.default_rng(0)
    counts = np.zeros(12)
    trials = 4000
    for _ in range(trials):
        p = s.sample(rng)
        assert s.feasible(p)
        counts[list(p.dropped)] += 1
    assert counts[0] == counts[11] == 0
    freq = counts[1:11] / trials
    assert np.allclose(freq, 4 / 10, atol=0.04), freq


def test_repair_always_gives_exactly_k_never_protected():
    s = LayerDropSpace(16, 5, (0, 3, 15))
    rng = np.random.default_rng(1)
    for _ in range(3000):
        mask = (rng.random(16) < rng.random()).astype(int).tolist()
        p = s.repair(mask, rng)
        assert s.feasible(p), (mask, p)
        d = {i for i, x in enumerate(mask) if x and i not in s.protected}
        # Double mutation flips only as many positions as needed:
        if len(d) >= s.k:
            assert set(p.dropped) <= d
        else:
            assert set(p.dropped) >= d
    for mask in ([1] * 16, [0] * 16):  # extremes (all-dropped is not a DropPattern)
        assert s.feasible(s.repair(mask, rng))


def test_repair_accepts_patterns_and_leaves_feasible_ones_untouched():
    s = LayerDropSpace(10, 3)
    rng = np.random.default_rng(2)
    p = DropPattern(10, (2, 5, 7))
    before = rng.bit_generator.state
    assert s.repair(p, rng) == p
    assert rng.bit_generator.state == before  # consumed no randomness
    assert s.repair(DropPattern(10, (1,)), rng).k == 3
    with pytest.raises(ValueError, match="pattern has 9 layers"):
        s.repair([0] * 9, rng)


def test_size_and_enumerate():
    s = LayerDropSpace(9, 3, (4,))
    pats = list(s.enumerate())
    assert s.size() == math.comb(8, 3) == len(pats) == len({p.key for p in pats})
    assert all(s.feasible(p) for p in pats)
    assert pats == sorted(pats, key=lambda p: p.dropped)  # lexicographic
    assert LayerDropSpace(32, 8).size() == math.comb(32, 8)


def test_cost_is_fraction_kept():
    s = LayerDropSpace(10, 3)
    assert s.cost(DropPattern(10, (1, 2, 3))) == pytest.approx(0.7)
    assert s.to_dict() == {"kind": "layers", "n_layers": 10, "k": 3, "protected": []}
