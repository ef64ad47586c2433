"""Search strategies over pruning spaces: the registry and the factory.

Owns :data:`STRATEGIES` (method name -> :class:`~evoprune.search.base.Strategy`
subclass), the :func:`register` decorator, and :func:`make_strategy`. Importing
this package registers the built-in methods (``evop``, ``sleb``, ``shortgpt``,
``exhaustive``, ``random``). Torch-free: strategies only see ``DropPattern``s
and fitness numbers; evaluation lives elsewhere.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..space import LayerDropSpace, SearchError

__all__ = ["STRATEGIES", "register", "make_strategy", "Strategy", "drive"]

STRATEGIES: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    """Class decorator: register a ``Strategy`` subclass under ``name`` (sets ``cls.name``)."""

    def deco(cls: type) -> type:
        if name in STRATEGIES and STRATEGIES[name] is not cls:
            raise ValueError(f"search method {name!r} registered twice")
        cls.name = name
        STRATEGIES[name] = cls
        return cls

    return deco


def make_strategy(name: str, space: LayerDropSpace, rng: np.random.Generator, **options: Any):
    """Construct the strategy registered as ``name``.

    Raises ``ValueError`` (:class:`~evoprune.space.SearchError`) for an unknown
    method, an unknown option, or an invalid option value.
    """
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise SearchError(f"unknown method {name} (choose from {', '.join(sorted(STRATEGIES))})") from None
    return cls(space, rng, **options)


# Imported last: each module registers itself via ``register`` defined above.
from .base import Strategy, drive  # noqa: E402
from . import evo, evop, exhaustive, random_search, shortgpt, sleb  # noqa: E402,F401
