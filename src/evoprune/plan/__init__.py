"""Planning a search before it runs: a model without weights (``meta`` device), its memory and compute.

:func:`make_plan` (:mod:`.planner`), :func:`resolve_config` / :func:`meta_model` / :func:`reference_configs`
(:mod:`evoprune.models.meta`), dry runs of a method (:mod:`.simulate`), FLOPs per token (:mod:`.flops`).
"""
from ..models.meta import meta_model, reference_configs, resolve_config
from .planner import make_plan

__all__ = ["make_plan", "meta_model", "reference_configs", "resolve_config"]
