"""SLEB greedy block removal (Song et al., 2024), method ``sleb``.

Owns :class:`SlebConfig` and :class:`SlebStrategy`. Each step asks for the
current pattern plus each remaining droppable block (one candidate per block),
then permanently drops the block whose candidate has the lowest loss (ties:
lowest block index). After ``k`` steps the current pattern has exactly ``k``
dropped blocks and the search is done. ``generation`` counts steps. Step ``i``
(0-based) costs ``n_droppable - i`` evaluations; only the last step's
candidates are feasible (exactly ``k`` dropped), so ``best`` is the final
pattern. No randomness is used (the generator is kept for the common API).

Protected blocks (``--protect-ends``: the first and last, as some SLEB variants
keep them) are the space's: never candidates.
"""
from __future__ import annotations

from ...spaces import DropPattern
from ..base import Strategy
from ..registry import register

__all__ = ["SlebStrategy"]


@register("sleb")
class SlebStrategy(Strategy):
    """Greedy one-block-at-a-time removal (no options)."""

    round_name = "step"

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self.candidates_blocks: tuple[int, ...] = space.droppable
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
