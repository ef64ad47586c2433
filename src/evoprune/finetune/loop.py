"""The one training loop of evoprune: AdamW steps, shared by recovery fine-tuning and brief training.

Owns :func:`train_steps` and :func:`only_training` (the parameters that train, for the length of a block). Each step takes the next batch, computes its loss (by default the causal-LM loss
of a batch of token windows, ``labels = input_ids``; recovery distillation passes its own), stops with
``FloatingPointError`` on a non-finite loss, backpropagates, clips the gradient norm, steps the optimizer
(and the learning-rate schedule) and records the loss before the update. The caller owns which parameters
train, the batches' order and the model's mode.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

__all__ = ["train_steps", "only_training"]


@contextmanager
def only_training(model, params: list) -> Iterator[None]:
    """Inside the block only ``params`` of ``model`` require gradients and it is in train mode; every flag, the
    gradients and the mode are restored afterwards, also on exceptions."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.train()
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
            p.grad = None
        model.train(was_training)


def train_steps(model, params: list, batches: Iterator, steps: int, *, lr: float,
                weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                lr_factor: Callable[[int], float] | None = None, what: str = "training", hint: str = "lower the lr",
                progress: bool = False, loss_fn: Callable | None = None, resume: dict | None = None,
                on_step: Callable | None = None) -> list[float]:
    """Run ``steps`` optimizer steps of AdamW(``params``, ``lr``) on ``batches``; ``lr_factor(t)`` scales the lr
    at step ``t`` (LambdaLR). ``loss_fn(model, batch)``: a batch's loss (default: the mean next-token NLL of
    ``batch``, ``[B, T]`` token ids on the model's device). Returns every step's loss, before its update.
    ``progress``: a tqdm bar on a terminal. ``resume``: a saved ``{"losses", "optimizer", "scheduler"}`` to
    continue from (``batches`` then starts at step ``len(losses)``); ``on_step(opt, sched, losses)``: called
    after every completed step (checkpoints)."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor) if lr_factor is not None else None
    losses: list[float] = []
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        if sched is not None and resume.get("scheduler") is not None:
            sched.load_state_dict(resume["scheduler"])
        losses = [float(x) for x in resume["losses"]]
    bar = tqdm(total=steps, initial=len(losses), desc=what, unit="step", leave=False,
               disable=not (progress and sys.stderr.isatty()))
    try:
        for s in range(len(losses), steps):
            batch = next(batches)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss if loss_fn is None else \
                loss_fn(model, batch)
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
            if on_step is not None:
                on_step(opt, sched, losses)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
        del opt, sched
    return losses
