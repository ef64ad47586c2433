"""Distillation targets for recovery training: the dense model's next-token distributions, live or cached top-k.

Owns :class:`Teacher`, :func:`teacher_fits` and :data:`CACHED_TOPK`. The loss (``--loss kd``) is
``KL(teacher || student)`` of the next-token distributions per predicted position
(:func:`~evoprune.fitness.kl.kl_divergence`, the same divergence as ``--fitness kl``), averaged over positions;
``kd+lm`` adds the next-token NLL.

Two ways to hold the teacher:

- *live* (:meth:`Teacher.live`): the dense model runs beside the student, one forward per training batch,
  exact targets (its full distribution); it costs a second model in memory and a forward per step;
- *cached top-k* (:meth:`Teacher.cached`): one pass of the teacher over every training window before training
  keeps its ``K`` most likely tokens per position and the mass of the rest (``K x 12 + 4`` bytes per position),
  then the teacher is dropped; the divergence is that of the coarse-grained distributions (a lower bound on the
  full KL, :mod:`evoprune.fitness.kl`). :func:`teacher_fits` picks: live when a second model and its logits fit
  the free memory, else top-:data:`CACHED_TOPK` cached.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..fitness.checkpoints import HEADROOM, free_bytes
from ..fitness.kl import KLTarget
from ..models.hooks import model_device

__all__ = ["Teacher", "teacher_fits", "CACHED_TOPK"]

CACHED_TOPK = 64  # on SmolLM2: 772 bytes per position instead of the full distribution's 196 kB


class Teacher:
    """Next-token targets of the dense model for training windows (see the module docstring)."""

    def __init__(self, model=None, cached: list[KLTarget] | None = None, topk: int | None = None) -> None:
        self.model, self._cached, self.topk = model, cached, topk

    @classmethod
    def live(cls, model) -> "Teacher":
        return cls(model=model.eval())

    @classmethod
    @torch.no_grad()
    def cached(cls, model, windows: torch.Tensor, topk: int = CACHED_TOPK, batch_size: int = 1) -> "Teacher":
        """Run ``model`` over every row of ``windows`` (``[n, seqlen]``) once and keep its top-``topk`` targets."""
        model.eval()
        device = model_device(model)
        out: list[KLTarget] = []
        for s in range(0, windows.shape[0], int(batch_size)):
            logits = model(input_ids=windows[s:s + int(batch_size)].to(device), use_cache=False).logits
            t = KLTarget.from_logits(logits, topk)
            out += [KLTarget(t.logp[i:i + 1].cpu(), t.ids[i:i + 1].cpu(), t.log_rest[i:i + 1].cpu())
                    for i in range(t.logp.shape[0])]
        return cls(cached=out, topk=int(topk))

    @property
    def kind(self) -> str:
        """``live`` or ``top-K cached``: what the run records."""
        return "live" if self._cached is None else f"top-{self.topk} cached"

    def targets(self, rows: Sequence[int], ids: torch.Tensor) -> KLTarget:
        """The targets of the windows ``rows`` (their indices in the training windows), whose token ids are ``ids``."""
        if self._cached is None:
            with torch.no_grad():
                return KLTarget.from_logits(self.model(input_ids=ids, use_cache=False).logits)
        parts = [self._cached[int(r)] for r in rows]
        dev = ids.device
        return KLTarget(torch.cat([p.logp for p in parts]).to(dev), torch.cat([p.ids for p in parts]).to(dev),
                        torch.cat([p.log_rest for p in parts]).to(dev))


def teacher_fits(teacher_bytes: int, batch_size: int, seqlen: int, vocab: int, device) -> bool:
    """Whether a live teacher (its weights plus its fp32 logits and log-probabilities of one batch) fits
    :data:`~evoprune.fitness.checkpoints.HEADROOM` of the free memory of ``device``."""
    return teacher_bytes + 3 * 4 * batch_size * seqlen * vocab <= HEADROOM * free_bytes(device)
