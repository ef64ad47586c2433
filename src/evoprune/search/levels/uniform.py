"""The ``uniform`` baseline of ``--space levels``: every block as close to the target as the ladders allow.

Owns :class:`LevelUniform` (one candidate: :meth:`~evoprune.spaces.LevelSpace.uniform`). Torch-free.
"""
from __future__ import annotations

from ..base import OneShot
from ..registry import register

__all__ = ["LevelUniform"]


@register("uniform", space="levels")
class LevelUniform(OneShot):
    """One candidate: :meth:`LevelSpace.uniform` (the most uniform feasible level vector)."""

    def _genome(self):
        return self.space.uniform()
