"""The sub-layer space: which attention and which MLP sub-layers of the decoder blocks are removed.

Owns :class:`SublayerPattern` (two sets of block indices, attention dropped and MLP dropped, with a
stable key) and :class:`SublayerSpace` (the budget: exactly ``k`` sub-layers, EvoPress's convention,
or a fraction of the blocks' parameters) with sampling, feasibility, enumeration, size and cost.
Pure Python + numpy; no torch.

Units: sub-layer ``u`` of an ``N``-block model is the attention of block ``u // 2`` (``u`` even) or its
MLP (``u`` odd), in forward order ``0 .. 2N - 1``. A block with both units dropped is a dropped block.

Parameter budget (``sparsity``): remove ``s`` of the sum of every block's attention and MLP
parameters (their projections, weights and biases; norms are not counted). Attention and MLP
differ in size (SmolLM2-135M: 0.885M vs 2.654M), so an exact match is generally impossible: a
pattern is feasible when its removed parameters are within half of the smallest unit of the target,
``|removed - s * total| <= min(unit sizes) / 2``. On a model whose MLP is a multiple of its attention
(SmolLM2: 3x) that is exact: ``s = 0.2`` removes 6 blocks' worth, e.g. 6 whole blocks, 24 attentions,
or 8 MLPs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from .base import GenomeError, SearchError, as_int

__all__ = ["SublayerPattern", "SublayerSpace", "unit_name"]

_KEY = re.compile(r"S(\d+):a([0-9,]*):m([0-9,]*)")


def unit_name(u: int) -> str:
    """``"attn 3"`` / ``"mlp 3"`` for unit ``u`` (display)."""
    return f"{'attn' if u % 2 == 0 else 'mlp'} {u // 2}"


def _indices(name: str, raw: Iterable[int], n: int) -> tuple[int, ...]:
    vals = tuple(int(i) for i in raw)
    if len(set(vals)) != len(vals):
        raise GenomeError(f"{name} block repeated: {sorted({i for i in vals if vals.count(i) > 1})}")
    bad = [i for i in vals if not 0 <= i < n]
    if bad:
        raise GenomeError(f"{name} block out of range: {bad} (model has {n} layers, valid 0..{n - 1})")
    return tuple(sorted(vals))


@dataclass(frozen=True, order=True)
class SublayerPattern:
    """Dropped attention and MLP sub-layers of an ``n_layers``-block model.

    ``attention`` / ``mlp``: sorted block indices whose attention / MLP is removed (normalised on
    construction). Invariant: indices unique and in range, and at least one sub-layer kept
    (:class:`GenomeError` otherwise).
    """

    n_layers: int
    attention: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = int(self.n_layers)
        if n < 1:
            raise GenomeError(f"n_layers must be >= 1, got {self.n_layers}")
        a, m = _indices("attention", self.attention, n), _indices("mlp", self.mlp, n)
        if len(a) == len(m) == n:
            raise GenomeError(f"cannot drop every sub-layer ({2 * n} of {2 * n})")
        object.__setattr__(self, "n_layers", n)
        object.__setattr__(self, "attention", a)
        object.__setattr__(self, "mlp", m)

    @classmethod
    def from_units(cls, n_layers: int, units: Iterable[int]) -> "SublayerPattern":
        """From dropped unit indices (``2i``: attention of block ``i``, ``2i + 1``: its MLP)."""
        us = [int(u) for u in units]
        bad = [u for u in us if not 0 <= u < 2 * n_layers]
        if bad:
            raise GenomeError(f"sub-layer unit out of range: {bad} (valid 0..{2 * n_layers - 1})")
        return cls(n_layers, tuple(u // 2 for u in us if u % 2 == 0), tuple(u // 2 for u in us if u % 2 == 1))

    @property
    def units(self) -> tuple[int, ...]:
        """Dropped unit indices, ascending."""
        return tuple(sorted([2 * i for i in self.attention] + [2 * i + 1 for i in self.mlp]))

    @property
    def k(self) -> int:
        """Number of dropped sub-layers."""
        return len(self.attention) + len(self.mlp)

    @property
    def blocks(self) -> tuple[int, ...]:
        """Blocks with both sub-layers dropped (removed whole)."""
        return tuple(sorted(set(self.attention) & set(self.mlp)))

    @property
    def first_unit(self) -> int:
        """First dropped unit (``2 * n_layers`` when nothing is dropped)."""
        u = self.units
        return u[0] if u else 2 * self.n_layers

    @property
    def key(self) -> str:
        """Stable key, e.g. ``"S30:a3,5:m5,12"``."""
        return f"S{self.n_layers}:a{','.join(map(str, self.attention))}:m{','.join(map(str, self.mlp))}"

    @classmethod
    def from_key(cls, key: str) -> "SublayerPattern":
        m = _KEY.fullmatch(str(key))
        if not m:
            raise GenomeError(f"not a sub-layer pattern key: {key!r}")
        ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
        return cls(int(m.group(1)), ints(m.group(2)), ints(m.group(3)))

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class SublayerSpace:
    """Drop attention / MLP sub-layers of ``n_layers`` blocks under one budget; ``protected`` blocks keep both.

    ``attn_params[i]`` / ``mlp_params[i]``: parameters of block ``i``'s attention / MLP (the unit sizes).
    Exactly one of ``k`` (sub-layers dropped) and ``sparsity`` (fraction of the total parameters, within
    half of the smallest unit; see the module docstring). Validated on construction
    (:class:`SearchError`): a budget that no pattern meets is refused there.
    """

    n_layers: int
    attn_params: tuple[int, ...]
    mlp_params: tuple[int, ...]
    k: int | None = None
    sparsity: float | None = None
    protected: tuple[int, ...] = ()

    kind = "sublayers"

    def __post_init__(self) -> None:
        n = as_int("n_layers", self.n_layers)
        if n < 1:
            raise SearchError(f"n_layers must be >= 1, got {n}")
        a = tuple(as_int("attention size", x) for x in self.attn_params)
        m = tuple(as_int("MLP size", x) for x in self.mlp_params)
        if len(a) != n or len(m) != n or min(a + m) < 1:
            raise SearchError(f"need {n} positive attention and MLP sizes, got {len(a)} and {len(m)}")
        prot = _indices("protected", self.protected, n)
        object.__setattr__(self, "n_layers", n)
        object.__setattr__(self, "attn_params", a)
        object.__setattr__(self, "mlp_params", m)
        object.__setattr__(self, "protected", prot)
        if (self.k is None) == (self.sparsity is None):
            raise SearchError("give exactly one of k (sub-layers to drop) and sparsity (fraction of parameters)")
        if self.k is not None:
            k = as_int("k", self.k)
            if not 0 < k < len(self.droppable):
                raise SearchError(f"cannot drop {k} sub-layers: choose 1..{len(self.droppable) - 1} "
                                  f"({len(self.droppable)} droppable of {2 * n})")
            object.__setattr__(self, "k", k)
        else:
            s = float(self.sparsity)
            if not 0.0 < s < 1.0:
                raise SearchError(f"sparsity must be in (0, 1), got {self.sparsity!r}")
            object.__setattr__(self, "sparsity", s)
            if not self._reachable():
                lo, hi = self.window
                raise SearchError(f"no sub-layer pattern removes {s:.1%} of the block parameters "
                                  f"({lo:,.0f}..{hi:,.0f} of {self.total:,}) with a sub-layer kept")

    # -- structure -------------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, ...]:
        """Parameters of every unit, in unit order."""
        return tuple(x for pair in zip(self.attn_params, self.mlp_params) for x in pair)

    @property
    def total(self) -> int:
        return sum(self.attn_params) + sum(self.mlp_params)

    @property
    def n_units(self) -> int:
        return 2 * self.n_layers

    @property
    def droppable(self) -> tuple[int, ...]:
        """Units that may be dropped (both units of unprotected blocks)."""
        p = set(self.protected)
        return tuple(u for u in range(self.n_units) if u // 2 not in p)

    @property
    def window(self) -> tuple[float, float]:
        """``(lo, hi)``: removed parameters a feasible pattern may have (parameter budget)."""
        if self.sparsity is None:
            raise SearchError("a count budget has no parameter window")
        tol = min(self.sizes) / 2
        t = self.sparsity * self.total
        return t - tol, t + tol

    def removed(self, units: Iterable[int]) -> int:
        """Parameters removed by dropping ``units``."""
        s = self.sizes
        return sum(s[u] for u in units)

    _MAX_STATES = 200_000  # distinct partial sums tracked; blocks of equal shapes give a few hundred

    def _reachable(self, units: Sequence[int] = ()) -> bool:
        lo, hi = self.window
        taken = set(units)
        sums = {self.removed(taken)}
        for u in self.droppable:
            if u in taken:
                continue
            sums |= {x + self.sizes[u] for x in sums if x + self.sizes[u] <= hi}
            if len(sums) > self._MAX_STATES:  # so many distinct sizes that a window of min/2 is surely hit
                return True
        return any(lo <= x <= hi for x in sums if x < self.total)

    def completable(self, units: Sequence[int]) -> bool:
        """Whether adding droppable units to ``units`` can meet the budget (greedy removal stays on a path
        that ends feasible)."""
        if self.k is not None:
            return len(set(units)) <= self.k
        return self.removed(units) <= self.window[1] and self._reachable(units)

    def from_key(self, key: str) -> SublayerPattern:
        return SublayerPattern.from_key(key)

    def to_dict(self) -> dict:
        return {"kind": "sublayers", "n_layers": self.n_layers, "k": self.k, "sparsity": self.sparsity,
                "protected": list(self.protected), "attn_params": list(self.attn_params),
                "mlp_params": list(self.mlp_params)}

    # -- membership --------------------------------------------------------------------
    def feasible_units(self, units: Sequence[int]) -> bool:
        """Whether dropping ``units`` (distinct, droppable) meets the budget."""
        if self.k is not None:
            return len(units) == self.k
        lo, hi = self.window
        return lo <= self.removed(units) <= hi

    def feasible(self, p: SublayerPattern) -> bool:
        return (isinstance(p, SublayerPattern) and p.n_layers == self.n_layers
                and not (set(p.attention) | set(p.mlp)) & set(self.protected) and self.feasible_units(p.units))

    def cost(self, p: SublayerPattern) -> float:
        """Fraction of the blocks' parameters kept (1.0 = dense); per-token matmul FLOPs scale with it."""
        return 1.0 - self.removed(p.units) / self.total

    # -- random operators ----------------------------------------------------------------
    def fill(self, units: Iterable[int], rng: np.random.Generator, avoid: Iterable[int] = ()) -> tuple[int, ...] | None:
        """Add random droppable units (not in ``avoid``) to ``units`` until the budget is met, never overshooting
        it; ``None`` when that does not reach it. ``units`` already over the budget come back ``None`` too."""
        out = set(int(u) for u in units)
        bad = out | set(int(u) for u in avoid)
        pool = [u for u in self.droppable if u not in bad]
        order = [pool[i] for i in rng.permutation(len(pool))] if pool else []
        if self.k is not None:
            need = self.k - len(out)
            if need < 0 or need > len(order):
                return None
            return tuple(sorted(out | set(order[:need])))
        lo, hi = self.window
        have = self.removed(out)
        for u in order:
            if have >= lo:
                break
            if have + self.sizes[u] <= hi:
                out.add(u)
                have += self.sizes[u]
        return tuple(sorted(out)) if lo <= have <= hi and len(out) < self.n_units else None

    def sample(self, rng: np.random.Generator) -> SublayerPattern:
        """A random feasible pattern (units added in a uniformly random order while they fit)."""
        for _ in range(1000):
            got = self.fill((), rng)
            if got is not None:
                return SublayerPattern.from_units(self.n_layers, got)
        raise SearchError("could not sample a pattern that meets the budget (1000 tries)")

    def enumerate(self) -> Iterator[SublayerPattern]:
        """Every feasible pattern (lexicographic in the dropped units); for small spaces."""
        units = self.droppable
        if self.k is not None:
            import itertools

            for combo in itertools.combinations(units, self.k):
                yield SublayerPattern.from_units(self.n_layers, combo)
            return
        lo, hi = self.window
        sizes = self.sizes

        def rec(i: int, chosen: list[int], have: int) -> Iterator[tuple[int, ...]]:
            if i == len(units):
                if lo <= have <= hi and len(chosen) < self.n_units:
                    yield tuple(chosen)
                return
            u = units[i]
            if have + sizes[u] <= hi:
                chosen.append(u)
                yield from rec(i + 1, chosen, have + sizes[u])
                chosen.pop()
            yield from rec(i + 1, chosen, have)

        for combo in sorted(rec(0, [], 0)):
            yield SublayerPattern.from_units(self.n_layers, combo)

    def size(self) -> int:
        """Number of feasible patterns (a parameter budget over very irregular sizes: at least ``2**62``, not
        counted)."""
        if self.k is not None:
            return math.comb(len(self.droppable), self.k)
        lo, hi = self.window
        counts: dict[tuple[int, int], int] = {(0, 0): 1}  # (removed, units) -> patterns
        for u in self.droppable:
            nxt = dict(counts)
            for (x, c), w in counts.items():
                y = x + self.sizes[u]
                if y <= hi:
                    nxt[(y, c + 1)] = nxt.get((y, c + 1), 0) + w
            counts = nxt
            if len(counts) > self._MAX_STATES:
                return 2 ** 62
        return sum(w for (x, c), w in counts.items() if lo <= x <= hi and c < self.n_units)
