"""Search strategies over pruning spaces: torch-free ask/tell optimizers.

- :mod:`.registry`: ``register`` / ``get_strategy`` / ``methods`` / ``default_method`` / ``make_strategy``;
  the built-ins are discovered in the space folders below;
- :mod:`.base`: the :class:`Strategy` contract; :mod:`.staged`: multi-fidelity (staged) selection;
- :mod:`.layers`, :mod:`.width`, :mod:`.levels`: the strategies of each space kind;
- :mod:`.llm`: Self-Pruner's LLM operator, its prompts and the local chat servers.

Strategies see genomes and fitness numbers only; evaluation lives in :mod:`evoprune.fitness`.
"""
from .base import NoOptions, Strategy, drive
from .registry import (
           SPACE_KINDS,
           default_method,
           get_strategy,
           make_strategy,
           methods,
           register,
)

__all__ = ["NoOptions", "Strategy", "drive", "SPACE_KINDS", "default_method", "get_strategy", "make_strategy",
           "methods", "register"]
