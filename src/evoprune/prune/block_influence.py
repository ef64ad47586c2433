"""ShortGPT Block Influence (Men et al., 2024): how much each decoder block changes its input.

Owns :func:`block_influence`, the one implementation. ``BI_i = 1 - mean_t cos(x_i[t], x_{i+1}[t])``,
where ``x_i`` is block ``i``'s input hidden state, ``x_{i+1}`` its output (the next block's input, or
the final norm's input for the last block), and the mean runs over every calibration token (all
samples, all positions). Blocks with low BI barely change the residual stream and are ShortGPT's
first to drop (the ranking itself is :class:`evoprune.search.layers.shortgpt.ShortGptStrategy`).
The hidden states come from :func:`evoprune.fitness.dense.dense_states` (the evaluator's prefix cache
holds exactly them, so a search computes BI with no forward of its own).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["block_influence"]


@torch.no_grad()
def block_influence(batches: Iterable[Sequence[torch.Tensor]]) -> list[float]:
    """Block Influence of every block from per-batch dense states.

    ``batches``: for each calibration batch, ``n_layers + 1`` tensors ``[B, T, hidden]`` (block inputs,
    then the final-norm input), e.g. ``(b.states for b in dense_states(lm, calib))``. Returns
    ``n_layers`` floats in ``[0, 2]`` (0: the block is an identity on these tokens). Cosines are taken
    in fp32 (also for half-precision models) and summed in fp64 across tokens.
    """
    cos_sum, n_tokens = None, 0
    for states in batches:
        n = len(states) - 1
        if cos_sum is None:
            cos_sum = torch.zeros(n, dtype=torch.float64)
        for i in range(n):
            c = F.cosine_similarity(states[i].float(), states[i + 1].float(), dim=-1)
            cos_sum[i] += c.double().sum().cpu()
        n_tokens += states[0].shape[0] * states[0].shape[1]
    if cos_sum is None:
        raise ValueError("block_influence needs at least one batch of hidden states")
    # clamp: rounding can put cos a hair outside [-1, 1]
    return [float(s) for s in (1.0 - cos_sum / n_tokens).clamp(0.0, 2.0)]
