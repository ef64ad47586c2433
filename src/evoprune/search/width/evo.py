"""``evo`` over rate vectors (``--space width``): the population loop of Self-Pruner's Algorithm 1, no LLM.

Owns :class:`WidthEvoConfig` and :class:`WidthEvoStrategy` (the (K + M + S) population loop; ``self-pruner``
subclasses it and replaces the operators). Every candidate is a :class:`~evoprune.spaces.RateVector`
feasible in a :class:`~evoprune.spaces.WidthSpace` (mean rate = the target sparsity).

Generation 0 is the initial population of ``population`` (K) vectors: uniform, OWL's vector when
``scores`` are given, the rest :meth:`WidthSpace.sample`. Each later generation makes ``mutations`` (M)
children by :meth:`WidthSpace.mutate` of a binary-tournament parent and ``crossovers`` (S) children by
:meth:`WidthSpace.crossover` of two tournament parents; children already scored or repeated are redrawn
(at most ``50 * (M + S)`` draws). The next population is the best K of parents and children (ties:
parents first). ``generations`` (N) counts offspring generations; evaluations = K + N (M + S).
Racing (``race_margin`` > 0): a child is scored batch by batch and stopped once its partial loss is
clearly worse than every population member's on the same batches (it could not enter the population;
it is told ``+inf``), see :class:`~evoprune.fitness.racing.Race`.

Torch-free; randomness only from the given generator.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...options import opt
from ...spaces import RateVector, SearchError
from ..base import Strategy
from ..registry import register
from .oneshot import owl_rates

__all__ = ["WidthEvoConfig", "WidthEvoStrategy"]


@dataclass(frozen=True)
class WidthEvoConfig:
    """K, M, S, N of Self-Pruner's Algorithm 1 (defaults scaled for CPU-sized models), mutation step."""

    population: int = opt(10, "population size K")
    mutations: int = opt(4, "mutants per generation M")
    crossovers: int = opt(4, "crossover children per generation S")
    generations: int = opt(5, "offspring generations N")
    step: float = opt(0.05, "largest rate moved between two layers per mutation")
    scores: tuple | None = opt(None, "OWL outlier ratio per layer (supplied by the runner)", cli=False)
    lam: float = opt(0.08, "OWL rate spread lambda of the initial OWL vector", flag="owl_lambda")
    race_margin: float = opt(0.05, "racing: stop a child once it trails every population member by more than this "
                                   "many nats per token still to score (0: off)", legacy=0.0)

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
        if not (isinstance(self.race_margin, (int, float)) and 0 <= self.race_margin < float("inf")):
            raise SearchError(f"race_margin must be a number >= 0, got {self.race_margin!r}")


@register("evo", space="width", default=True)
class WidthEvoStrategy(Strategy):
    """Population search over rate vectors; subclasses replace the operators (``self-pruner``).

    Every candidate has an *origin* (:meth:`origin_of`: ``init``, ``mutation`` or ``crossover``; the
    subclass adds its own), and :attr:`origin_stats` counts per origin the candidates ``evaluated``, those
    that entered the next population (``top_k``) and those that were the best so far when scored
    (``best_so_far``).
    """

    config_cls = WidthEvoConfig
    inputs = ("scores",)
    needs = frozenset({"scores"})

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self.population: list[RateVector] = []  # best first
        self._cohort: list[str] = []  # keys proposed this round
        self._origin: dict[str, str] = {}  # key -> origin, for the current cohort
        self.origin_stats: dict[str, dict[str, int]] = {}

    # -- operators (overridden by the LLM-driven subclass) ---------------------------
    def _initial(self, k: int) -> list[RateVector]:
        out = [self.space.uniform()]
        if self.config.scores is not None:
            out.append(owl_rates(self.space, self.config.scores, self.config.lam))
        return self._fill(out, k, lambda: self.space.sample(self.rng), origin="init")

    def _tournament(self) -> RateVector:
        i, j = self.rng.integers(len(self.population), size=2)
        return self.population[min(int(i), int(j))]  # population is sorted best-first

    def _mutants(self, m: int, seen: set) -> list[RateVector]:
        return self._fill([], m, lambda: self.space.mutate(self._tournament(), self.rng, self.config.step), seen,
                          origin="mutation")

    def _crossovers(self, s: int, seen: set) -> list[RateVector]:
        return self._fill([], s, lambda: self.space.crossover(self._tournament(), self._tournament(), self.rng), seen,
                          origin="crossover")

    def _fill(self, out: list[RateVector], n: int, draw, seen: set | None = None, *, origin: str) -> list[RateVector]:
        """``out`` topped up to ``n`` distinct vectors not in ``seen`` / the memo with ``draw()``, all of ``origin``."""
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
        for g in keep[:n]:
            self._origin.setdefault(g.key, origin)
        return keep[:n]

    # -- origins -----------------------------------------------------------------------
    def origin_of(self, genome) -> str | None:
        return self._origin.get(genome.key)

    def _count(self, origin: str | None, what: str) -> None:
        if origin is not None:
            row = self.origin_stats.setdefault(origin, {"evaluated": 0, "top_k": 0, "best_so_far": 0})
            row[what] += 1

    def _update_best(self, p, f: float) -> None:
        before = self._best
        super()._update_best(p, f)
        self._count(self.origin_of(p), "evaluated")
        if self._best is not before:
            self._count(self.origin_of(p), "best_so_far")

    def result_extras(self) -> dict:
        return {"origins": {k: dict(v) for k, v in sorted(self.origin_stats.items())}}

    def race_of(self, genome) -> dict | None:
        """Children (generation >= 1) race the population: one clearly worse than every member cannot enter it."""
        m, k = float(self.config.race_margin), int(self.config.population)
        refs = tuple(g.key for g in self.population if self._memo.get(g.key, float("inf")) < float("inf"))
        if not m or self.generation == 0 or len(refs) < k:
            return None
        return {"refs": refs, "rank": len(refs), "margin": m}

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
        self._origin = {g.key: self._origin[g.key] for g in kids}
        return kids

    def _advance(self) -> None:
        pool = {g.key: g for g in self.population}
        for key in self._cohort:
            pool.setdefault(key, self.space.from_key(key))
        # stable sort: on equal fitness parents (inserted first) stay ahead of children
        order = sorted(pool.values(), key=lambda g: self._memo[g.key])
        self.population = order[: int(self.config.population)]
        kept = {g.key for g in self.population}
        for key in self._cohort:
            if key in kept:
                self._count(self._origin.get(key), "top_k")
        self._cohort = []
        if self.generation > int(self.config.generations):
            self._done = True

    def _extra_state(self) -> dict:
        return {"population": [g.key for g in self.population], "cohort": list(self._cohort),
                "origin": dict(self._origin), "origin_stats": {k: dict(v) for k, v in self.origin_stats.items()}}

    def _load_extra_state(self, d: dict) -> None:
        self.population = [self.space.from_key(k) for k in d["population"]]
        self._cohort = list(d.get("cohort", []))
        self._origin = {str(k): str(v) for k, v in d.get("origin", {}).items()}
        self.origin_stats = {str(k): {kk: int(vv) for kk, vv in v.items()} for k, v in d.get("origin_stats", {}).items()}
