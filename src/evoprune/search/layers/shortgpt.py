"""ShortGPT one-shot removal by Block Influence (Men et al., 2024), method ``shortgpt``.

Owns :class:`ShortGptConfig` and :class:`ShortGptStrategy`. Block Influence
``BI_i = 1 - cos(h_in, h_out)`` of block ``i`` (averaged over calibration
tokens) is computed elsewhere by torch code and passed in as ``scores``; this
strategy only ranks: it drops the ``k`` droppable blocks with the lowest BI
(ties: lower index first). ``ask()`` returns that single pattern once, so it
gets an evaluated calibration loss like every other method, then the search is
done. No randomness is used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...options import opt
from ...spaces import DropPattern, SearchError
from ..base import Strategy
from ..registry import register

__all__ = ["ShortGptConfig", "ShortGptStrategy"]


@dataclass(frozen=True)
class ShortGptConfig:
    """``scores``: Block Influence per block, length ``n_layers`` (required)."""

    scores: tuple[float, ...] = opt((), "Block Influence per block (supplied by the runner)", cli=False)

    def __post_init__(self) -> None:
        try:
            scores = tuple(float(s) for s in self.scores)
        except (TypeError, ValueError):
            raise SearchError(f"scores must be a sequence of numbers, got {self.scores!r}") from None
        if any(not math.isfinite(s) for s in scores):
            raise SearchError(f"Block Influence scores must be finite, got {list(scores)}")
        object.__setattr__(self, "scores", scores)


@register("shortgpt")
class ShortGptStrategy(Strategy):
    """Drop the ``k`` lowest-BI droppable blocks. Options: ``scores: Sequence[float]`` (required)."""

    config_cls = ShortGptConfig
    inputs = ("scores",)
    needs = frozenset({"scores"})
    config: ShortGptConfig

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        n = len(self.config.scores)
        if n != space.n_layers:
            raise SearchError(f"shortgpt needs one Block Influence score per layer: got {n}, model has {space.n_layers}")
        s = self.config.scores
        # Sorting by (score, index) makes ties deterministic.
        self.ranking: tuple[int, ...] = tuple(sorted(space.droppable, key=lambda i: (s[i], i)))
        self.pattern = DropPattern(space.n_layers, self.ranking[: space.k])

    def _propose(self) -> list[DropPattern]:
        return [self.pattern]

    def _advance(self) -> None:
        self._done = True
