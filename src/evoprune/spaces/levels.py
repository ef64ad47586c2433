"""The level search space of DarwinLM-style search: a compression level per block for attention and MLP.

Owns :class:`LevelSpace`: which level vectors meet the
parameter budget, the "uniform" starting point, DarwinLM's level-switch
mutation and random sampling. Pure Python + numpy (no torch); what a level
removes comes in as parameter counts (from :func:`evoprune.prune.levels_db.level_ladders`
and the model's structure sizes), so the space knows budgets, not weights.

Budget. Level ``a`` of an attention unit removes ``attn_params[a]`` parameters,
level ``m`` of an MLP unit ``mlp_params[m]`` (the same ladder in every block;
index 0 = nothing removed). A vector removes ``R = sum_i attn_params[a_i] +
mlp_params[m_i]`` of the blocks' ``total`` prunable parameters. It is feasible
when ``|R - sparsity * total| <= tol``, with ``tol`` half of the largest single
level step (so some vector is always within it). With ``separate=True`` the
attention and MLP pools each meet their own budget (``sparsity`` of each pool's
parameters, each with its own ``tol``), as when DarwinLM keeps attention and MLP
apart.

Level-switch mutation (DarwinLM): ``flips`` times, one unit's level goes up by one
and another unit's goes down by one (both in the same pool when the budgets are
separate), so the parameter budget stays (nearly) fixed; a child outside the
budget or equal to its parent is redrawn.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .base import GenomeError, SearchError, as_int

__all__ = ["LevelVector", "LevelSpace"]

_LEVEL_KEY = re.compile(r"V(\d+):a([0-9,]*);m([0-9,]*)")
_KINDS = ("attn", "mlp")

@dataclass(frozen=True, order=True)
class LevelVector:
    """Per-block compression levels: ``attn[i]`` of block ``i``'s attention, ``mlp[i]`` of its MLP
    (0 = intact). Raises :class:`GenomeError` for empty or unequal tuples or a negative level."""

    attn: tuple[int, ...]
    mlp: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            a, m = tuple(int(x) for x in self.attn), tuple(int(x) for x in self.mlp)
        except (TypeError, ValueError):
            raise GenomeError(f"levels must be integers, got {self.attn!r}, {self.mlp!r}") from None
        if not a or len(a) != len(m):
            raise GenomeError(f"need one attention and one MLP level per block, got {len(a)} and {len(m)}")
        if min(a + m) < 0:
            raise GenomeError(f"levels must be >= 0, got {min(a + m)}")
        object.__setattr__(self, "attn", a)
        object.__setattr__(self, "mlp", m)

    @property
    def n_layers(self) -> int:
        return len(self.attn)

    @property
    def key(self) -> str:
        """Stable key, e.g. ``"V3:a1,0,2;m3,3,2"``."""
        return f"V{self.n_layers}:a" + ",".join(map(str, self.attn)) + ";m" + ",".join(map(str, self.mlp))

    @classmethod
    def from_key(cls, key: str) -> "LevelVector":
        m = _LEVEL_KEY.fullmatch(key)
        if not m:
            raise GenomeError(f"not a level-vector key: {key!r}")
        a = tuple(int(x) for x in m.group(2).split(",") if x)
        b = tuple(int(x) for x in m.group(3).split(",") if x)
        if len(a) != int(m.group(1)):
            raise GenomeError(f"level-vector key {key!r} lists {len(a)} levels for {m.group(1)} blocks")
        return cls(a, b)

    def __str__(self) -> str:
        return self.key

@dataclass(frozen=True)
class LevelSpace:
    """Level vectors of ``n_layers`` blocks under a parameter budget (see the module docstring).

    Validated on construction (:class:`SearchError`): ``n_layers >= 1``; both
    ladders start at 0 and increase; ``0 < sparsity < 1``; ``total`` at least
    what the top levels remove.
    """

    n_layers: int
    attn_params: tuple[int, ...]
    mlp_params: tuple[int, ...]
    sparsity: float
    total: int
    separate: bool = False

    kind = "levels"

    def __post_init__(self) -> None:
        n = as_int("n_layers", self.n_layers)
        if n < 1:
            raise SearchError(f"n_layers must be >= 1, got {n}")
        for name in ("attn_params", "mlp_params"):
            lad = tuple(int(x) for x in getattr(self, name))
            if len(lad) < 2 or lad[0] != 0 or any(b <= a for a, b in zip(lad, lad[1:])):
                raise SearchError(f"{name} must start at 0 and increase, got {lad}")
            object.__setattr__(self, name, lad)
        s = float(self.sparsity)
        if not 0.0 < s < 1.0:
            raise SearchError(f"sparsity must be in (0, 1), got {self.sparsity!r}")
        if int(self.total) < n * (self.attn_params[-1] + self.mlp_params[-1]):
            raise SearchError(f"total {self.total} is less than the levels can remove")
        object.__setattr__(self, "n_layers", n)
        object.__setattr__(self, "sparsity", s)
        object.__setattr__(self, "total", int(self.total))
        object.__setattr__(self, "separate", bool(self.separate))

    # -- budget ----------------------------------------------------------------------
    def _ladder(self, kind: str) -> tuple[int, ...]:
        return self.attn_params if kind == "attn" else self.mlp_params

    def max_level(self, kind: str) -> int:
        return len(self._ladder(kind)) - 1

    def _step(self, kind: str) -> int:
        lad = self._ladder(kind)
        return max(b - a for a, b in zip(lad, lad[1:]))

    def pools(self) -> tuple[tuple[tuple[str, ...], float, float], ...]:
        """``((kinds, target removed parameters, tolerance), ...)``: one joint pool or one per kind."""
        if self.separate:
            return tuple(((k,), self.sparsity * self.n_layers * self._ladder(k)[-1], self._step(k) / 2)
                         for k in _KINDS)
        return ((_KINDS, self.sparsity * self.total, max(self._step(k) for k in _KINDS) / 2),)

    def removed(self, g: LevelVector, kinds=_KINDS) -> int:
        """Parameters ``g`` removes in the units of ``kinds``."""
        out = 0
        if "attn" in kinds:
            out += sum(self.attn_params[a] for a in g.attn)
        if "mlp" in kinds:
            out += sum(self.mlp_params[m] for m in g.mlp)
        return out

    def _in_range(self, g: LevelVector) -> bool:
        return (g.n_layers == self.n_layers and max(g.attn) <= self.max_level("attn")
                and max(g.mlp) <= self.max_level("mlp"))

    def feasible(self, g: LevelVector) -> bool:
        return (isinstance(g, LevelVector) and self._in_range(g)
                and all(abs(self.removed(g, kinds) - t) <= tol + 1e-9 for kinds, t, tol in self.pools()))

    def cost(self, g: LevelVector) -> float:
        """Fraction of the blocks' prunable parameters kept."""
        return 1.0 - self.removed(g) / self.total

    def to_dict(self) -> dict:
        return {"kind": "levels", "n_layers": self.n_layers, "attn_params": list(self.attn_params),
                "mlp_params": list(self.mlp_params), "sparsity": self.sparsity, "total": self.total,
                "separate": self.separate}

    def from_key(self, key: str) -> LevelVector:
        return LevelVector.from_key(key)  # a GenomeError is a SearchError

    # -- points ----------------------------------------------------------------------
    def _spread(self, kind: str, target: float) -> list[int]:
        """Levels of one kind's ``n`` units removing as close to ``target`` as the ladder allows, every unit
        at level ``l`` or ``l + 1`` (the ``l + 1`` units spread evenly over the blocks)."""
        lad, n = self._ladder(kind), self.n_layers
        per = min(max(target / n, 0.0), float(lad[-1]))
        lo = max(i for i, p in enumerate(lad) if p <= per + 1e-9)
        if lo == len(lad) - 1:
            return [lo] * n
        up = int(np.clip(np.floor((target - n * lad[lo]) / (lad[lo + 1] - lad[lo]) + 0.5), 0, n))
        ups = {int(np.floor((j + 0.5) * n / up)) for j in range(up)} if up else set()
        return [lo + (i in ups) for i in range(n)]

    def uniform(self) -> LevelVector:
        """The most uniform feasible vector: every block's attention and MLP as close to ``sparsity`` as the
        ladders allow (joint budget: attention at the level nearest ``sparsity``, the MLP levels take up
        the rest). :class:`SearchError` if the ladders cannot meet the budget."""
        if self.separate:
            g = LevelVector(tuple(self._spread("attn", self.pools()[0][1])),
                            tuple(self._spread("mlp", self.pools()[1][1])))
        else:
            lad = self.attn_params
            a = min(range(len(lad)), key=lambda i: (abs(lad[i] / lad[-1] - self.sparsity), i))
            rest = self.sparsity * self.total - self.n_layers * lad[a]
            g = LevelVector((a,) * self.n_layers, tuple(self._spread("mlp", rest)))
            if not self.feasible(g):  # the MLP could not absorb the rest: spread the attention too
                share = self.n_layers * self.attn_params[-1] / (self.total or 1)
                ga = self._spread("attn", self.sparsity * self.total * share)
                rest = self.sparsity * self.total - sum(lad[x] for x in ga)
                g = LevelVector(tuple(ga), tuple(self._spread("mlp", rest)))
        if not self.feasible(g):
            raise SearchError(f"the level ladders cannot meet sparsity {self.sparsity} within the budget tolerance")
        return g

    def mutate(self, g: LevelVector, rng: np.random.Generator, flips: int = 1, tries: int = 100) -> LevelVector | None:
        """A level-switch child of ``g`` (``flips`` switches; see the module docstring), or ``None`` when
        ``tries`` draws give nothing feasible and different from ``g``."""
        units = [(k, i) for k in _KINDS for i in range(self.n_layers)]
        for _ in range(int(tries)):
            lev = {"attn": list(g.attn), "mlp": list(g.mlp)}
            for _ in range(int(flips)):
                if self.separate:
                    kind = _KINDS[int(rng.integers(2))]
                    pool = [(kind, i) for i in range(self.n_layers)]
                else:
                    pool = units
                down = [u for u in pool if lev[u[0]][u[1]] > 0]
                up = [u for u in pool if lev[u[0]][u[1]] < self.max_level(u[0])]
                if not down or not up:
                    continue
                a = down[int(rng.integers(len(down)))]
                b = up[int(rng.integers(len(up)))]
                if a == b:
                    continue
                lev[a[0]][a[1]] -= 1
                lev[b[0]][b[1]] += 1
            child = LevelVector(tuple(lev["attn"]), tuple(lev["mlp"]))
            if child != g and self.feasible(child):
                return child
        return None

    def sample(self, rng: np.random.Generator, flips: int | None = None) -> LevelVector:
        """A random feasible vector: :meth:`uniform` after ``flips`` (default ``2 * n_layers``) random level
        switches, each kept only while the vector stays feasible."""
        g = self.uniform()
        for _ in range(2 * self.n_layers if flips is None else int(flips)):
            child = self.mutate(g, rng, 1, tries=10)
            if child is not None:
                g = child
        return g
