"""SLEB greedy block removal (Song et al., 2024), method ``sleb``.

Owns :class:`SlebConfig` and :class:`SlebStrategy`. Each step asks for the
current pattern plus each remaining droppable block (one candidate per block),
then permanently drops the block whose candidate has the lowest loss (ties:
lowest block index). After ``k`` steps the current pattern has exactly ``k``
dropped blocks and the search is done. ``generation`` counts steps. Step ``i``
(0-based) costs ``n_droppable - i`` evaluations; only the last step's
candidates are feasible (exactly ``k`` dropped), so ``best`` is the final
pattern. No randomness is used (the generator is kept for the common API).

``protect_ends=True`` additionally keeps the first and last block (some SLEB
variants never remove them); it composes with the space's ``protected`` set.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..genome import DropPattern
from ..space import SearchError
from . import register
from .base import Strategy

__all__ = ["SlebConfig", "SlebStrategy"]


@dataclass(frozen=True)
class SlebConfig:
    protect_ends: bool = False


@register("sleb")
class SlebStrategy(Strategy):
    """Greedy one-block-at-a-time removal. Options: ``protect_ends: bool = False``."""

    config_cls = SlebConfig
    config: SlebConfig

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        extra = {0, space.n_layers - 1} if self.config.protect_ends else set()
        self.candidates_blocks: tuple[int, ...] = tuple(i for i in space.droppable if i not in extra)
        if space.k >= len(self.candidates_blocks):
            raise SearchError(
                f"k={space.k} dropped blocks must be fewer than the {len(self.candidates_blocks)} droppable blocks "
                f"left with protect_ends"
            )
        # Blocks in the order SLEB removed them (reported by the runner).
        self.removal_order: tuple[int, ...] = ()

    @property
    def current(self) -> tuple[int, ...]:
        """Currently dropped blocks, ascending."""
        return tuple(sorted(self.removal_order))

    def _remaining(self) -> list[int]:
        cur = set(self.current)
        return [b for b in self.candidates_blocks if b not in cur]

    def _candidate(self, b: int) -> DropPattern:
        return DropPattern(self.space.n_layers, self.current + (b,))

    def _propose(self) -> list[DropPattern]:
        return [self._candidate(b) for b in self._remaining()]

    def _advance(self) -> None:
        # min() keeps the first of equal losses, i.e. the lowest block index.
        b = min(self._remaining(), key=lambda b: self._memo[self._candidate(b).key])
        self.removal_order += (b,)
        if len(self.removal_order) == self.space.k:
            self._done = True

    def _extra_state(self) -> dict:
        return {"removal_order": list(self.removal_order)}

    def _load_extra_state(self, d: dict) -> None:
        self.removal_order = tuple(int(i) for i in d["removal_order"])
