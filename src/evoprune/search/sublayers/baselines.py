"""``random`` and ``exhaustive`` over the sub-layer space: the layer-space strategies on sub-layer patterns.

Owns :class:`SublayerRandomStrategy` and :class:`SublayerExhaustiveStrategy`. Both only use the space's
``sample`` / ``enumerate`` / ``size``, so they are the layer-space classes registered for this space
(the exhaustive size message names the sub-layer budget). For tests and small spaces: SmolLM2-135M at
20% of its block parameters has 5.4e12 feasible patterns.
"""
from __future__ import annotations

from ...spaces import SearchError
from ..layers.exhaustive import ExhaustiveStrategy
from ..layers.random_search import RandomStrategy
from ..registry import register

__all__ = ["SublayerRandomStrategy", "SublayerExhaustiveStrategy"]


@register("random", space="sublayers")
class SublayerRandomStrategy(RandomStrategy):
    """Distinct random feasible sub-layer patterns. Options: ``budget=100``."""


@register("exhaustive", space="sublayers")
class SublayerExhaustiveStrategy(ExhaustiveStrategy):
    """Every feasible sub-layer pattern, in lexicographic order of the dropped units."""

    @classmethod
    def check(cls, space, config) -> None:
        size = space.size()
        if size > config.limit and not config.force:
            budget = f"k={space.k} sub-layers" if space.k is not None else f"{space.sparsity:.0%} of the parameters"
            raise SearchError(f"exhaustive search over the {size} sub-layer patterns that drop {budget} would take "
                              f"{size} evaluations, above the limit of {config.limit}; pass --force to run it anyway")
