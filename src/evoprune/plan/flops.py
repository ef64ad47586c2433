"""FLOPs per token of a model's parts, LM head included: what token-layers leave out.

Owns :func:`per_token` and :func:`block_flops`. Token-layers count decoder blocks only; every
evaluation also runs the LM head on all its tokens (on SmolLM2-135M the head, 49,152 x 576, costs
about as much per token as 8 decoder blocks). Per token:

- a decoder block: 2 x (weights of its linear layers) + attention scores and values,
  4 x heads x head_dim x the mean causal context ``(T + 1) / 2`` of a ``T``-token window;
- the LM head: 2 x vocab x hidden.

Multiply-adds count 2 FLOPs; norms, rotary embeddings and softmax are left out (< 1% here). Works on
a ``meta``-device model (shapes only).
"""
from __future__ import annotations

__all__ = ["per_token", "block_flops"]


def per_token(lm) -> dict:
    """``{"block": FLOPs of one block's weights, "attn": FLOPs per context token, "head": LM head}`` per token."""
    import torch

    block = lm.adapter.get_blocks(lm.model)[0]
    weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    cfg = lm.model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"block": 2.0 * weights, "attn": 4.0 * cfg.num_attention_heads * head_dim,
            "head": 2.0 * lm.model.get_output_embeddings().weight.numel()}


def block_flops(f: dict, seqlen: int) -> float:
    """FLOPs of one decoder block per token of a ``seqlen``-token window."""
    return f["block"] + f["attn"] * (seqlen + 1) / 2
