"""``darwinlm`` (``--space levels``): DarwinLM's evolutionary search over compression levels.

Owns :class:`DarwinLMConfig` and :class:`DarwinLMStrategy`.

``darwinlm`` (DarwinLM, Tang et al. 2025): an evolutionary search whose
candidates are :class:`~evoprune.spaces.LevelVector`\\ s of a
:class:`~evoprune.spaces.LevelSpace`, selected in stages by
:class:`~evoprune.search.staged.StagedStrategy`:

- generation 0 scores the space's uniform vector (the paper's start: every unit
  at the target level), through every stage, and makes it the parent; with
  ``start_from="layers"`` (the default) the runner first runs the block search at
  the same budget (:mod:`evoprune.runner.problems.coarse`) and its answer, mapped
  onto the ladders (a dropped block: attention and MLP at their top level, every
  head group and channel removed, the same function), joins generation 0, is
  promoted through every stage whatever its cheap-stage fitness, and competes for
  parent: the result is never worse than the block search's. One-shot runs then get
  a default budget of twice the block search's token-layers, its own included;
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
  the old parents competing (``elitism``, default on). ``tokens_per_stage="auto"``
  (the default): 1/8 of the calibration tokens (>= 64), then all of them,
  survivors ``(2, 1)``;
- length: training-aware runs end after ``generations`` (default 10); one-shot runs
  without ``--budget-token-layers`` get a budget of ``budget_evals`` (default 35)
  whole-set evaluations of the dense model (``budget_evals x tokens x blocks``
  token-layers; a level database the run builds counts against it) and run until
  it is spent (or ``generations``, when given). On SmolLM2-135M (30%, one-shot,
  2 x 256 tokens, seeds 0-2) these defaults, with the evaluators' block-prefix
  cache, reached a lower calibration loss than the old ones (one whole-set stage,
  10 generations, no cache) on all three seeds at <= 0.5x their token-layers
  (``benchmarks/selection_cost.py``);
- racing (``race_margin``): on the last stage a child is stopped once its
  partial loss is clearly worse than every parent's on the same batches
  (:class:`~evoprune.fitness.racing.Race`).

Torch-free; randomness only from the given generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...options import opt
from ...spaces import LevelVector, SearchError
from ..defaults import BUDGET_EVALS, RACE_MARGIN
from ..registry import register
from ..staged import AUTO, START_FROM, BlockStart, StagedOptions, StagedStrategy, check_start

__all__ = ["DarwinLMConfig", "DarwinLMStrategy"]


@dataclass(frozen=True)
class DarwinLMConfig(StagedOptions):
    """Options of ``darwinlm``; validated on construction (``SearchError``). Survivors default to one
    per stage (the paper's single parent); every survivor count is at most ``offspring``."""

    generations: int | None = opt(None, "generations (the uniform start counts as one; default: training-aware 10, "
                                        "one-shot until the budget)")
    offspring: int = opt(8, "candidates per generation")
    max_flips: int = opt(3, "most level switches per mutation")
    budget_evals: float = opt(BUDGET_EVALS, "one-shot runs without --budget-token-layers: budget = this many whole-set "
                                    "evaluations of the dense model (0: none)", legacy=0.0)
    trains: bool = field(default=False, metadata={"cli": False})  # runner input: training-aware selection?
    tokens_per_stage: tuple | str | None = opt(
        AUTO, "fitness tokens per selection stage, e.g. 512,2048 (the last = the whole calibration set; auto: "
              "1/8 of the set, >= 64 tokens, then the whole set)", aliases=("fitness_tokens_per_stage",), kind="stages")
    race_margin: float = opt(RACE_MARGIN, "racing: stop a last-stage child once it trails every parent by more "
                                          "than this many nats per token still to score (0: off)", legacy=0.0)
    start_from: str = opt("layers", "also start from the block search's answer at the same budget, mapped onto the "
                                    "ladders, and (one-shot) spend about as much again (layers), or from the uniform "
                                    "vector alone (none)", choices=START_FROM, legacy="none")
    start: dict | None = opt(None, "the block search's answer: dropped_layers, calib_loss, token_layers (supplied "
                                   "by the runner)", cli=False)

    last_may_exceed: ClassVar[bool] = False
    open_generations: ClassVar[bool] = True

    @classmethod
    def default_survivors(cls, n_stages: int) -> tuple[int, ...]:
        # auto stages: the best two children of the cheap slice reach the whole set; one parent (the paper's)
        return (2, 1) if n_stages == 2 else (1,) * n_stages

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.max_flips, int) or isinstance(self.max_flips, bool) or self.max_flips < 1:
            raise SearchError(f"max_flips must be an integer >= 1, got {self.max_flips!r}")
        if not (isinstance(self.budget_evals, (int, float)) and 0 <= self.budget_evals < math.inf):
            raise SearchError(f"budget_evals must be a number >= 0, got {self.budget_evals!r}")
        object.__setattr__(self, "budget_evals", float(self.budget_evals))
        object.__setattr__(self, "trains", bool(self.trains))
        check_start(self)


@register("darwinlm", space="levels", default=True)
class DarwinLMStrategy(BlockStart, StagedStrategy):
    """Training-aware (or one-shot) evolutionary level search; see the module docstring."""

    config_cls = DarwinLMConfig
    needs = frozenset({"training", "start"})
    inputs = ("trains", "start")
    config: DarwinLMConfig

    @property
    def max_generations(self) -> int:
        g = self.config.generations
        if g is not None:
            return g
        # one-shot with a default budget: the budget ends the run (the cap only guards a budget-less loop)
        return 10 if self.config.trains or not self.config.budget_evals else 10**6

    def default_budget(self, stage_tokens: tuple[int, ...]) -> int | None:
        """One-shot: twice the block search's token-layers when it started from one, else ``budget_evals`` x
        whole-set tokens x blocks; training-aware or ``budget_evals`` 0: none."""
        if self.config.trains:
            return None
        if self.config.start is not None:
            return self.start_budget()
        if not self.config.budget_evals:
            return None
        return int(self.config.budget_evals * stage_tokens[-1] * self.space.n_layers)

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self.start_genome = self._start_vector()
        self._start(self._initial_cohort())

    def _start_vector(self):
        """The block search's answer on the ladders (``None``: no start, or outside the budget's tolerance)."""
        start = self.config.start
        if start is None:
            return None
        sp, dropped = self.space, set(start["dropped_layers"])
        g = LevelVector(tuple(sp.max_level("attn") if i in dropped else 0 for i in range(sp.n_layers)),
                        tuple(sp.max_level("mlp") if i in dropped else 0 for i in range(sp.n_layers)))
        return g if sp.feasible(g) else None

    def _initial_cohort(self) -> list:
        uniform = self.space.uniform()
        s = self.start_genome
        return [uniform] + ([s] if s is not None and s != uniform else [])

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
