"""Evolution over attention / MLP drop patterns, method ``evo`` of ``--space sublayers`` (EvoPress-style).

Owns :class:`SublayerEvoConfig` and :class:`SublayerEvoStrategy`: the staged (mu + lambda) selection of
:class:`~evoprune.search.staged.StagedStrategy` (multi-fidelity stages, elitism, duplicate rejection) with
moves that keep the budget met:

- **Start** (``start_from="layers"``, the default): the runner first runs the block search at the same budget
  (:mod:`evoprune.runner.problems.coarse`) and hands its answer over as ``start``. Every block pattern is a
  sub-layer pattern scored identically, so the initial cohort is that pattern (made feasible if the parameter
  window needs it: its sub-layers first, then the rest by ``scores``) and children of it by the moves below.
  Scored first, promoted through every stage and kept by elitism unless beaten, it makes the result never
  worse than the block search's.
  The default budget is then twice the block search's token-layers, its own included: the finer search costs
  at most about as much again. ``start_from="none"``: the initial cohort below, no default budget.
- **Initial cohort** without a start (``offspring`` patterns, at least the parents kept): with one-shot ``scores`` per
  sub-layer (Block Influence of each attention and MLP from the dense states: ``1 - cos`` between the
  residual stream before and after it; lower = more droppable), a ``seed_fraction`` share is seeded: first
  the sub-layers in ascending score, each taken if the budget can still be met; then orders drawn without
  replacement with weight ``exp(-rank / m)`` (``m``: sub-layers a pattern drops, about) and filled the same
  way; the rest are uniform random feasible patterns (:meth:`SublayerSpace.sample`).
- **Moves** (``Geometric(1/2)`` of them per child: at least 1, at most 8): *remove-first* (half the moves): one
  dropped sub-layer is restored, then kept sub-layers (not that one) are dropped in random order while they
  fit, until the budget is met; *add-first*: one kept sub-layer is dropped, then random dropped ones
  (not that one) are restored while the budget is exceeded, then the budget is refilled. With a count
  budget (``--drop-count``) both are a swap (attention <-> attention, MLP <-> MLP or attention <-> MLP); with a
  parameter budget a restored attention is replaced by an attention, and an MLP by an MLP or by as many
  attentions as weigh the same (SmolLM2: 3), and back. With probability ``adjacent`` the sub-layer a move
  drops is drawn from the kept ones next to a dropped one (the other half of its block, or the same kind in
  a neighbouring block) and the one it restores from the dropped ones with no such neighbour.
- **Duplicates**: a child equal to a parent, to another child of the cohort, or to anything scored is
  redrawn (at most ``50 * offspring`` draws; an empty cohort ends the search).

Torch-free; randomness only from the given generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...options import opt
from ...spaces import SearchError, SublayerPattern
from ..registry import register
from ..staged import START_FROM, BlockStart, StagedStrategy, SwapEvoOptions, check_start

__all__ = ["SublayerEvoConfig", "SublayerEvoStrategy"]


@dataclass(frozen=True)
class SublayerEvoConfig(SwapEvoOptions):
    """Options of sub-layer ``evo`` (:class:`~evoprune.search.staged.SwapEvoOptions`; ``scores`` has one
    Block Influence per sub-layer; ``start``: the block search's answer, supplied by the runner); validated on
    construction (``SearchError``)."""

    start_from: str = opt("layers", "start from the block search's answer at the same budget and spend about as "
                                    "much again around it (layers), or search from Block Influence alone (none)",
                          choices=START_FROM, legacy="none")
    start: dict | None = opt(None, "the block search's answer: dropped_layers, calib_loss, token_layers (supplied "
                                   "by the runner)", cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_start(self)


@register("evo", space="sublayers", default=True)
class SublayerEvoStrategy(BlockStart, StagedStrategy):
    """Staged evolution with budget-keeping moves over sub-layer patterns; see the module docstring."""

    config_cls = SublayerEvoConfig
    inputs = ("scores", "start")
    needs = frozenset({"scores", "start"})
    config: SublayerEvoConfig

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        if self.config.scores is not None and len(self.config.scores) != space.n_units:
            raise SearchError(f"scores must have {space.n_units} entries (one per sub-layer), got "
                              f"{len(self.config.scores)}")
        self.start_genome = self._start_pattern()
        self._start(self._initial_cohort())

    # -- the initial cohort ----------------------------------------------------------------
    def _filled(self, order) -> tuple[int, ...] | None:
        """Units taken in ``order`` while the budget can still be met, until it is."""
        sp, out = self.space, []
        for u in order:
            if sp.feasible_units(out):
                break
            if sp.completable(out + [int(u)]):
                out.append(int(u))
        return tuple(sorted(out)) if sp.feasible_units(out) and len(out) < sp.n_units else None

    def _initial_cohort(self) -> list[SublayerPattern]:
        sp, cfg = self.space, self.config
        size = min(max(cfg.offspring, cfg.survivors[-1]), sp.size())
        out, keys = [], set()

        def add(units) -> None:
            if units is not None and len(out) < size:
                p = SublayerPattern.from_units(sp.n_layers, units)
                if p.key not in keys:
                    keys.add(p.key)
                    out.append(p)

        start = self.start_genome
        if start is not None:
            add(start.units)
            for _ in range(50 * size):
                if len(out) >= size:
                    break
                child = self._child(start)
                add(None if child is None else child.units)
        if cfg.scores is not None and start is None:
            n_seed = int(math.floor(cfg.seed_fraction * size + 0.5))
            drop = np.asarray(sp.droppable)
            order = drop[np.argsort([cfg.scores[u] for u in drop], kind="stable")]
            if n_seed:
                add(self._filled(order))
            m = max(1, len(self._filled(order) or ()))
            w = np.exp(-np.arange(len(order)) / m)
            w = w / w.sum()
            for _ in range(50 * size):
                if len(out) >= n_seed:
                    break
                add(self._filled(self.rng.choice(order, len(order), replace=False, p=w)))
        for _ in range(50 * size):
            if len(out) >= size:
                break
            add(sp.sample(self.rng).units)
        return out

    def _start_pattern(self) -> SublayerPattern | None:
        """The block search's answer as a feasible sub-layer pattern (``None``: no start, or none near it)."""
        start = self.config.start
        if start is None:
            return None
        sp = self.space
        units = [2 * b + j for b in start["dropped_layers"] for j in (0, 1)]
        if not sp.feasible_units(units):  # a parameter window between block sizes: its sub-layers first
            scores = self.config.scores
            rest = [u for u in sp.droppable if u not in units]
            if scores is not None:
                rest.sort(key=lambda u: scores[u])
            got = self._filled(units + rest)
            if got is None:
                return None
            units = list(got)
        return SublayerPattern.from_units(sp.n_layers, units)

    def default_budget(self, stage_tokens: tuple[int, ...]) -> int | None:
        """Twice the block search's token-layers (its own included) when it started from one, else ``None``."""
        return self.start_budget()

    # -- moves -------------------------------------------------------------------------------
    def _near(self, dropped: set[int], kept: list[int]) -> list[int]:
        return [u for u in kept if any(v in dropped for v in (u - 1, u + 1, u - 2, u + 2) if (v // 2 == u // 2
                                                                                              or v % 2 == u % 2))]

    def _move(self, units: tuple[int, ...]) -> tuple[int, ...] | None:
        sp, rng = self.space, self.rng
        dropped = set(units)
        kept = [u for u in sp.droppable if u not in dropped]
        contiguous = rng.random() < self.config.adjacent
        if rng.random() < 0.5 or not kept:  # remove-first
            pool = sorted(dropped)
            if contiguous:
                lone = [u for u in pool if not self._near(dropped - {u}, [u])]
                pool = lone or pool
            a = pool[int(rng.integers(len(pool)))]
            return sp.fill(dropped - {a}, rng, avoid=(a,))
        pool = self._near(dropped, kept) if contiguous else []
        pool = pool or kept
        b = pool[int(rng.integers(len(pool)))]
        cur = dropped | {b}
        others = sorted(dropped)
        order = [others[i] for i in rng.permutation(len(others))]
        restored = []
        for u in order:  # restore random ones while over the budget
            over = len(cur) > sp.k if sp.k is not None else sp.removed(cur) > sp.window[1]
            if not over:
                break
            cur.discard(u)
            restored.append(u)
        return sp.fill(cur, rng, avoid=restored)

    def _child(self, p: SublayerPattern) -> SublayerPattern | None:
        units = p.units
        for _ in range(min(int(self.rng.geometric(0.5)), 8)):
            units = self._move(units)
            if units is None:
                return None
        return SublayerPattern.from_units(self.space.n_layers, units)

    def _offspring(self) -> list[SublayerPattern]:
        out, keys = [], {p.key for p in self.parents}
        for _ in range(50 * self.config.offspring):
            if len(out) == self.config.offspring:
                break
            child = self._child(self._tournament())
            if child is not None and child.key not in keys and not self._seen(child):
                keys.add(child.key)
                out.append(child)
        return out
