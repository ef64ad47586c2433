"""Search strategies over pruning spaces: the registry and the factory.

Owns :data:`STRATEGIES` (method name -> :class:`~evoprune.search.base.Strategy`
subclass), the :func:`register` decorator, and :func:`make_strategy`. Importing
this package registers the built-in methods (layers: ``evop``, ``sleb``,
``shortgpt``, ``exhaustive``, ``random``, ``evo``; width: ``uniform``, ``owl``,
``evo``, ``self-pruner``; levels: ``darwinlm``, ``uniform``). Torch-free: strategies only see genomes
and fitness numbers; evaluation lives elsewhere.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..space import SearchError

__all__ = ["REGISTRY", "STRATEGIES", "methods", "register", "make_strategy", "Strategy", "drive"]

# space kind ("layers", "width", "levels") -> method name -> Strategy subclass
REGISTRY: dict[str, dict[str, type]] = {"layers": {}, "width": {}, "levels": {}}
STRATEGIES = REGISTRY["layers"]  # the layer-drop methods (the default space)


def register(name: str, space: str = "layers") -> Callable[[type], type]:
    """Class decorator: register a ``Strategy`` subclass under ``name`` for search space kind ``space``
    (sets ``cls.name``). The same name may exist once per space (``evo`` does)."""

    def deco(cls: type) -> type:
        table = REGISTRY[space]
        if name in table and table[name] is not cls:
            raise ValueError(f"search method {name!r} registered twice for space {space!r}")
        cls.name = name
        table[name] = cls
        return cls

    return deco


def methods(space: str = "layers") -> list[str]:
    """Method names available for a space kind, sorted."""
    return sorted(REGISTRY.get(space, {}))


def make_strategy(name: str, space, rng: np.random.Generator, **options: Any):
    """Construct the strategy registered as ``name`` for ``space.kind``.

    Raises ``ValueError`` (:class:`~evoprune.space.SearchError`) for an unknown
    method, an unknown option, or an invalid option value.
    """
    kind = getattr(space, "kind", "layers")
    try:
        cls = REGISTRY[kind][name]
    except KeyError:
        raise SearchError(f"unknown method {name} for --space {kind} "
                          f"(choose from {', '.join(methods(kind))})") from None
    return cls(space, rng, **options)


# Imported last: each module registers itself via ``register`` defined above.
from .base import Strategy, drive  # noqa: E402
from . import evo, evop, exhaustive, random_search, self_pruner, shortgpt, sleb, training_aware, width  # noqa: E402,F401
