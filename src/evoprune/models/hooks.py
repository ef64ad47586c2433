"""Forward hooks and forward-call conventions: the one place that attaches hooks to a model.

Owns :func:`hooked` (register forward or forward-pre hooks for the duration of a ``with`` block;
always removed, also on exceptions), :func:`hidden_arg` / :func:`with_hidden` (the ``hidden_states``
input of a decoder block or norm call, positional or keyword) and :func:`last_logits_kwargs` (the
keyword that makes a causal LM compute only the last position's logits, where the model takes it).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = ["hooked", "hidden_arg", "with_hidden", "last_logits_kwargs", "model_device"]


@contextmanager
def hooked(hooks: Iterable[tuple[nn.Module, Callable]], *, pre: bool = False,
           with_kwargs: bool = False) -> Iterator[None]:
    """Register ``fn`` on each ``module`` of ``hooks`` (forward hooks, or forward-pre hooks with ``pre``;
    ``with_kwargs`` as in torch) while the block runs; every handle is removed on exit."""
    handles = []
    try:
        for module, fn in hooks:
            reg = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(reg(fn, with_kwargs=with_kwargs))
        yield
    finally:
        for h in handles:
            h.remove()


def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The ``hidden_states`` input of a block/norm call (positional arg 0 or keyword)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise RuntimeError("cannot find the hidden_states input of a decoder block call")


def with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the ``hidden_states`` input replaced by ``h`` (same shape)."""
    old = hidden_arg(args, kwargs)
    if old.shape != h.shape:
        raise RuntimeError(f"cached hidden state has shape {tuple(h.shape)}, the model fed {tuple(old.shape)}")
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def last_logits_kwargs(model: nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` when ``model.forward`` takes it (only the last position goes through
    the LM head, as in generation), else ``{}``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (token ids go there)."""
    return next(model.parameters()).device
