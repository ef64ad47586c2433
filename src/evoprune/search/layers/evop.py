"""EPPS: EvoP's Evolutionary Pruning Pattern Search (Algorithm 4.2), method ``evop``.

Owns :class:`EvopConfig` and :class:`EvopStrategy`, a literal implementation
of the paper's genetic algorithm (Wu et al., 2025, arXiv:2502.14910, Sec. 4.2):

1. ``S`` random patterns that satisfy the sparsity (exactly ``k`` dropped).
2. For each generation ``g = 1..G``: score every pattern (mean calibration
   NLL); select the top ``elite_fraction`` (paper: "the top 30%"); generate new
   patterns by combining pairs of selected patterns (crossover); flip each bit
   with probability ``mutation_rate``; adjust to the sparsity by randomly
   flipping positions ("double mutation", :meth:`LayerDropSpace.repair`);
   replace the population.
3. Return the pattern with the lowest loss.

Choices the paper leaves open, fixed here (and why):

- **Crossover**: the paper only says "combining pairs of selected patterns" and
  names no operator. Default ``crossover="uniform"`` (each bit from either
  parent with probability 1/2: treats blocks as unordered, the natural fit for
  a fixed-cardinality subset); ``"one_point"`` is available. One child per
  pair; the pair is two distinct elites drawn uniformly at random (the same
  elite twice only when a single elite exists).
- **Survivors**: "the fittest individuals survive", so the next population is
  the selected elites plus ``S - n_elite`` children (elitism). Elites are the
  top ``n_elite = clip(round_half_up(elite_fraction * S), 1, S - 1)``
  *distinct* patterns; ties are broken by population order.
- **Mutation** flips only droppable bits (protected blocks stay kept), then
  repair restores exactly ``k``.
- **Initial population**: distinct random feasible patterns when the space
  has at least ``S`` of them, else independent samples.
- **Termination**: exactly ``G`` generations are scored; children of the last
  generation would never be scored, so none are bred. ``best`` is the lowest
  loss seen over the whole run (step 11).
- **No re-evaluation**: survivors (and children that duplicate any pattern
  already scored) keep their memoised fitness; ``ask()`` returns only unscored
  patterns, each once. The loss is deterministic, so this changes cost, not
  the trajectory. A generation whose patterns are all scored completes without
  asking. Evaluations: ``S`` in generation 1, at most ``S - n_elite`` after.

Defaults ``population=20``, ``mutation_rate=0.05`` are not given in the paper;
``generations=100`` is its "max number of iterations" for 13B models.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...options import opt
from ...spaces import DropPattern, SearchError
from ..base import Strategy
from ..registry import register

__all__ = ["EvopConfig", "EvopStrategy"]

CROSSOVERS = ("uniform", "one_point")


@dataclass(frozen=True)
class EvopConfig:
    """Options of ``evop``; validated on construction (``SearchError``/``ValueError``)."""

    population: int = opt(20, "population size S")
    generations: int = opt(100, "generations G (the paper's maximum iterations for 13B models)")
    mutation_rate: float = opt(0.05, "bit-flip probability per block")
    elite_fraction: float = opt(0.3, "fraction of the population kept per generation")
    crossover: str = opt("uniform", "crossover operator", choices=CROSSOVERS)

    def __post_init__(self) -> None:
        if not isinstance(self.population, int) or self.population < 2:
            raise SearchError(f"population must be an integer >= 2, got {self.population!r}")
        if not isinstance(self.generations, int) or self.generations < 1:
            raise SearchError(f"generations must be an integer >= 1, got {self.generations!r}")
        if not 0.0 <= float(self.mutation_rate) <= 1.0:
            raise SearchError(f"mutation_rate must be in [0, 1], got {self.mutation_rate!r}")
        if not 0.0 < float(self.elite_fraction) < 1.0:
            raise SearchError(f"elite_fraction must be in (0, 1), got {self.elite_fraction!r}")
        if self.crossover not in CROSSOVERS:
            raise SearchError(f"crossover must be one of {', '.join(CROSSOVERS)}, got {self.crossover!r}")

    @property
    def n_elite(self) -> int:
        """Number of selected (surviving) patterns per generation."""
        n = math.floor(self.elite_fraction * self.population + 0.5)
        return min(self.population - 1, max(1, n))


@register("evop")
class EvopStrategy(Strategy):
    """EPPS (Algorithm 4.2). Options: see :class:`EvopConfig`."""

    config_cls = EvopConfig
    config: EvopConfig
    calibration = {"sampling": "ccds", "seqlen": 2048}  # the paper's CCDS: 5 clusters x 1 sample of 2048 tokens

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self.population: list[DropPattern] = self._initial_population()

    def _initial_population(self) -> list[DropPattern]:
        s = self.config.population
        if self.space.size() < s:
            return [self.space.sample(self.rng) for _ in range(s)]
        pop, seen = [], set()
        while len(pop) < s:
            p = self.space.sample(self.rng)
            if p.key not in seen:
                seen.add(p.key)
                pop.append(p)
        return pop

    # -- Strategy hooks ------------------------------------------------------------

    def _propose(self) -> list[DropPattern]:
        return list(self.population)

    def _advance(self) -> None:
        # Called when every pattern of the current population is scored;
        # self.generation has just been incremented to the finished generation.
        if self.generation >= self.config.generations:
            self._done = True
            return
        elites = self._select()
        children = [self._breed(elites) for _ in range(self.config.population - len(elites))]
        self.population = elites + children

    def _select(self) -> list[DropPattern]:
        """Top ``n_elite`` distinct patterns by fitness; ties by population order."""
        order = sorted(range(len(self.population)), key=lambda i: (self._memo[self.population[i].key], i))
        elites, seen = [], set()
        for i in order:
            p = self.population[i]
            if p.key not in seen:
                seen.add(p.key)
                elites.append(p)
                if len(elites) == self.config.n_elite:
                    break
        return elites

    def _breed(self, elites: list[DropPattern]) -> DropPattern:
        if len(elites) >= 2:
            i, j = self.rng.choice(len(elites), size=2, replace=False)
        else:
            i = j = 0
        a = np.asarray(elites[int(i)].mask, dtype=np.int8)
        b = np.asarray(elites[int(j)].mask, dtype=np.int8)
        n = self.space.n_layers
        if self.config.crossover == "uniform":
            child = np.where(self.rng.random(n) < 0.5, a, b)
        else:  # one_point: prefix of a, suffix of b, cut strictly inside
            cut = int(self.rng.integers(1, n))
            child = np.concatenate([a[:cut], b[cut:]])
        droppable = np.asarray(self.space.droppable)
        flip = self.rng.random(len(droppable)) < self.config.mutation_rate
        child[droppable[flip]] ^= 1
        return self.space.repair(child.tolist(), self.rng)

    def _extra_state(self) -> dict:
        return {"population": [p.key for p in self.population]}

    def _load_extra_state(self, d: dict) -> None:
        self.population = [self.space.from_key(k) for k in d["population"]]
