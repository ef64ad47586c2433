"""evoprune: search-based pruning of Hugging Face causal LMs.

Public entry points (loaded lazily, so that ``import evoprune.search`` and ``import evoprune.spaces``
stay torch-free): :func:`load_model` (any model spec, run directories included),
:class:`DropPattern`, :class:`SearchConfig` and :func:`run_search`, :func:`perplexity`,
:func:`get_text`, :func:`export_dropped`.
"""
from __future__ import annotations

from .spaces import DropPattern
from .version import __version__

__all__ = ["__version__", "DropPattern", "SearchConfig", "run_search", "load_model", "perplexity", "export_dropped",
           "get_text"]

_LAZY = {"load_model": ("runner.pruned", "load_model"), "SearchConfig": ("runner.config", "SearchConfig"),
         "run_search": ("runner.loop", "run_search"), "perplexity": ("evaluate.perplexity", "perplexity"),
         "export_dropped": ("export.plain", "export_dropped"), "get_text": ("data.sources", "get_text")}


def __getattr__(name):  # lazy: keep torch out of pure imports
    if name not in _LAZY:
        raise AttributeError(name)
    import importlib

    module, attr = _LAZY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
