"""One-shot pruning scores computed from a model (torch code).

Owns :func:`block_influence` (ShortGPT's Block Influence per decoder block),
and, imported from their modules, width-pruning importance
(:mod:`evoprune.prune.wanda_sp`: Wanda-sp / magnitude structure scores, OWL
outlier ratios) and planning (:mod:`evoprune.prune.width_plan`: rates ->
kept structures). Strategies that rank by such scores live in
:mod:`evoprune.search`.
"""
from .block_influence import block_influence

__all__ = ["block_influence"]
