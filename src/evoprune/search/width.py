"""Width-pruning searches over per-layer rate vectors: ``uniform``, ``owl`` and ``evo`` (``--space width``).

Owns :class:`RatePopulation` (the (K + M + S) population loop Self-Pruner's
Algorithm 1 describes, with non-LLM operators) and the one-shot baselines.
Every candidate is a :class:`~evoprune.genome.RateVector` feasible in a
:class:`~evoprune.space.WidthSpace` (mean rate = the target sparsity).

- ``uniform``: the same rate ``beta`` in every layer (Wanda-sp's allocation).
- ``owl``: OWL's allocation (Yin et al., 2023) from per-layer outlier ratios
  ``D_i`` (``scores``): ``D`` is min-max scaled to ``[0, 2*lambda]``, centred,
  and a layer's *density* is ``1 - beta + (scaled D_i - mean)``, so layers with
  more outliers lose less; the rates are then projected onto the space (only
  matters when a rate leaves ``[lo, hi]``). ``lambda = 0.08`` as in the paper.
- ``evo``: (mu + lambda) evolution without an LLM. Generation 0 is the initial
  population of ``population`` (K) vectors: uniform, OWL's vector when
  ``scores`` are given, the rest :meth:`WidthSpace.sample`. Each later
  generation makes ``mutations`` (M) children by :meth:`WidthSpace.mutate` of a
  binary-tournament parent and ``crossovers`` (S) children by
  :meth:`WidthSpace.crossover` of two tournament parents; children already
  scored or repeated are redrawn (at most ``50 * (M + S)`` draws). The next
  population is the best K of parents and children (ties: parents first).
  ``generations`` (N) counts offspring generations; evaluations = K + N (M + S).

Torch-free; randomness only from the given generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..genome import RateVector
from ..space import SearchError, WidthSpace
from . import register
from .base import Strategy

__all__ = ["owl_rates", "UniformStrategy", "OWLStrategy", "RatePopulation", "WidthEvoConfig"]


def owl_rates(space: WidthSpace, outlier_ratio, lam: float = 0.08) -> RateVector:
    """OWL's per-layer rates from outlier ratios ``D_i`` (fraction of outlier weights per layer)."""
    d = np.asarray([float(x) for x in outlier_ratio], dtype=np.float64)
    if d.shape != (space.n_layers,):
        raise SearchError(f"OWL needs one outlier ratio per layer ({space.n_layers}), got {d.size}")
    span = d.max() - d.min()
    scaled = (d - d.min()) / span * 2 * lam if span > 0 else np.zeros_like(d)
    density = scaled - scaled.mean() + (1.0 - space.beta)
    return space.project(1.0 - density)


@dataclass(frozen=True)
class _NoOptions:
    pass


@dataclass(frozen=True)
class OWLConfig:
    scores: tuple | None = None
    lam: float = 0.08

    def __post_init__(self) -> None:
        if self.scores is None:
            raise SearchError("owl needs per-layer outlier ratios (scores)")
        object.__setattr__(self, "scores", tuple(float(x) for x in self.scores))
        if not 0.0 <= float(self.lam) < 1.0:
            raise SearchError(f"owl lambda must be in [0, 1), got {self.lam}")


class _OneShot(Strategy):
    """One candidate, then done."""

    space_types = (WidthSpace,)
    config_cls = _NoOptions

    def _vector(self) -> RateVector:  # pragma: no cover - abstract
        raise NotImplementedError

    def _propose(self) -> list[RateVector]:
        return [self._vector()]

    def _advance(self) -> None:
        self._done = True


@register("uniform", space="width")
class UniformStrategy(_OneShot):
    def _vector(self) -> RateVector:
        return self.space.uniform()


@register("owl", space="width")
class OWLStrategy(_OneShot):
    config_cls = OWLConfig

    def _vector(self) -> RateVector:
        return owl_rates(self.space, self.config.scores, self.config.lam)


@dataclass(frozen=True)
class WidthEvoConfig:
    """K, M, S, N of Self-Pruner's Algorithm 1 (defaults scaled for CPU-sized models), mutation step."""

    population: int = 10
    mutations: int = 4
    crossovers: int = 4
    generations: int = 5
    step: float = 0.05
    scores: tuple | None = None
    lam: float = 0.08

    def __post_init__(self) -> None:
        for name in ("population", "generations"):
            if int(getattr(self, name)) < 1:
                raise SearchError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mutations", "crossovers"):
            if int(getattr(self, name)) < 0:
                raise SearchError(f"{name} must be >= 0, got {getattr(self, name)}")
        if int(self.mutations) + int(self.crossovers) < 1:
            raise SearchError("need at least one mutation or crossover per generation")
        if not 0.0 < float(self.step) <= 1.0:
            raise SearchError(f"mutation step must be in (0, 1], got {self.step}")
        if self.scores is not None:
            object.__setattr__(self, "scores", tuple(float(x) for x in self.scores))


@register("evo", space="width")
class RatePopulation(Strategy):
    """Population search over rate vectors; subclasses replace the operators (``self-pruner``)."""

    space_types = (WidthSpace,)
    config_cls = WidthEvoConfig

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self.population: list[RateVector] = []  # best first
        self._cohort: list[str] = []  # keys proposed this round

    # -- operators (overridden by the LLM-driven subclass) ---------------------------
    def _initial(self, k: int) -> list[RateVector]:
        out = [self.space.uniform()]
        if self.config.scores is not None:
            out.append(owl_rates(self.space, self.config.scores, self.config.lam))
        return self._fill(out, k, lambda: self.space.sample(self.rng))

    def _tournament(self) -> RateVector:
        i, j = self.rng.integers(len(self.population), size=2)
        return self.population[min(int(i), int(j))]  # population is sorted best-first

    def _mutants(self, m: int, seen: set) -> list[RateVector]:
        return self._fill([], m, lambda: self.space.mutate(self._tournament(), self.rng, self.config.step), seen)

    def _crossovers(self, s: int, seen: set) -> list[RateVector]:
        return self._fill([], s, lambda: self.space.crossover(self._tournament(), self._tournament(), self.rng), seen)

    def _fill(self, out: list[RateVector], n: int, draw, seen: set | None = None) -> list[RateVector]:
        """``out`` topped up to ``n`` distinct vectors not in ``seen`` / the memo with ``draw()``."""
        seen = set() if seen is None else seen
        keep = []
        for g in out:
            if g.key not in seen and g.key not in self._memo and self.space.feasible(g):
                seen.add(g.key)
                keep.append(g)
        tries = 0
        while len(keep) < n and tries < 50 * max(n, 1):
            tries += 1
            g = draw()
            if g.key not in seen and g.key not in self._memo:
                seen.add(g.key)
                keep.append(g)
        return keep[:n]

    # -- Strategy hooks ----------------------------------------------------------------
    def _propose(self) -> list[RateVector]:
        c = self.config
        if self.generation == 0:
            kids = self._initial(int(c.population))
        else:
            seen = {g.key for g in self.population}
            kids = self._mutants(int(c.mutations), seen) + self._crossovers(int(c.crossovers), seen)
        if not kids:  # nothing new can be drawn: the search has converged
            self._done = True
        self._cohort = [g.key for g in kids]
        return kids

    def _advance(self) -> None:
        pool = {g.key: g for g in self.population}
        for key in self._cohort:
            pool.setdefault(key, self.space.from_key(key))
        # stable sort: on equal fitness parents (inserted first) stay ahead of children
        order = sorted(pool.values(), key=lambda g: self._memo[g.key])
        self.population = order[: int(self.config.population)]
        self._cohort = []
        if self.generation > int(self.config.generations):
            self._done = True

    def _extra_state(self) -> dict:
        return {"population": [g.key for g in self.population], "cohort": list(self._cohort)}

    def _load_extra_state(self, d: dict) -> None:
        self.population = [self.space.from_key(k) for k in d["population"]]
        self._cohort = list(d.get("cohort", []))
