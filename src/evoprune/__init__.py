"""evoprune: search-based pruning of Hugging Face causal LMs.

Public entry points: :func:`load_model`, :class:`DropPattern`, :func:`perplexity`,
:func:`export_dropped`. Heavy modules (torch, transformers) load lazily so that
``import evoprune.search`` stays torch-free.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .genome import DropPattern  # noqa: E402  (pure)

__all__ = ["__version__", "DropPattern", "load_model", "perplexity", "export_dropped", "get_text"]


def __getattr__(name):  # lazy: keep torch out of pure imports
    if name == "load_model":
        from .models import load_model

        return load_model
    if name == "perplexity":
        from .evaluate.perplexity import perplexity

        return perplexity
    if name == "export_dropped":
        from .export import export_dropped

        return export_dropped
    if name == "get_text":
        from .data.sources import get_text

        return get_text
    raise AttributeError(name)
