"""Exhaustive enumeration of the space, method ``exhaustive``.

Owns :class:`ExhaustiveConfig` and :class:`ExhaustiveStrategy`: every feasible
pattern (``C(n_droppable, k)`` of them) in lexicographic order, asked in
batches of ``batch_size``; ``best`` is then the true optimum of the given
fitness (ties: lexicographically first). Refuses to start when the space has
more than ``limit`` patterns unless ``force=True``. No randomness is used.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

from ...options import opt
from ...spaces import DropPattern, SearchError
from ..base import Strategy
from ..registry import register

__all__ = ["ExhaustiveConfig", "ExhaustiveStrategy"]


@dataclass(frozen=True)
class ExhaustiveConfig:
    batch_size: int = opt(64, "patterns per ask", cli=False)
    limit: int = opt(5000, "most patterns without --force", cli=False)
    force: bool = opt(False, "run even above the size limit")

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SearchError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.limit, int) or self.limit < 1:
            raise SearchError(f"limit must be an integer >= 1, got {self.limit!r}")


@register("exhaustive")
class ExhaustiveStrategy(Strategy):
    """All patterns. Options: ``batch_size=64``, ``limit=5000``, ``force=False``."""

    config_cls = ExhaustiveConfig
    config: ExhaustiveConfig

    @classmethod
    def check(cls, space, config: ExhaustiveConfig) -> None:
        size = space.size()
        if size > config.limit and not config.force:
            raise SearchError(
                f"exhaustive search over C({space.n_droppable}, {space.k}) = {size} patterns would take "
                f"{size} evaluations, above the limit of {config.limit}; pass force=True (--force) to run it anyway"
            )

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self.check(space, self.config)
        self.offset = 0  # patterns already proposed, in enumeration order
        self._it: Iterator[DropPattern] | None = None

    def _iter(self) -> Iterator[DropPattern]:
        # A live iterator positioned at self.offset; rebuilt after load_state_dict.
        if self._it is None:
            self._it = itertools.islice(self.space.enumerate(), self.offset, None)
        return self._it

    def _propose(self) -> list[DropPattern]:
        batch = list(itertools.islice(self._iter(), self.config.batch_size))
        self.offset += len(batch)
        return batch

    def _advance(self) -> None:
        if self.offset >= self.space.size():
            self._done = True

    def _extra_state(self) -> dict:
        return {"offset": self.offset}

    def _load_extra_state(self, d: dict) -> None:
        self.offset = int(d["offset"])
        self._it = None
