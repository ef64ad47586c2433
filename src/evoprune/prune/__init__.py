"""One-shot pruning scores computed from a model (torch code).

Owns :func:`block_influence` (ShortGPT's Block Influence per decoder block);
strategies that rank by such scores live in :mod:`evoprune.search`.
"""
from .block_influence import block_influence

__all__ = ["block_influence"]
