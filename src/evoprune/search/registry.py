"""The strategy registry: method name -> :class:`~evoprune.search.base.Strategy` subclass, per space kind.

Owns :func:`register` (the class decorator every strategy uses), :func:`get_strategy`,
:func:`methods`, :func:`default_method` and :func:`make_strategy`. Torch-free.

Discovery: the built-in strategies are the modules of the subpackages named after the space
kinds (:data:`SPACE_KINDS`: ``search/layers/``, ``search/sublayers/``, ``search/width/``,
``search/levels/``); the first
lookup imports every module found there, so a new strategy is one new module in its space's
folder (plus its test) and no list anywhere names it. A strategy defined elsewhere (a plugin, a
test) is found as soon as the module defining it has been imported.

Each space kind has one default method, the one ``evoprune search`` runs without ``--method``:
the strategy registered with ``default=True`` (the best measured in ``docs/RESULTS.md``).
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

import numpy as np

from ..spaces import SearchError

__all__ = ["SPACE_KINDS", "register", "unregister", "get_strategy", "methods", "default_method", "make_strategy"]

SPACE_KINDS = ("layers", "sublayers", "width", "levels")
_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in SPACE_KINDS}
_DEFAULTS: dict[str, str] = {}
_loaded = False


def register(name: str, space: str = "layers", *, default: bool = False) -> Callable[[type], type]:
    """Class decorator: register a ``Strategy`` subclass as method ``name`` of space kind ``space``.

    Sets ``cls.name`` and ``cls.space_kind``. A name exists once per space (``evo`` exists for
    several); ``default=True`` makes it the space's default method (one per space).
    """
    if space not in _REGISTRY:
        raise ValueError(f"unknown space kind {space!r} (known: {', '.join(SPACE_KINDS)})")

    def deco(cls: type) -> type:
        table = _REGISTRY[space]
        old = table.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"search method {name!r} registered twice for space {space!r}")
        if default and _DEFAULTS.get(space, name) != name:
            raise ValueError(f"space {space!r} has two default methods: {_DEFAULTS[space]!r} and {name!r}")
        cls.name, cls.space_kind = name, space
        table[name] = cls
        if default:
            _DEFAULTS[space] = name
        return cls

    return deco


def unregister(name: str, space: str = "layers") -> None:
    """Remove method ``name`` of ``space`` (a plugin or a test's strategy); the default method cannot go."""
    if _DEFAULTS.get(space) == name:
        raise ValueError(f"{name!r} is the default method of space {space!r}")
    _REGISTRY[space].pop(name, None)


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for kind in SPACE_KINDS:
        pkg = importlib.import_module(f"{__package__}.{kind}")
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg.__name__}.{info.name}")


def _check_space(space: str) -> None:
    if space not in _REGISTRY:
        raise SearchError(f"unknown search space {space!r} (choose from {', '.join(SPACE_KINDS)})")


def methods(space: str = "layers") -> list[str]:
    """Method names of a space kind, sorted."""
    _load_builtins()
    _check_space(space)
    return sorted(_REGISTRY[space])


def default_method(space: str = "layers") -> str:
    """The method ``evoprune search --space SPACE`` runs when no ``--method`` is given."""
    _load_builtins()
    _check_space(space)
    return _DEFAULTS[space]


def get_strategy(name: str, space: str = "layers") -> type:
    """The class registered as ``name`` for ``space``; :class:`SearchError` naming the choices otherwise."""
    _load_builtins()
    _check_space(space)
    try:
        return _REGISTRY[space][name]
    except KeyError:
        raise SearchError(f"unknown method {name!r} for --space {space} "
                          f"(choose from {', '.join(methods(space))})") from None


def make_strategy(name: str, space, rng: np.random.Generator, **options: Any):
    """Construct the strategy registered as ``name`` for ``space.kind`` with ``options``.

    Raises ``ValueError`` (:class:`SearchError`) for an unknown method, an unknown option, or an
    invalid option value.
    """
    return get_strategy(name, getattr(space, "kind", "layers"))(space, rng, **options)
