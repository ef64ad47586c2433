"""ShortGPT Block Influence (Men et al., 2024): how much each decoder block changes its input.

Owns :func:`block_influence`. ``BI_i = 1 - mean_t cos(x_i[t], x_{i+1}[t])``,
where ``x_i`` is block ``i``'s input hidden state, ``x_{i+1}`` its output (the
next block's input, or the final norm's input for the last block), and the mean
runs over every calibration token (all samples, all positions). Blocks with low
BI barely change the residual stream and are ShortGPT's first to drop (the
ranking itself is :class:`evoprune.search.shortgpt.ShortGptStrategy`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.calibration import CalibSet
from ..fitness.evaluator import dense_states
from ..models.loading import LoadedModel

__all__ = ["block_influence"]


@torch.no_grad()
def block_influence(lm: LoadedModel, calib: CalibSet, batch_size: int = 1) -> tuple[list[float], int]:
    """Block Influence of every block of ``lm`` on ``calib``, from one dense forward.

    Returns ``(scores, token_layers)``: ``scores`` has ``n_layers`` floats in
    ``[0, 2]`` (0: the block is an identity on these tokens), ``token_layers =
    n_samples * seqlen * n_layers``. Hidden states are streamed per batch, never
    stored for the whole set.
    """
    n = lm.n_layers
    cos_sum = torch.zeros(n, dtype=torch.float64)
    for batch in dense_states(lm, calib, batch_size):
        for i in range(n):
            # fp32 cosine even for half-precision models; summed in fp64 across tokens
            c = F.cosine_similarity(batch.states[i].float(), batch.states[i + 1].float(), dim=-1)
            cos_sum[i] += c.double().sum().cpu()
    # clamp: rounding can put cos a hair outside [-1, 1]
    scores = (1.0 - cos_sum / calib.n_tokens).clamp(0.0, 2.0)
    return [float(s) for s in scores], calib.n_tokens * n
