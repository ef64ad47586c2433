"""Searches over level vectors (``--space levels``): ``darwinlm`` and the ``uniform`` baseline.

Owns :class:`DarwinLMConfig`, :class:`DarwinLMStrategy` and :class:`LevelUniform`.

``darwinlm`` (DarwinLM, Tang et al. 2025): an evolutionary search whose
candidates are :class:`~evoprune.genome.LevelVector`\\ s of a
:class:`~evoprune.space_levels.LevelSpace`, selected in stages by
:class:`~evoprune.search.staged.StagedStrategy`:

- generation 0 scores the space's uniform vector (the paper's start: every unit
  at the target level), through every stage, and makes it the parent;
- each later generation makes ``offspring`` distinct children, each from a
  tournament-chosen parent by a level-switch mutation with
  ``flips = min(U{1..max_flips}, U{1..max_flips})`` switches (biased to few, as
  in the authors' code); children already scored at any stage are redrawn (at
  most ``50 * offspring`` draws);
- stages: every child is scored on stage 0, the best ``survivors[0]`` on stage
  1, ... The evaluator decides what a stage means; with training-aware
  selection each stage fine-tunes the candidate briefly before scoring it, on
  more tokens stage by stage (:mod:`evoprune.fitness.levels`). ``survivors[-1]``
  (default 1, the paper's single parent) candidates become the parents, with
  the old parents competing (``elitism``, default on).

Torch-free; randomness only from the given generator.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..space import SearchError
from ..space_levels import LevelSpace
from . import register
from .staged import StagedStrategy, check_staged_options
from .width import _NoOptions, _OneShot

__all__ = ["DarwinLMConfig", "DarwinLMStrategy", "LevelUniform"]


@dataclass(frozen=True)
class DarwinLMConfig:
    """Options of ``darwinlm``; validated on construction (``SearchError``)."""

    generations: int = 10
    offspring: int = 8
    survivors: tuple = (2, 1)
    max_flips: int = 3
    elitism: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "survivors", check_staged_options(self, last_may_exceed=False))
        if not isinstance(self.max_flips, int) or isinstance(self.max_flips, bool) or self.max_flips < 1:
            raise SearchError(f"max_flips must be an integer >= 1, got {self.max_flips!r}")
        object.__setattr__(self, "elitism", bool(self.elitism))


@register("darwinlm", space="levels")
class DarwinLMStrategy(StagedStrategy):
    """Training-aware (or one-shot) evolutionary level search; see the module docstring."""

    config_cls = DarwinLMConfig
    config: DarwinLMConfig
    space_types = (LevelSpace,)

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self._start(self._initial_cohort())

    def _initial_cohort(self) -> list:
        return [self.space.uniform()]

    def _offspring(self) -> list:
        out, keys = [], {p.key for p in self.parents}
        m = self.config.max_flips
        for _ in range(50 * self.config.offspring):
            if len(out) == self.config.offspring:
                break
            parent = self._tournament()
            flips = min(int(self.rng.integers(1, m + 1)), int(self.rng.integers(1, m + 1)))
            child = self.space.mutate(parent, self.rng, flips)
            if child is not None and child.key not in keys and not self._seen(child):
                keys.add(child.key)
                out.append(child)
        return out


@register("uniform", space="levels")
class LevelUniform(_OneShot):
    """One candidate: :meth:`LevelSpace.uniform` (every block as close to the target as the ladders allow)."""

    config_cls = _NoOptions
    space_types = (LevelSpace,)

    def _vector(self):
        return self.space.uniform()
