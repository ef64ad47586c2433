"""Adapters for the supported families, one registration each.

Llama, Mistral, Qwen2, Qwen3 and Gemma-3 (text) share the Llama layout
(``model.layers``, q/k/v/o projections, gated MLP); they differ only in config
details that the base adapter already reads (``head_dim``, GQA, ``layer_types``).
OPT keeps its blocks under ``model.decoder.layers``, names its output
projection ``out_proj`` and has an ungated MLP (``fc1``/``fc2`` on the block).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Adapter, register

__all__ = ["LlamaAdapter", "MistralAdapter", "Qwen2Adapter", "Qwen3Adapter", "Gemma3Adapter", "OPTAdapter"]


@register("llama")
@dataclass(frozen=True)
class LlamaAdapter(Adapter):
    """Llama 2/3, SmolLM2, TinyLlama: GQA attention, SwiGLU MLP."""


@register("mistral")
@dataclass(frozen=True)
class MistralAdapter(Adapter):
    """Mistral: Llama layout with sliding-window attention configured globally."""


@register("qwen2")
@dataclass(frozen=True)
class Qwen2Adapter(Adapter):
    """Qwen2 / Qwen2.5: q/k/v biases, optional per-layer sliding attention in ``layer_types``."""


@register("qwen3")
@dataclass(frozen=True)
class Qwen3Adapter(Adapter):
    """Qwen3: per-head q/k RMSNorm inside attention (shared across heads, so unaffected by drops)."""


@register("gemma3_text")
@dataclass(frozen=True)
class Gemma3Adapter(Adapter):
    """Gemma-3 text: alternating sliding/full attention listed per layer in ``layer_types``; its sub-layers
    are wrapped in pre- and post-norms (the residual stream enters ``pre_feedforward_layernorm``)."""

    mlp_norm: str = "pre_feedforward_layernorm"


@register("opt")
@dataclass(frozen=True)
class OPTAdapter(Adapter):
    """OPT: blocks under ``model.decoder.layers``, MHA (no GQA), ReLU MLP ``fc1``/``fc2``."""

    blocks: str = "model.decoder.layers"
    norm: str = "model.decoder.final_layer_norm"
    o: str = "out_proj"
    mlp: str = ""
    mlp_in: tuple[str, ...] = ("fc1",)
    mlp_out: str = "fc2"
    mlp_norm: str = "final_layer_norm"
    per_layer_keys: tuple[str, ...] = ()
    attn_head_attrs: tuple[str, ...] = ("num_heads",)  # OPTAttention views q/k/v with self.num_heads

    def intermediate_size(self, config) -> int:
        return int(config.ffn_dim)
