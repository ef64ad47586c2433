"""Fitness evaluation of pruning candidates (torch code; the search core never imports it).

Owns turning a :class:`~evoprune.genome.DropPattern` into a fitness number and
its compute cost in token-layers: :class:`NLLEvaluator` (naive or prefix-cached
mean calibration NLL) and :func:`dense_states`, the shared dense hidden-state
capture. Width-pruning rate vectors are scored by
:class:`evoprune.fitness.width.WidthEvaluator` (import it from its module).
"""
from .evaluator import DenseBatch, Evaluation, NLLEvaluator, dense_states

__all__ = ["DenseBatch", "Evaluation", "NLLEvaluator", "dense_states"]
