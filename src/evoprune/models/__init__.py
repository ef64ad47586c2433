"""Model adapters (one registration per family), loading, hooks and width slicing: the only code that
touches Hugging Face internals."""
from . import families as _families  # noqa: F401  (registers the adapters)
from .base import ADAPTERS, Adapter, adapter_for_type, get_adapter, hf_classes, register
from .loading import (
           LoadedModel,
           cache_dir,
           load_pretrained,
           reload_export,
           resolve_alias,
)

__all__ = ["ADAPTERS", "Adapter", "adapter_for_type", "get_adapter", "hf_classes", "register", "LoadedModel",
           "cache_dir", "load_pretrained", "reload_export", "resolve_alias"]
