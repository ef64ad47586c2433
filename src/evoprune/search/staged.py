"""Multi-stage (mu + lambda) selection: the one staging implementation of every staged strategy (``evo`` of each
space, ``self-pruner``, ``darwinlm``).

Owns :class:`Request` and :class:`StagedStrategy`, the ask/tell machinery of a
generation scored stage by stage (EvoPress / DarwinLM selection):

- a generation's *cohort* (subclass hook :meth:`StagedStrategy._offspring`, or
  :meth:`~StagedStrategy._initial_cohort` for generation 0) is scored at stage 0;
  the best ``survivors[s]`` of stage ``s`` (ties: cohort order) are scored at
  stage ``s + 1``; the last stage is the full-fidelity fitness;
- after the last stage the next parents are the best ``survivors[-1]``
  distinct genomes among the old parents (with ``elitism``) and the cohort's
  last-stage candidates (a parent leaves only for a strictly better genome:
  ties keep parents first); without ``elitism`` only the cohort's;
- ``ask()`` returns :class:`Request` objects (a genome and its stage), each
  (genome, stage) pair at most once per run: the fitness memo is keyed by
  (genome key, stage), i.e. by (genome, data slice);
- ``generation`` counts completed cohorts (the initial one included); the
  search ends after ``generations`` cohorts, or when a cohort comes out empty.
  ``best`` is the lowest last-stage fitness seen.

Subclass hooks beyond the cohorts: the stage a cohort enters at (:meth:`StagedStrategy._entry_stage`, e.g. a
population scored on the whole set at once), the survivors and elitism when the options name them otherwise and
what happens once parents are chosen. With :attr:`StagedStrategy.bare_one_stage`, a one-stage run hands the runner
bare genomes instead of requests (and takes them back in :meth:`tell` and :meth:`race_of`).

The subclass's ``config`` is a :class:`StagedOptions` (``generations``,
``offspring``, ``survivors`` per stage, ``tokens_per_stage``, ``elitism``). Torch-free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from ..options import opt
from ..spaces import SearchError
from .base import Strategy, decode_fitness, encode_fitness
from .defaults import START_SHARE

__all__ = ["AUTO", "Request", "StagedOptions", "StagedStrategy", "SwapEvoOptions", "stage_tokens_option", "START_FROM",
           "BlockStart", "check_start"]

# ``tokens_per_stage="auto"``: two stages, a cheap first slice the runner derives from the calibration
# set's shape (:func:`evoprune.runner.problems.common.stage_slices`) and the whole set
AUTO = "auto"


@dataclass(frozen=True)
class StagedOptions:
    """Options every staged strategy has; subclasses redefine defaults and add their own fields.

    ``survivors``: candidates promoted past each stage, the last = parents kept (``None``:
    :meth:`default_survivors`); its length is the number of stages. ``tokens_per_stage``: fitness
    tokens of each stage, for the runner (the strategy only sees stage indices; ``None``: the runner
    has one stage, the whole calibration set; the last entry must be the whole set, which the runner
    checks against it; ``"auto"``: two stages, a cheap slice the runner derives from the calibration
    set's shape, then the whole set; with a single ``survivors`` entry, one stage). Validated on construction (``SearchError``).
    """

    generations: int = opt(10, "generations (the initial cohort counts as one)")
    offspring: int = opt(16, "candidates per generation")
    survivors: tuple | None = opt(None, "candidates promoted past each stage, e.g. 4,1 (the last = parents kept)",
                                  flag="survivors_per_stage")
    tokens_per_stage: tuple | None = opt(None, "fitness tokens per selection stage, e.g. 512,2048 (the last = the "
                                               "whole calibration set; auto: derived)", aliases=("fitness_tokens_per_stage",),
                                  kind="stages")
    elitism: bool = opt(True, "parents compete with their offspring")
    race_margin: float = opt(0.0, "racing: stop a last-stage candidate once it trails every kept parent by more "
                                  "than this many nats per token still to score (0: off)")

    last_may_exceed: ClassVar[bool] = True  # may the parents kept (last survivors) outnumber the offspring?
    open_generations: ClassVar[bool] = False  # may ``generations`` be None (the strategy's max_generations decides)?

    @classmethod
    def default_survivors(cls, n_stages: int) -> tuple[int, ...]:
        """Survivors when none are given (subclasses decide); ``SearchError`` when there is no sensible one."""
        if n_stages != 1:
            raise SearchError("--tokens-per-stage needs --survivors-per-stage with as many entries")
        return (1,)

    @property
    def n_stages(self) -> int:
        return len(self.survivors)

    def __post_init__(self) -> None:
        for name in ("generations", "offspring"):
            v = getattr(self, name)
            if v is None and name == "generations" and self.open_generations:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SearchError(f"{name} must be an integer >= 1, got {v!r}")
        tps = stage_tokens_option(self.tokens_per_stage)
        object.__setattr__(self, "tokens_per_stage", tps)
        if self.survivors is None:
            surv = self.default_survivors(1 if tps is None else 2 if tps == AUTO else len(tps))
        else:
            surv = _ints("survivors", self.survivors)
            if tps == AUTO and len(surv) == 1:  # one survivors entry: one stage, the whole set
                tps = None
                object.__setattr__(self, "tokens_per_stage", None)
            if tps is not None and len(surv) != (2 if tps == AUTO else len(tps)):
                raise SearchError("--tokens-per-stage needs --survivors-per-stage with as many entries")
        capped = surv[:-1] if self.last_may_exceed else surv
        if any(s > self.offspring for s in capped):
            raise SearchError(f"survivors per stage{' (before the last)' if self.last_may_exceed else ''} must be "
                              f"<= offspring={self.offspring}, got {surv}")
        object.__setattr__(self, "survivors", surv)
        object.__setattr__(self, "elitism", bool(self.elitism))
        if not (isinstance(self.race_margin, (int, float)) and math.isfinite(self.race_margin) and self.race_margin >= 0):
            raise SearchError(f"race_margin must be a number >= 0, got {self.race_margin!r}")
        object.__setattr__(self, "race_margin", float(self.race_margin))


@dataclass(frozen=True)
class SwapEvoOptions(StagedOptions):
    """Options shared by the mask-space ``evo`` strategies (blocks, sub-layers): 20 generations x 16
    offspring, 4 parents, one-shot ``scores`` (Block Influence, from the runner) seeding a share of the
    initial cohort, and contiguity moves. Validated on construction (``SearchError``)."""

    generations: int = opt(20, "generations (the initial cohort counts as one)")
    offspring: int = opt(16, "candidates per generation")
    scores: tuple | None = opt(None, "one-shot Block Influence per unit (supplied by the runner)", cli=False)
    seed_fraction: float = opt(0.5, "share of the initial cohort seeded from Block Influence")
    adjacent: float = opt(0.35, "probability that a swap is a contiguity move")

    @classmethod
    def default_survivors(cls, n_stages: int) -> tuple[int, ...]:
        if n_stages != 1:
            raise SearchError("--tokens-per-stage needs --survivors-per-stage with as many entries")
        return (4,)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scores is not None:
            sc = tuple(float(x) for x in self.scores)
            if not all(math.isfinite(x) for x in sc):
                raise SearchError("scores must be finite")
            object.__setattr__(self, "scores", sc)
        for name in ("seed_fraction", "adjacent"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise SearchError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


START_FROM = ("layers", "none")  # a finer space's start: the block search's answer at the same budget, or none


def check_start(config) -> None:
    """Validate a finer space's ``start_from`` / ``start`` options in place (``SearchError``)."""
    if config.start_from not in START_FROM:
        raise SearchError(f"start_from must be one of {', '.join(START_FROM)}, got {config.start_from!r}")
    if config.start is not None:
        try:
            start = {**config.start, "dropped_layers": [int(i) for i in config.start["dropped_layers"]],
                     "token_layers": int(config.start["token_layers"])}
        except (KeyError, TypeError, ValueError):
            raise SearchError(f"start must have dropped_layers and token_layers, got {config.start!r}") from None
        object.__setattr__(config, "start", start)


class BlockStart:
    """What the strategies of finer spaces share when they start from the block search's answer (``config.start``,
    with ``config.start_from``): the runner supplies it only with ``start_from="layers"``; the answer in the
    strategy's own space (``start_genome``, set by the subclass; ``None``: no start) is promoted through every
    stage; the default budget is :data:`START_SHARE` x the block search's token-layers (:meth:`start_budget`);
    ``result.json`` records the start. Mixed in before :class:`StagedStrategy`."""

    start_genome = None

    @classmethod
    def requirements(cls, config) -> frozenset[str]:
        """The block search's answer only with ``start_from="layers"``."""
        return cls.needs if config.start_from == "layers" else cls.needs - {"start"}

    def _pinned(self) -> frozenset[str]:
        """The start reaches the last stage whatever its cheap-stage fitness: the result is never worse."""
        return frozenset() if self.start_genome is None else frozenset({self.start_genome.key})

    def start_budget(self) -> int | None:
        """:data:`START_SHARE` x the block search's token-layers (its own included); ``None`` without a start."""
        start = self.config.start
        return None if start is None else START_SHARE * start["token_layers"]

    def result_extras(self) -> dict:
        return {} if self.config.start is None else {"start": dict(self.config.start)}


def stage_tokens_option(tps):
    """A validated ``tokens_per_stage`` value: ``None`` (also from ``"none"`` / ``"off"``), :data:`AUTO` or
    increasing integers >= 2 (``SearchError`` otherwise)."""
    if isinstance(tps, str) and tps.strip().lower() == AUTO:
        return AUTO
    if tps is None or (isinstance(tps, str) and tps.strip().lower() in ("none", "off")):
        return None
    tps = _ints("tokens_per_stage", tps)
    if any(b <= a for a, b in zip(tps, tps[1:])) or tps[0] < 2:
        raise SearchError(f"--tokens-per-stage must increase and start at >= 2 tokens, got {tps}")
    return tps


def _ints(name: str, v) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in (v.split(",") if isinstance(v, str) else v))
    except (TypeError, ValueError):
        raise SearchError(f"{name} must be a list of integers, got {v!r}") from None
    if not out or min(out) < 1:
        raise SearchError(f"{name} must be a non-empty list of integers >= 1, got {v!r}")
    return out


@dataclass(frozen=True)
class Request:
    """One evaluation a multi-stage strategy asks for: ``pattern`` (any genome) on stage ``stage``'s data.

    Racing (``refs`` non-empty): the runner may stop scoring it once it is clearly worse (``margin``)
    than ``rank`` of the genomes with keys ``refs``, already scored at the same stage
    (:class:`~evoprune.fitness.racing.Race`); such a stopped candidate is told ``+inf``.
    """

    pattern: Any
    stage: int
    refs: tuple[str, ...] = ()
    rank: int = 1
    margin: float = 0.0

    @property
    def key(self) -> str:
        return self.pattern.key

    @property
    def dropped(self) -> tuple[int, ...]:
        return self.pattern.dropped


class StagedStrategy(Strategy):
    """Base class; subclasses supply :meth:`_initial_cohort` and :meth:`_offspring` (see the module doc)."""

    bare_one_stage: ClassVar[bool] = False  # a one-stage run asks for bare genomes, not requests

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self.survivors: tuple[int, ...] = self._survivors()
        self.last = len(self.survivors) - 1
        self.parents: list = []
        self._low: dict[str, float] = {}  # "key@stage" -> fitness, stages < last
        self.stage = 0
        self._requests: list[Request] = []
        self.cohort: list = []
        self.active: list = []

    def _start(self, cohort: list) -> None:
        """Begin scoring ``cohort`` at its :meth:`_entry_stage` (an empty cohort ends the search)."""
        self.cohort, self.active, self.stage = list(cohort), list(cohort), self._entry_stage(cohort)
        if not self.cohort:
            self._done = True

    # -- fitness memo over (genome, stage) --------------------------------------------

    def stage_fitness(self, p, stage: int) -> float | None:
        """Memoised fitness of ``p`` at ``stage`` or ``None``."""
        return self._memo.get(p.key) if stage == self.last else self._low.get(f"{p.key}@{stage}")

    def _seen(self, p) -> bool:
        return p.key in self._memo or any(f"{p.key}@{s}" in self._low for s in range(self.last))

    # -- ask / tell ------------------------------------------------------------------

    def _race_refs(self, stage: int) -> dict:
        """Race fields of this stage's requests: at the last stage (with ``elitism`` and ``race_margin``), a
        candidate clearly worse than every kept parent cannot become one."""
        m = self.config.race_margin
        refs = tuple(p.key for p in self.parents if math.isfinite(self._memo.get(p.key, math.inf)))
        if not m or stage != self.last or not self.elitism or len(refs) < self.survivors[-1]:
            return {}
        return {"refs": refs, "rank": len(refs), "margin": m}

    def ask(self) -> list[Request]:
        while not self._requests and not self._done:
            race = self._race_refs(self.stage)
            fresh = [Request(p, self.stage, **race) for p in self.active if self.stage_fitness(p, self.stage) is None]
            if fresh:
                self._requests = fresh
            else:
                self._complete_stage()
        if self.bare_one_stage and not self.last:
            return [r.pattern for r in self._requests]
        return list(self._requests)

    def _request_of(self, candidate):
        """The outstanding request of a bare genome handed out by :meth:`ask` (else ``candidate`` itself)."""
        if isinstance(candidate, Request):
            return candidate
        return next((r for r in self._requests if r.key == candidate.key), candidate)

    def race_of(self, candidate) -> dict | None:
        return super().race_of(self._request_of(candidate))

    def tell(self, candidates: Sequence[Request], fitnesses: Sequence[float]) -> None:
        candidates = [self._request_of(c) for c in candidates]
        self._requests = self._tell_requests(candidates, fitnesses, self._requests, self.last, self._low,
                                             lambda r: f"{r.key}@{r.stage}")
        if not self._requests:
            self._batch_done()

    def _batch_done(self) -> None:
        """Every request of the current batch is scored."""
        self._complete_stage()

    def _ranked(self, pats: list, stage: int) -> list:
        order = sorted(range(len(pats)), key=lambda i: (self.stage_fitness(pats[i], stage), i))
        return [pats[i] for i in order]

    def _complete_stage(self) -> None:
        if self.stage < self.last:
            kept = self._ranked(self.active, self.stage)[: self.survivors[self.stage]]
            pinned = self._pinned()
            self.active = kept + [p for p in self.active if p.key in pinned and p not in kept]
            self.stage += 1
            return
        self.generation += 1
        pool, seen = [], set()
        for p in (self.parents if self.elitism else []) + self.active:
            if p.key not in seen:
                seen.add(p.key)
                pool.append(p)
        self.parents = self._ranked(pool, self.last)[: self.survivors[-1]]
        self._parents_chosen()
        if self.generation >= self.max_generations:
            self._done = True
            return
        self._start(self._offspring())

    @property
    def max_generations(self) -> int:
        """Generations after which the search ends (default: ``config.generations``)."""
        return self.config.generations

    def _advance(self) -> None:  # pragma: no cover - ask/tell are overridden
        raise NotImplementedError

    # -- subclass hooks ----------------------------------------------------------------

    def _survivors(self) -> tuple[int, ...]:
        """Candidates kept after each stage, the last = parents kept (default: ``config.survivors``)."""
        return self.config.survivors

    @property
    def elitism(self) -> bool:
        """Do the parents compete with their offspring (default: ``config.elitism``)?"""
        return self.config.elitism

    def _entry_stage(self, cohort: list) -> int:
        """The stage a new cohort is first scored at (default: 0, the cheapest)."""
        return 0

    def _parents_chosen(self) -> None:
        """Called once the next parents are chosen from the old ones and the cohort (default: nothing)."""

    def _initial_cohort(self) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def _offspring(self) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def _pinned(self) -> frozenset[str]:
        """Keys of genomes promoted past every stage whatever their lower-stage fitness (default: none)."""
        return frozenset()

    def _tournament(self):
        """A parent by binary tournament on the ranked parents: the better of two uniform draws."""
        i = min(int(self.rng.integers(len(self.parents))), int(self.rng.integers(len(self.parents))))
        return self.parents[i]

    # -- state -----------------------------------------------------------------------

    def _extra_state(self) -> dict:
        return {"parents": [p.key for p in self.parents], "cohort": [p.key for p in self.cohort],
                "active": [p.key for p in self.active], "stage": self.stage,
                "low": {k: encode_fitness(v) for k, v in self._low.items()},
                "requests": [[r.key, r.stage, list(r.refs), r.rank, r.margin] for r in self._requests]}

    def _load_extra_state(self, d: dict) -> None:
        key = self.space.from_key
        self.parents = [key(k) for k in d["parents"]]
        self.cohort = [key(k) for k in d["cohort"]]
        self.active = [key(k) for k in d["active"]]
        self.stage = int(d["stage"])
        self._low = {str(k): decode_fitness(v) for k, v in d["low"].items()}
        self._requests = [Request(key(r[0]), int(r[1]), *([tuple(r[2]), int(r[3]), float(r[4])] if len(r) > 2 else []))
                          for r in d["requests"]]
