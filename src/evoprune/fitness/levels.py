"""Fitness of a level vector (``--space levels``), one-shot or after brief training (DarwinLM).

Owns :class:`LevelEvaluator`. One evaluation of a :class:`~evoprune.genome.LevelVector` ``g``:

1. :class:`~evoprune.prune.levels_db.AppliedLevels` writes the database weights of
   the units whose level differs from the previous candidate's (shared by all of
   a run's stages: it is the model's state);
2. inside :func:`~evoprune.models.slicing.width_sliced` with the database's plan for
   ``g`` (fresh, smaller projection copies; the originals go back on exit):
3. with training (``train_windows``), :func:`~evoprune.finetune.brief.brief_train`
   fine-tunes the copies on this stage's windows (the same windows and seed for
   every candidate, so a fitness is a function of the candidate and the stage);
4. the mean NLL (or KL to the dense model) on this stage's calibration slice, by a
   naive :class:`~evoprune.fitness.evaluator.NLLEvaluator`.

Cost: ``token_layers = n_tokens * n_layers`` for the fitness pass plus
``BACKWARD_FACTOR * train_tokens * n_layers`` for the training (every block runs,
including one whose attention is fully pruned). One-shot (no training), ``cache_mb``
reuses the states of candidates with the same levels in the first blocks
(:class:`~evoprune.fitness.block_prefix.BlockPrefix`, block key = the block's attention
and MLP levels): the fitness pass then runs only the blocks from the first difference on.
"""
from __future__ import annotations

import torch

from ..data.calibration import CalibSet
from ..finetune.brief import BACKWARD_FACTOR, BriefTrainConfig, brief_train
from ..models.slicing import width_sliced
from ..prune.levels_db import AppliedLevels
from .evaluator import Evaluation
from .whole_model import WholeModelEvaluator

__all__ = ["LevelEvaluator"]


class LevelEvaluator(WholeModelEvaluator):
    """Scores level vectors of ``applied.lm`` on ``calib`` (see the module docstring).

    ``train_windows``: ``[n, seqlen]`` token ids for the brief training (``None``:
    one-shot), ``train_cfg`` its options, ``train_seed`` its LoRA init. Counters as :class:`NLLEvaluator`'s.
    """

    def __init__(self, applied: AppliedLevels, calib: CalibSet, *, train_windows: torch.Tensor | None = None,
                 train_cfg: BriefTrainConfig | None = None, train_seed: int = 0, batch_size: int = 1, metric: str = "nll",
                 kl_topk: int | None = None, cache_mb: float = 0.0, cache_every: int | None = None,
                 cache_device: str | None = None) -> None:
        super().__init__(applied.lm, calib, batch_size=batch_size, metric=metric, kl_topk=kl_topk,
                         cache_mb=0.0 if train_windows is not None else cache_mb, cache_every=cache_every,
                         cache_device=cache_device)
        self.applied = applied
        self.train_windows = train_windows
        self.train_cfg = train_cfg or BriefTrainConfig()
        self.train_seed = int(train_seed)
        self.last_train: dict | None = None

    @property
    def train_tokens(self) -> int:
        return 0 if self.train_windows is None else int(self.train_windows.numel())

    @property
    def extra_token_layers(self) -> int:
        """The brief training's cost (see the module docstring)."""
        return BACKWARD_FACTOR * self.train_tokens * self.n_layers

    def prepare(self) -> None:
        """Dense KL targets (``metric="kl"``), from the dense model: call before any level is applied."""
        if self.metric == "kl" and self._nll.setup_token_layers == 0 and any(self.applied.current.values()):
            raise RuntimeError("KL targets must come from the dense model; prepare before applying levels")
        super().prepare()

    def plan(self, g):
        return self.applied.db.plan(g.attn, g.mlp, self.applied.spec)

    def block_keys(self, g) -> tuple | None:
        """Per block, its attention and MLP levels (the database fixes the weights); ``None`` when training
        (it changes every block)."""
        return None if self.train_windows is not None else tuple(zip(g.attn, g.mlp))

    def extends(self, other) -> int | None:
        """As :meth:`WholeModelEvaluator.extends`; never when training (each stage trains on its own windows)."""
        if self.train_windows is not None or getattr(other, "train_windows", None) is not None:
            return None
        return super().extends(other)

    def evaluate(self, g, race=None, done=()) -> Evaluation:
        self.prepare()
        self.applied.apply(g.attn, g.mlp)
        with width_sliced(self.lm.model, self.plan(g), self.lm.adapter):
            if self.train_windows is not None:
                self.last_train = brief_train(self.lm, self.train_windows, self.train_cfg, self.train_seed)
            with torch.no_grad():
                return self._score(race, self.block_keys(g), done)

    def release(self) -> None:
        """Dense weights back, KL targets freed."""
        self.applied.restore()
        super().release()
