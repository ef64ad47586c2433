"""Model adapters (one registration per family) and model loading."""
from .base import ADAPTERS, Adapter, adapter_for_type, get_adapter, register
from . import families as _families  # noqa: F401  (registers the adapters)
from .loading import LoadedModel, load_model, resolve_alias

__all__ = ["ADAPTERS", "Adapter", "adapter_for_type", "get_adapter", "register", "LoadedModel", "load_model", "resolve_alias"]
