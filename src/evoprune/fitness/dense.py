"""Dense hidden states: the one capture of every block's input from a dense forward.

Owns :class:`DenseBatch`, :func:`dense_states` (run the model over a calibration set and yield every
block's input hidden state, plus the final-norm input, per batch; the prefix cache, Block Influence
and KL targets all come from it), :func:`batches` and :func:`no_blocks` (run a model with an empty
block list). Hooks come from :func:`evoprune.models.hooks.hooked`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..data.calibration import CalibSet
from ..models.hooks import hidden_arg, hooked, model_device
from ..models.loading import LoadedModel

__all__ = ["DenseBatch", "dense_states", "batches", "no_blocks"]


def batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` sample ranges of each batch."""
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(s, min(s + int(batch_size), n)) for s in range(0, n, int(batch_size))]


@dataclass(frozen=True)
class DenseBatch:
    """One calibration batch after a dense forward.

    - ``start``: index of the batch's first sample in the calibration set;
    - ``ids``: token ids ``[B, T]`` on the model device;
    - ``states``: ``n_layers + 1`` tensors ``[B, T, hidden]`` (model dtype, model
      device): ``states[i]`` is the input of block ``i``, ``states[n_layers]`` the
      input of the final norm (= the last block's output); with sub-layers
      ``2 * n_layers + 1`` (see :func:`dense_states`);
    - ``logits``: ``[B, T, vocab]``.
    """

    start: int
    ids: torch.Tensor
    states: list[torch.Tensor]
    logits: torch.Tensor


@torch.no_grad()
def dense_states(lm: LoadedModel, calib: CalibSet, batch_size: int = 1, *, sublayers: bool = False
                 ) -> Iterator[DenseBatch]:
    """Run the model as loaded over ``calib`` and yield every block's input hidden state.

    ``sublayers``: also the residual stream after each block's attention (``adapter.residual_site``),
    so ``states`` has ``2 * n_layers + 1`` entries in forward order: block ``i``'s input at ``2i``, its
    post-attention state at ``2i + 1``, the final-norm input last.

    One dense forward per batch costs ``B * seqlen * n_layers`` token-layers. Hooks
    live only for the duration of each forward (removed in ``finally``), so the
    caller may run the model between yields. Captured tensors are clones: nothing
    the model does later can alter them.
    """
    model, adapter = lm.model, lm.adapter
    blocks = list(adapter.get_blocks(model))
    if sublayers:
        blocks = [m for b in blocks for m in (b, adapter.residual_site(b))]
    targets = [*blocks, adapter.final_norm(model)]
    device = model_device(model)
    for s, e in batches(calib.n_samples, batch_size):
        ids = calib.input_ids[s:e].to(device)
        states: list[torch.Tensor | None] = [None] * len(targets)

        def capture(i: int) -> Callable:
            def hook(module, args, kwargs):
                h = hidden_arg(args, kwargs)
                if h.dim() == 2:  # a residual site that sees the stream flattened (OPT)
                    h = h.view(*ids.shape, -1)
                states[i] = h.detach().clone()

            return hook

        with hooked(((m, capture(i)) for i, m in enumerate(targets)), pre=True, with_kwargs=True):
            logits = model(input_ids=ids, use_cache=False).logits
        missing = [i for i, t in enumerate(states) if t is None]
        if missing:
            raise RuntimeError(f"dense forward did not call blocks/norm {missing} (of {len(targets) - 1} blocks + norm)")
        yield DenseBatch(start=s, ids=ids, states=states, logits=logits)


@contextlib.contextmanager
def no_blocks(lm: LoadedModel) -> Iterator[None]:
    """Run the model with an empty block list, then put the blocks back.

    For candidates whose remaining work is zero blocks (e.g. every block from the
    first dropped one on is dropped), which :class:`DropPattern` cannot express.
    Config is left alone: no block runs, so the masks and per-layer config the
    model still builds are never used. Zero-copy and reversed in ``finally``.
    """
    path, _, attr = lm.adapter.blocks.rpartition(".")
    parent = lm.model.get_submodule(path) if path else lm.model
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList())
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
