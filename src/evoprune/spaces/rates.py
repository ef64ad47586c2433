"""The width space of Self-Pruner-style search: one structured pruning rate per decoder layer.

Owns :class:`RateVector` (per-layer rates in ``[0, 1]`` on a 1e-5 grid, immutable,
with a stable key), :func:`repair_rates` / :func:`snap_rates` (projection onto the
budget and the grid) and :class:`WidthSpace` (mean rate fixed to the target
sparsity) with projection, sampling, mutation and crossover. Pure Python + numpy.

``RateVector`` invariant: every rate is a finite number in ``[0, 1]``, stored
rounded to 5 decimals (the precision the Self-Pruner prompts ask for), so
equal-looking vectors have equal keys.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import GenomeError, SearchError, as_int

__all__ = ["RateVector", "WidthSpace", "repair_rates", "snap_rates", "RATE_DECIMALS"]

RATE_DECIMALS = 5
_RATE_KEY = re.compile(r"W(\d+):([0-9.,]*)")

@dataclass(frozen=True, order=True)
class RateVector:
    """Per-layer width-pruning rates ``rates[i]`` in ``[0, 1]`` (0 = layer intact, 1 = all of its
    attention groups and MLP channels removed). Rounded to :data:`RATE_DECIMALS` on construction;
    raises :class:`GenomeError` for an empty vector, a non-finite or out-of-range rate.
    """

    rates: tuple[float, ...]

    def __post_init__(self) -> None:
        try:
            raw = tuple(float(r) for r in self.rates)
        except (TypeError, ValueError):
            raise GenomeError(f"rates must be numbers, got {self.rates!r}") from None
        if not raw:
            raise GenomeError("a rate vector needs at least one layer")
        bad = [r for r in raw if not (math.isfinite(r) and 0.0 <= r <= 1.0)]
        if bad:
            raise GenomeError(f"rates must be finite and in [0, 1], got {bad[:3]}")
        object.__setattr__(self, "rates", tuple(round(r, RATE_DECIMALS) + 0.0 for r in raw))

    @property
    def n_layers(self) -> int:
        return len(self.rates)

    @property
    def mean(self) -> float:
        """Average rate (the Self-Pruner constraint fixes it to the target sparsity)."""
        return math.fsum(self.rates) / len(self.rates)

    @property
    def key(self) -> str:
        """Stable key, e.g. ``"W3:0.10000,0.20000,0.30000"``."""
        return f"W{self.n_layers}:" + ",".join(f"{r:.{RATE_DECIMALS}f}" for r in self.rates)

    @classmethod
    def from_key(cls, key: str) -> "RateVector":
        m = _RATE_KEY.fullmatch(key)
        if not m:
            raise GenomeError(f"not a rate-vector key: {key!r}")
        rates = tuple(float(x) for x in m.group(2).split(",") if x)
        if len(rates) != int(m.group(1)):
            raise GenomeError(f"rate-vector key {key!r} lists {len(rates)} rates for {m.group(1)} layers")
        return cls(rates)

    def __str__(self) -> str:
        return self.key


_Q = 10 ** RATE_DECIMALS  # rates live on a grid of 1e-5


def repair_rates(rates: Sequence[float], beta: float, lo: float = 0.0, hi: float = 1.0) -> tuple[float, ...]:
    """Euclidean projection of ``rates`` onto ``{x : mean(x) = beta, lo <= x_i <= hi}``.

    The projection is ``clip(rates + t, lo, hi)`` for the shift ``t`` that hits the
    mean; ``sum(clip(rates + t))`` is piecewise linear in ``t``, so ``t`` is found
    exactly between its breakpoints. Returns the input unchanged when it already
    lies in the set (idempotent). Raises ``SearchError`` for an empty or non-finite
    input or ``beta`` outside ``[lo, hi]``.
    """
    r = np.asarray(rates, dtype=float)
    if r.ndim != 1 or r.size == 0 or not np.all(np.isfinite(r)):
        raise SearchError(f"repair_rates needs a non-empty vector of finite numbers, got {rates!r}")
    if not all(math.isfinite(float(v)) for v in (lo, hi, beta)) or not lo <= beta <= hi:
        raise SearchError(f"repair_rates needs lo <= beta <= hi, got lo={lo!r} beta={beta!r} hi={hi!r}")
    n, target = r.size, beta * r.size
    if np.all((r >= lo) & (r <= hi)) and abs(math.fsum(r) - target) <= 1e-12 * n:
        return tuple(float(v) for v in r)
    bps = np.unique(np.concatenate([lo - r, hi - r]))
    sums = np.array([np.clip(r + t, lo, hi).sum() for t in bps])  # nondecreasing from n*lo to n*hi
    i = int(np.searchsorted(sums, target))
    if i == 0:
        t = bps[0]
    else:
        i = min(i, len(bps) - 1)
        a, b, ga, gb = bps[i - 1], bps[i], sums[i - 1], sums[i]
        t = b if gb == ga else a + (target - ga) * (b - a) / (gb - ga)
    x = np.clip(r + t, lo, hi)
    free = (x > lo) & (x < hi)
    if free.any():  # absorb the float rounding of the shift in the unclipped coordinates
        x[free] = np.clip(x[free] + (target - math.fsum(x)) / free.sum(), lo, hi)
    return tuple(float(v) for v in x)


def snap_rates(x: Sequence[float], beta: float, lo: float = 0.0, hi: float = 1.0) -> tuple[float, ...]:
    """Put rates (already of mean ``beta`` within ``[lo, hi]``) on the 1e-5 grid of :class:`RateVector`:
    round each, then move the fewest entries one grid step (largest rounding loss first, staying
    inside the bounds) until ``sum = round(beta * n * 1e5)`` grid units, i.e. the mean is ``beta``."""
    scaled = np.asarray(x, dtype=float) * _Q
    lo_q, hi_q = int(math.ceil(lo * _Q - 1e-9)), int(math.floor(hi * _Q + 1e-9))
    units = np.clip(np.round(scaled), lo_q, hi_q).astype(np.int64)
    resid = int(round(beta * len(units) * _Q)) - int(units.sum())
    step = 1 if resid > 0 else -1
    while resid:
        moved = False
        for j in np.argsort(-(scaled - units) * step, kind="stable"):
            if resid == 0:
                break
            if lo_q <= units[j] + step <= hi_q:
                units[j] += step
                resid -= step
                moved = True
        if not moved:
            raise SearchError("cannot place the rates on the 1e-5 grid within the bounds")
    return tuple(float(u) / _Q for u in units)



@dataclass(frozen=True)
class WidthSpace:
    """Per-layer width-pruning rates with a fixed mean: ``len(r) == n_layers``, ``lo <= r_i <= hi``,
    ``|mean(r) - beta| <= tol`` (Self-Pruner's constraint; ``beta`` is the target sparsity of the
    decoder layers' prunable parameters when every layer has the same size).

    Validated on construction (:class:`SearchError`): ``n_layers >= 1``, ``0 < beta < 1``,
    ``0 <= lo <= beta <= hi <= 1``. Rates live on the 1e-5 grid of :class:`RateVector`;
    :meth:`project` lands exactly on ``sum = round(beta * n_layers * 1e5)`` grid units.
    """

    n_layers: int
    beta: float
    lo: float = 0.0
    hi: float = 1.0
    tol: float = 1e-4

    kind = "width"

    def __post_init__(self) -> None:
        n = as_int("n_layers", self.n_layers)
        if n < 1:
            raise SearchError(f"n_layers must be >= 1, got {n}")
        b, lo, hi = float(self.beta), float(self.lo), float(self.hi)
        if not 0.0 < b < 1.0:
            raise SearchError(f"sparsity (mean rate) must be in (0, 1), got {self.beta!r}")
        if not 0.0 <= lo <= b <= hi <= 1.0:
            raise SearchError(f"rate bounds must satisfy 0 <= lo <= sparsity <= hi <= 1, got lo={lo} hi={hi}")
        object.__setattr__(self, "n_layers", n)
        object.__setattr__(self, "beta", b)
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)

    def to_dict(self) -> dict:
        return {"kind": "width", "n_layers": self.n_layers, "beta": self.beta, "lo": self.lo, "hi": self.hi}

    def from_key(self, key: str) -> RateVector:
        return RateVector.from_key(key)  # a GenomeError is a SearchError

    def feasible(self, g: RateVector) -> bool:
        return (isinstance(g, RateVector) and g.n_layers == self.n_layers
                and all(self.lo - 1e-12 <= r <= self.hi + 1e-12 for r in g.rates)
                and abs(g.mean - self.beta) <= self.tol)

    def cost(self, g: RateVector) -> float:
        """Fraction of prunable parameters kept (equal-size layers): ``1 - mean(rates)``."""
        return 1.0 - g.mean

    def uniform(self) -> RateVector:
        """Every layer at ``beta`` (the uniform baseline)."""
        return self.project([self.beta] * self.n_layers)

    def project(self, rates: Sequence[float]) -> RateVector:
        """The feasible vector closest to ``rates``: the Euclidean projection onto ``{mean = beta,
        lo <= r_i <= hi}`` (:func:`repair_rates`), put on the 1e-5 grid (:func:`snap_rates`).
        Deterministic; a feasible grid vector maps to itself. :class:`SearchError` for a wrong
        length or a non-finite value."""
        if len(rates) != self.n_layers:
            raise SearchError(f"rate vector has {len(rates)} entries, model has {self.n_layers} layers")
        x = repair_rates(rates, self.beta, self.lo, self.hi)
        return RateVector(snap_rates(x, self.beta, self.lo, self.hi))

    def sample(self, rng: np.random.Generator, spread: float | None = None) -> RateVector:
        """A random feasible vector: ``beta + N(0, spread)`` per layer, projected
        (``spread`` defaults to ``min(beta - lo, hi - beta) / 2``)."""
        s = min(self.beta - self.lo, self.hi - self.beta) / 2 if spread is None else float(spread)
        return self.project(self.beta + rng.normal(0.0, max(s, 1e-6), self.n_layers))

    def mutate(self, g: RateVector, rng: np.random.Generator, step: float = 0.05, moves: int | None = None) -> RateVector:
        """Move rate between layers, keeping the mean exactly: ``moves`` times (default
        ``Geometric(1/2)``) pick layers ``i != j`` and shift ``d ~ U(0, step]`` (on the grid, at least
        one unit, limited by the bounds) from ``i`` to ``j``. May return ``g`` itself when no move fits."""
        q = np.round(np.asarray(g.rates) * _Q).astype(np.int64)
        lo_q, hi_q = int(math.ceil(self.lo * _Q - 1e-9)), int(math.floor(self.hi * _Q + 1e-9))
        m = int(rng.geometric(0.5)) if moves is None else int(moves)
        for _ in range(m):
            if self.n_layers < 2:
                break
            i, j = (int(v) for v in rng.choice(self.n_layers, size=2, replace=False))
            d = max(1, int(rng.uniform(0.0, step) * _Q))
            d = min(d, int(q[i]) - lo_q, hi_q - int(q[j]))
            if d > 0:
                q[i] -= d
                q[j] += d
        return RateVector(tuple(int(v) / _Q for v in q))

    def crossover(self, a: RateVector, b: RateVector, rng: np.random.Generator) -> RateVector:
        """Uniform crossover (each layer's rate from ``a`` or ``b`` with probability 1/2), projected."""
        take = rng.random(self.n_layers) < 0.5
        return self.project(np.where(take, np.asarray(a.rates), np.asarray(b.rates)))
