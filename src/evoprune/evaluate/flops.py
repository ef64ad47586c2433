"""The FLOP model behind ``bench``'s ideal speedup.

Owns :func:`forward_flops` and :func:`ideal_speedup`. :func:`forward_flops` estimates a forward pass's
FLOPs from ``adapter.info`` — ``2 x params`` per token for every decoder block's matrices plus the
attention score / value products ``4 x heads x head_dim x context`` per token and block, optionally the
LM head. Per-block lists (``layer_params``, ``layer_heads`` in the info) are used when present, else the
totals are spread evenly over the blocks. For layer dropping the block-only ratio is exactly
``L / (L - k)``; for width pruning it is the FLOP ratio. ``logits_tokens`` adds the LM head (last
position only in prefill, every step in decode) to show what fixed cost bounds the speedup.
"""
from __future__ import annotations

import math

__all__ = ["forward_flops", "ideal_speedup"]


def _per_layer(info: dict, key: str, total_key: str | None, default) -> list[float]:
    n = int(info["layers"])
    val = info.get(key)
    if isinstance(val, (list, tuple)):
        if len(val) != n:
            raise ValueError(f"info[{key!r}] has {len(val)} entries for {n} layers")
        return [float(v) for v in val]
    if total_key is not None and info.get(total_key) is not None:
        return [float(info[total_key]) / n] * n if n else []
    return [float(default)] * n


def forward_flops(info: dict, *, new_tokens: int = 1, ctx: float = 0.0, logits_tokens: int = 0) -> float:
    """Estimated FLOPs of one forward pass of the model described by ``info`` (``adapter.info``).

    ``new_tokens`` tokens are processed, each attending to ``ctx`` positions on
    average; ``logits_tokens`` of them go through the LM head (0: blocks only).
    Per block: ``2 x block params`` per token (the matrix multiplies) plus
    ``4 x heads x head_dim x ctx`` per token (scores and weighted values).
    """
    layer_params = _per_layer(info, "layer_params", "block_params", 0)
    layer_heads = _per_layer(info, "layer_heads", None, info.get("heads", 0))
    hd = float(info.get("head_dim", 0))
    blocks = sum(2.0 * p * new_tokens + 4.0 * h * hd * ctx * new_tokens for p, h in zip(layer_params, layer_heads))
    head = 2.0 * float(info.get("hidden", 0)) * float(info.get("vocab", 0)) * logits_tokens
    return blocks + head


def ideal_speedup(dense_info: dict, pruned_info: dict, *, new_tokens: int = 1, ctx: float = 0.0,
                  logits_tokens: int = 0) -> float:
    """Dense / pruned FLOPs of the same forward pass (see :func:`forward_flops`).

    With the defaults (decoder-block matrices only) this is ``L / (L - k)`` for
    dropping ``k`` of ``L`` equal blocks, and the FLOP ratio for width pruning.
    """
    kw = dict(new_tokens=new_tokens, ctx=ctx, logits_tokens=logits_tokens)
    num, den = forward_flops(dense_info, **kw), forward_flops(pruned_info, **kw)
    return num / den if den > 0 else math.inf
