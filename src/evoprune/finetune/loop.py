"""The one training loop of evoprune: AdamW steps on next-token NLL, shared by LoRA recovery and brief training.

Owns :func:`train_steps`. Each step takes the next batch of token windows, computes the causal-LM loss
(``labels = input_ids``), stops with ``FloatingPointError`` on a non-finite loss, backpropagates, clips
the gradient norm, steps the optimizer (and the learning-rate schedule) and records the loss before the
update. The caller owns which parameters train, the batches' order and the model's mode.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterator

import torch

__all__ = ["train_steps"]


def train_steps(model, params: list, batches: Iterator[torch.Tensor], steps: int, *, lr: float,
                weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                lr_factor: Callable[[int], float] | None = None, what: str = "training", hint: str = "lower the lr",
                progress: bool = False) -> list[float]:
    """Run ``steps`` optimizer steps of AdamW(``params``, ``lr``) on ``batches`` (``[B, T]`` token ids, already
    on the model's device); ``lr_factor(t)`` scales the lr at step ``t`` (LambdaLR). Returns every step's
    loss (mean NLL in nats of its batch, before its update). ``progress``: a tqdm bar on a terminal."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor) if lr_factor is not None else None
    bar = tqdm(total=steps, desc=what, unit="step", leave=False, disable=not (progress and sys.stderr.isatty()))
    losses: list[float] = []
    try:
        for s in range(steps):
            batch = next(batches)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{what} diverged at step {s} (loss {float(loss)}); {hint}")
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
        del opt, sched
    return losses
