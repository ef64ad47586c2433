"""Input Hessians of the output projections a width structure owns columns of, from a calibration set.

Owns :data:`UNITS` (a block's two units: ``attn``, whose structures own input columns of the attention
output projection ``o``, and ``mlp``, whose channels own input columns of the MLP output projection),
:data:`OUTPUT_PROJ` (unit -> that projection's role in :func:`~evoprune.models.slicing.width_linears`),
:func:`projection_hessians` (``X^T X`` of those projections' inputs, in chunks of blocks whose float64
Hessians fit a memory budget) and :func:`hessian_chunk`. Used by the level database (structured OBS) and
by width reconstruction (:mod:`evoprune.prune.reconstruct`).

Cost: one dense forward over the calibration set per chunk, stopped after the chunk's last block, so
``token_layers`` = calibration tokens x (last block of the chunk + 1), summed over chunks.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..data.calibration import CalibSet
from ..models.hooks import hooked, last_logits_kwargs, model_device
from ..models.loading import LoadedModel
from ..models.slicing import width_linears

__all__ = ["UNITS", "OUTPUT_PROJ", "projection_hessians", "hessian_chunk", "hessian_chunks", "hessian_token_layers"]

UNITS = ("attn", "mlp")
OUTPUT_PROJ = {"attn": "o", "mlp": "mlp_out"}  # the projection whose input columns a unit's structures own


def hessian_chunk(in_features, hessian_mb: float) -> int:
    """Blocks per pass: as many as whose float64 Hessians (``in x in`` for each unit's output projection,
    ``in_features``) fit ``hessian_mb`` MiB, at least one. Also what :mod:`evoprune.plan` counts."""
    return max(1, int(float(hessian_mb) * 2 ** 20 // (8 * sum(int(n) ** 2 for n in in_features))))


def hessian_token_layers(n_tokens: int, n_layers: int, chunk: int) -> int:
    """Token-layers of :func:`hessian_chunks` over ``n_layers`` blocks in chunks of ``chunk``."""
    return sum(int(n_tokens) * min(n_layers, s + chunk) for s in range(0, n_layers, chunk))


@torch.no_grad()
def projection_hessians(lm: LoadedModel, calib: CalibSet, blocks: Sequence[int], batch_size: int = 1
                        ) -> tuple[dict, int]:
    """``({(block, unit): X^T X}, token_layers)``: float64 Hessians of the output-projection inputs of ``blocks``
    over ``calib`` (the dense model as it is); the forward stops after the last of ``blocks``."""
    model, adapter = lm.model, lm.adapter
    all_blocks = adapter.get_blocks(model)
    acc: dict = {}

    class _Stop(Exception):
        pass

    def hook(key):
        def fn(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc[key] = acc[key] + x.T @ x if key in acc else x.T @ x
        return fn

    def stop(module, args, output):
        raise _Stop

    hooks = []
    for i in blocks:
        lin = width_linears(adapter, all_blocks[i])
        hooks += [(lin[OUTPUT_PROJ[unit]], hook((i, unit))) for unit in UNITS]
    last = max(blocks)
    hooks.append((all_blocks[last], stop))
    kw, device = last_logits_kwargs(model), model_device(model)
    with hooked(hooks):
        for s in range(0, calib.n_samples, int(batch_size)):
            try:
                model(input_ids=calib.input_ids[s:s + int(batch_size)].to(device), use_cache=False, **kw)
            except _Stop:
                pass
    return acc, calib.n_tokens * (last + 1)


def hessian_chunks(lm: LoadedModel, calib: CalibSet, hessian_mb: float, batch_size: int = 1
                   ) -> Iterator[tuple[list[int], dict, int]]:
    """``(blocks, Hessians, token_layers)`` of every chunk of blocks (see :func:`hessian_chunk`), in order."""
    blocks = lm.adapter.get_blocks(lm.model)
    lin0 = width_linears(lm.adapter, blocks[0])
    chunk = hessian_chunk([lin0[OUTPUT_PROJ[u]].in_features for u in UNITS], hessian_mb)
    for start in range(0, len(blocks), chunk):
        ids = list(range(start, min(len(blocks), start + chunk)))
        hess, tl = projection_hessians(lm, calib, ids, batch_size)
        yield ids, hess, tl
