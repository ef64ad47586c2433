"""The layer-drop search space: which ``DropPattern``s a search may propose.

Owns :class:`LayerDropSpace` (drop exactly ``k`` of ``n_layers`` decoder
blocks, never a protected one) with its sampling, feasibility check, repair
("double mutation" in EvoP), enumeration and cost; :class:`WidthSpace` (one
width-pruning rate per layer, mean fixed to the target sparsity, as in
Self-Pruner) with projection, sampling, mutation and crossover; and
:class:`SearchError`, the error every bad search argument raises. Pure Python +
numpy; no torch.

All randomness comes from an explicit ``np.random.Generator`` argument so a
search is reproducible from its seed and resumable from its generator state.
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .errors import UserError
from .genome import RATE_DECIMALS, DropPattern, GenomeError, RateVector

__all__ = ["LayerDropSpace", "WidthSpace", "SearchError", "k_from_sparsity", "repair_rates", "snap_rates"]


class SearchError(UserError, ValueError):
    """Invalid search-space or strategy argument.

    A ``ValueError`` (the library contract) and a ``UserError`` (so the CLI
    prints one line and exits 2 without extra wrapping).
    """


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise SearchError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise SearchError(f"{name} must be an integer, got {value!r}") from None


def k_from_sparsity(n_layers: int, sparsity: float) -> int:
    """Number of blocks to drop for a sparsity in (0, 1): ``k = floor(s*N + 0.5)``.

    Round half up (not Python's banker's rounding), with a tiny tolerance so
    that e.g. 0.1 * 30 = 3.0000000000000004 gives 3. Raises :class:`SearchError`
    when ``sparsity`` is outside (0, 1); the resulting ``k`` is validated by
    :class:`LayerDropSpace`.
    """
    s = float(sparsity)
    if not 0.0 < s < 1.0:
        raise SearchError(f"sparsity must be in (0, 1), got {sparsity!r}")
    return int(math.floor(s * n_layers + 0.5 + 1e-9))


@dataclass(frozen=True)
class LayerDropSpace:
    """Drop exactly ``k`` of ``n_layers`` blocks; ``protected`` blocks are never dropped.

    Validated on construction (raises :class:`SearchError`, a ``ValueError``):
    ``n_layers >= 2``; protected indices unique and in ``[0, n_layers)``;
    ``0 < k < n_layers - len(protected)`` (dropping every droppable block would
    leave nothing to search). ``protected`` is normalised to a sorted tuple.
    """

    n_layers: int
    k: int
    protected: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = _as_int("n_layers", self.n_layers)
        k = _as_int("k", self.k)
        if n < 2:
            raise SearchError(f"n_layers must be >= 2, got {n}")
        prot = tuple(_as_int("protected layer", i) for i in self.protected)
        if len(set(prot)) != len(prot):
            raise SearchError(f"protected layer repeated: {sorted(i for i in set(prot) if prot.count(i) > 1)}")
        bad = [i for i in prot if not 0 <= i < n]
        if bad:
            raise SearchError(f"protected layer out of range: {bad} (model has {n} layers, valid 0..{n - 1})")
        n_droppable = n - len(prot)
        if k < 1:
            raise SearchError(f"number of dropped blocks k must be >= 1, got {k}")
        if k >= n_droppable:
            raise SearchError(
                f"k={k} dropped blocks must be fewer than the {n_droppable} droppable blocks "
                f"({n} layers - {len(prot)} protected)"
            )
        object.__setattr__(self, "n_layers", n)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "protected", tuple(sorted(prot)))

    @classmethod
    def from_sparsity(cls, n_layers: int, sparsity: float, protected: Sequence[int] = ()) -> "LayerDropSpace":
        """Space with ``k = k_from_sparsity(n_layers, sparsity)``; see :func:`k_from_sparsity`."""
        return cls(n_layers, k_from_sparsity(n_layers, sparsity), tuple(protected))

    # -- structure -----------------------------------------------------------------

    @property
    def droppable(self) -> tuple[int, ...]:
        """Block indices that may be dropped, ascending."""
        p = set(self.protected)
        return tuple(i for i in range(self.n_layers) if i not in p)

    @property
    def n_droppable(self) -> int:
        return self.n_layers - len(self.protected)

    def size(self) -> int:
        """Number of feasible patterns, ``C(n_droppable, k)``."""
        return math.comb(self.n_droppable, self.k)

    kind = "layers"

    def from_key(self, key: str) -> DropPattern:
        """The pattern with this ``DropPattern.key`` (for state files and history rows)."""
        try:
            return DropPattern.from_key(key)
        except GenomeError as e:
            raise SearchError(str(e)) from None

    def to_dict(self) -> dict:
        """JSON-serializable description (used to check a resumed run matches)."""
        return {"kind": "layers", "n_layers": self.n_layers, "k": self.k, "protected": list(self.protected)}

    # -- membership ----------------------------------------------------------------

    def feasible(self, p: DropPattern) -> bool:
        """True iff ``p`` is for this model, drops exactly ``k`` blocks, and none protected."""
        return (
            isinstance(p, DropPattern)
            and p.n_layers == self.n_layers
            and p.k == self.k
            and not set(p.dropped) & set(self.protected)
        )

    def cost(self, p: DropPattern) -> float:
        """Fraction of blocks kept (1.0 = dense); proportional to per-token compute."""
        if p.n_layers != self.n_layers:
            raise SearchError(f"pattern is for {p.n_layers} layers, space has {self.n_layers}")
        return len(p.kept) / self.n_layers

    # -- random operators --------------------------------------------------------------

    def sample(self, rng: np.random.Generator) -> DropPattern:
        """Uniformly random feasible pattern (``k`` distinct droppable blocks)."""
        chosen = rng.choice(np.asarray(self.droppable), size=self.k, replace=False)
        return DropPattern(self.n_layers, tuple(int(i) for i in chosen))

    def repair(self, p: DropPattern | Sequence[int], rng: np.random.Generator) -> DropPattern:
        """Make a pattern feasible: EvoP's "double mutation".

        ``p`` is a ``DropPattern`` or a 0/1 mask of length ``n_layers`` (a mask
        may drop every block, which a ``DropPattern`` cannot represent, so
        crossover/mutation output can be passed here directly). Protected
        blocks are un-dropped first; then, while too many blocks are dropped,
        uniformly random dropped ones are restored, and while too few, uniformly
        random kept droppable ones are dropped. A pattern already feasible is
        returned unchanged and consumes no randomness.
        """
        mask = list(p.mask) if isinstance(p, DropPattern) else [int(bool(x)) for x in p]
        if len(mask) != self.n_layers:
            raise SearchError(f"pattern has {len(mask)} layers, space has {self.n_layers}")
        prot = set(self.protected)
        dropped = [i for i, x in enumerate(mask) if x and i not in prot]
        if len(dropped) > self.k:
            # Restore len-k dropped blocks, chosen uniformly at random.
            undo = rng.choice(np.asarray(dropped), size=len(dropped) - self.k, replace=False)
            dropped = sorted(set(dropped) - {int(i) for i in undo})
        elif len(dropped) < self.k:
            d = set(dropped)
            kept = [i for i in self.droppable if i not in d]
            add = rng.choice(np.asarray(kept), size=self.k - len(dropped), replace=False)
            dropped = sorted(d | {int(i) for i in add})
        return DropPattern(self.n_layers, tuple(dropped))

    def enumerate(self) -> Iterator[DropPattern]:
        """All feasible patterns, in lexicographic order of their dropped indices."""
        for combo in itertools.combinations(self.droppable, self.k):
            yield DropPattern(self.n_layers, combo)


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
        n = _as_int("n_layers", self.n_layers)
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
        try:
            return RateVector.from_key(key)
        except GenomeError as e:
            raise SearchError(str(e)) from None

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
