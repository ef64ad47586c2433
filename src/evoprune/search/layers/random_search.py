"""Random search, method ``random``: the baseline any search must beat per evaluation.

Owns :class:`RandomConfig` and :class:`RandomStrategy`: distinct uniformly
random feasible patterns, ``budget`` evaluations in all (or the whole space if
smaller), asked in batches of ``batch_size``. To compare "under the same
budget" as another run, pass that run's evaluation count as ``budget``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...options import opt
from ...spaces import DropPattern, SearchError
from ..base import Strategy
from ..registry import register

__all__ = ["RandomConfig", "RandomStrategy"]


@dataclass(frozen=True)
class RandomConfig:
    budget: int = opt(100, "evaluations (or the whole space if smaller)")
    batch_size: int = opt(64, "patterns per ask", cli=False)

    def __post_init__(self) -> None:
        if not isinstance(self.budget, int) or self.budget < 1:
            raise SearchError(f"budget must be an integer >= 1, got {self.budget!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SearchError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


@register("random")
class RandomStrategy(Strategy):
    """Distinct random feasible patterns. Options: ``budget=100``, ``batch_size=64``."""

    config_cls = RandomConfig
    config: RandomConfig

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self.target = min(self.config.budget, space.size())
        self.proposed = 0

    def _propose(self) -> list[DropPattern]:
        need = min(self.config.batch_size, self.target - self.proposed)
        seen = set(self._memo)  # everything proposed before has been told
        unseen_left = self.space.size() - len(seen)
        if unseen_left <= 4 * need:
            # Nearly exhausted: rejection sampling would stall, so draw from the
            # explicit list of unseen patterns instead.
            pool = [p for p in self.space.enumerate() if p.key not in seen]
            idx = self.rng.choice(len(pool), size=need, replace=False)
            batch = [pool[int(i)] for i in idx]
        else:
            batch, keys = [], set()
            while len(batch) < need:
                p = self.space.sample(self.rng)
                if p.key not in seen and p.key not in keys:
                    keys.add(p.key)
                    batch.append(p)
        self.proposed += len(batch)
        return batch

    def _advance(self) -> None:
        if self.proposed >= self.target:
            self._done = True

    def _extra_state(self) -> dict:
        return {"proposed": self.proposed}

    def _load_extra_state(self, d: dict) -> None:
        self.proposed = int(d["proposed"])
