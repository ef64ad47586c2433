"""Fitness evaluation of pruning candidates (torch code; the search core never imports it).

- :mod:`.dense`: dense hidden states of the calibration set (the prefix cache's source);
- :mod:`.evaluator`: :class:`NLLEvaluator` (drop patterns, naive or prefix-cached, NLL or KL);
- :mod:`.whole_model`: evaluators that edit the whole model per candidate (width rates);
- :mod:`.levels`: level vectors, one-shot or after brief training (DarwinLM);
- :mod:`.kl`, :mod:`.prefix_lru`: KL targets and the shared-prefix LRU.
"""
from .dense import DenseBatch, dense_states
from .evaluator import Evaluation, NLLEvaluator

__all__ = ["DenseBatch", "Evaluation", "NLLEvaluator", "dense_states"]
