"""Brief training of a candidate during training-aware selection (DarwinLM): LoRA or a few full steps.

Owns :class:`BriefTrainConfig`, :func:`brief_train` and :func:`disjoint_windows`.

:func:`brief_train` trains ``lm.model`` for one pass over the given windows (one
optimizer step per ``batch_size`` windows) and changes the weights of the
decoder blocks' projections (q/k/v/o and MLP) **in place**, nothing else:

- ``mode="lora"``: peft LoRA adapters (``rank``, ``alpha = 2 * rank``, no dropout)
  on those projections, merged into them afterwards (:func:`~evoprune.finetune.lora.finetune_lora`);
- ``mode="full"``: AdamW on the projection weights themselves (norms,
  embeddings and the LM head stay frozen).

The caller scopes it: training-aware selection runs it inside
:func:`~evoprune.models.slicing.width_sliced`, whose projections are fresh copies
that are dropped on exit, so the model is the database's again for the next
candidate and no model copy is ever made. Deterministic for a seed on CPU.

Cost in token-layers: a training step on ``T`` tokens runs forward and backward
through all ``L`` blocks; it is counted as ``3 * T * L`` (backward ~ 2 forwards).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .loop import only_training, train_steps
from .options import BriefTrainConfig

__all__ = ["BriefTrainConfig", "brief_train", "disjoint_windows", "shuffled", "BACKWARD_FACTOR"]

BACKWARD_FACTOR = 3  # token-layers of a training token per block: forward + backward


def brief_train(lm, windows: torch.Tensor, cfg: BriefTrainConfig, seed: int = 0) -> dict:
    """Train ``lm.model`` on ``windows`` (``[n, seqlen]`` token ids) once through (LoRA init from ``seed``);
    returns ``{"steps", "tokens", "loss_first", "loss_last"}`` (see the module docstring for what changes)."""
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise UserError(f"training windows must be [n >= 1, seqlen], got {tuple(windows.shape)}")
    steps = -(-int(windows.shape[0]) // int(cfg.batch_size))
    with torch.enable_grad():  # callers may score candidates under no_grad
        return _lora(lm, windows, cfg, steps, seed) if cfg.mode == "lora" else _full(lm, windows, cfg, steps)


def _lora(lm, windows: torch.Tensor, cfg: BriefTrainConfig, steps: int, seed: int) -> dict:
    from .lora import LoRAConfig, finetune_lora

    lc = LoRAConfig(steps=steps, rank=int(cfg.rank), alpha=2.0 * int(cfg.rank), dropout=0.0, lr=cfg.lr,
                    seqlen=int(windows.shape[1]), batch_size=int(cfg.batch_size), schedule="constant",
                    seed=int(seed))
    stats = finetune_lora(lm, windows, lc)
    return {"steps": stats["steps"], "tokens": stats["tokens"], "loss_first": stats["loss_first"],
            "loss_last": stats["loss_last"]}


def _full(lm, windows: torch.Tensor, cfg: BriefTrainConfig, steps: int) -> dict:
    from .lora import resolve_targets

    model = lm.model
    names = set(resolve_targets(lm))
    params = [m.weight for n, m in model.named_modules() if n in names]
    device = params[0].device
    with only_training(model, params):
        batches = (windows[s * cfg.batch_size:(s + 1) * cfg.batch_size].to(device) for s in range(steps))
        losses = train_steps(model, params, batches, steps, lr=cfg.lr, what="brief training")
    return {"steps": steps, "tokens": int(windows.numel()), "loss_first": losses[0], "loss_last": losses[-1]}


def disjoint_windows(pool: torch.Tensor, calib_ids: torch.Tensor, n: int = 16) -> torch.Tensor:
    """The rows of ``pool`` (``[m, seqlen]``) that share no ``n``-token sequence with any row of
    ``calib_ids`` (``[k, t]``): training text kept apart from fitness text even when both come from the
    same source (a repeated ``n``-gram inside the source drops a window too: conservative)."""
    def grams(rows: torch.Tensor) -> list[set]:
        out = []
        for r in rows.tolist():
            out.append({tuple(r[i:i + n]) for i in range(max(0, len(r) - n + 1))})
        return out

    banned = set().union(*grams(calib_ids)) if calib_ids.numel() else set()
    keep = [i for i, g in enumerate(grams(pool)) if not (g & banned)]
    return pool[torch.tensor(keep, dtype=torch.long)] if keep else pool[:0]


def shuffled(windows: torch.Tensor, seed: int) -> torch.Tensor:
    """``windows`` in a seeded random order (numpy ``default_rng(seed)``)."""
    return windows[torch.from_numpy(np.random.default_rng(seed).permutation(windows.shape[0]))]
