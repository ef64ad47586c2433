"""What each search space means for a model: one problem class per space kind.

A problem (``PROBLEMS[kind](cfg, lm)``) supplies

- ``options_cls``: the space's options (the ``space_options`` section); ``check_config(cfg)``: the
  cross-section checks that need no model;
- ``space`` (torch-free, handed to the strategy);
- ``prepare(calib, run, fresh, needs)`` -> setup token-layers (dense caches, importance scores) and the
  strategy's inputs it needs (one-shot ``scores``), counted once per run and recovered from the run
  directory on resume;
- ``setup_files``: files of the run directory besides ``calib.pt`` that ``prepare(..., fresh=False)``
  reads (a Ray worker gets copies of them; see :mod:`evoprune.runner.distributed`);
- ``evaluators`` (one per fidelity stage; ``evaluate(genome)`` -> ``Evaluation``, ``replay(genome)`` ->
  the token-layers ``evaluate`` would report, ``release()``);
- ``row(genome)`` / ``result(genome)`` / ``summary(genome)``: the space's fields of a history row, of
  ``result.json`` and of the closing line.

Torch is imported only inside the problems' methods. The typed contract: :mod:`.contract` (``Problem``,
``Evaluator``).
"""
from .contract import Evaluator, Problem
from .layers import LayerProblem, LayersOptions
from .levels import LevelProblem, LevelsOptions
from .sublayers import SublayerProblem, SublayersOptions
from .width import WidthOptions, WidthProblem

__all__ = ["PROBLEMS", "Problem", "Evaluator", "LayerProblem", "LayersOptions", "LevelProblem", "LevelsOptions", "SublayerProblem",
           "SublayersOptions", "WidthOptions", "WidthProblem"]

PROBLEMS = {p.kind: p for p in (LayerProblem, SublayerProblem, WidthProblem, LevelProblem)}
