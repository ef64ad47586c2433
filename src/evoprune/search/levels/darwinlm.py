"""``darwinlm`` (``--space levels``): DarwinLM's evolutionary search over compression levels.

Owns :class:`DarwinLMConfig` and :class:`DarwinLMStrategy`.

``darwinlm`` (DarwinLM, Tang et al. 2025): an evolutionary search whose
candidates are :class:`~evoprune.spaces.LevelVector`\\ s of a
:class:`~evoprune.spaces.LevelSpace`, selected in stages by
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
  the old parents competing (``elitism``, default on). ``tokens_per_stage="auto"``:
  1/8 of the calibration tokens, then all of them, survivors ``(2, 1)``; not the
  default: on SmolLM2-135M (30%, one-shot, 2 x 256 tokens, 3 seeds) it cost 0.38x
  the single stage's token-layers but reached a lower loss on 1 seed of 3
  (``benchmarks/selection_cost.py``);
- racing (``race_margin``): on the last stage a child is stopped once its
  partial loss is clearly worse than every parent's on the same batches
  (:class:`~evoprune.fitness.racing.Race`).

Torch-free; randomness only from the given generator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...options import opt
from ...spaces import SearchError
from ..registry import register
from ..staged import StagedOptions, StagedStrategy

__all__ = ["DarwinLMConfig", "DarwinLMStrategy"]


@dataclass(frozen=True)
class DarwinLMConfig(StagedOptions):
    """Options of ``darwinlm``; validated on construction (``SearchError``). Survivors default to one
    per stage (the paper's single parent); every survivor count is at most ``offspring``."""

    generations: int = opt(10, "generations (the uniform start counts as one)")
    offspring: int = opt(8, "candidates per generation")
    max_flips: int = opt(3, "most level switches per mutation")
    tokens_per_stage: tuple | str | None = opt(
        None, "fitness tokens per selection stage, e.g. 512,2048 (the last = the whole calibration set; auto: "
              "1/8 of the set, >= 64 tokens, then the whole set)", aliases=("fitness_tokens_per_stage",), kind="stages")
    race_margin: float = opt(0.05, "racing: stop a last-stage child once it trails every parent by more than this "
                                   "many nats per token still to score (0: off)", legacy=0.0)

    last_may_exceed: ClassVar[bool] = False

    @classmethod
    def default_survivors(cls, n_stages: int) -> tuple[int, ...]:
        # auto stages: the best two children of the cheap slice reach the whole set; one parent (the paper's)
        return (2, 1) if n_stages == 2 else (1,) * n_stages

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_flips, int) or isinstance(self.max_flips, bool) or self.max_flips < 1:
            raise SearchError(f"max_flips must be an integer >= 1, got {self.max_flips!r}")


@register("darwinlm", space="levels", default=True)
class DarwinLMStrategy(StagedStrategy):
    """Training-aware (or one-shot) evolutionary level search; see the module docstring."""

    config_cls = DarwinLMConfig
    needs = frozenset({"training"})
    config: DarwinLMConfig

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
