"""A loaded (pruned) model as llama.cpp's GGUF sees it: architecture, per-layer sizes, metadata and tensors.

Owns the mapping from a family's Hugging Face modules to llama.cpp tensor names and hyper-parameters,
the only place the GGUF export touches HF internals. :func:`gguf_model` reads the model as it is in
memory (blocks removed, widths sliced, weights reconstructed or fine-tuned) and returns a
:class:`GGUFModel`: plain data that :mod:`evoprune.export.gguf` writes with the ``gguf`` package.

- Blocks of one size: the family's own llama.cpp architecture (``llama`` for Llama / Mistral / SmolLM2,
  ``qwen2``, ``qwen3``) with fewer blocks.
- Blocks of different sizes (width, levels, attention- or MLP-free blocks): llama.cpp's ``deci`` architecture
  (NVIDIA's Nemotron-NAS), whose ``head_count``, ``head_count_kv`` and ``feed_forward_length`` are per-layer
  arrays, for the families whose blocks it computes (no q/k norms). The head dimension is written explicitly
  (``key_length``), or a first layer with fewer heads is refused by llama.cpp. An attention-free block is a
  layer with 0 heads and no attention tensors. An MLP-free block that keeps its attention is written as one
  MLP channel whose down-projection column is zero: the same function, because llama.cpp 0.3.x computes a
  ``feed_forward_length`` 0 layer with attention wrongly (3.3% off on SmolLM2, see docs/gguf.md).
- Anything else (Gemma-3, OPT, rope scalings llama.cpp reads otherwise) raises :class:`UserError` naming
  the structure, before any work.

Q and K rows go in llama.cpp's rope order for the ``llama`` / ``deci`` architectures (HF rotates halves,
llama.cpp adjacent pairs): the converter's per-head permutation, done per layer with that layer's heads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .base import family, get_adapter

__all__ = ["GGUFModel", "GGUFLayer", "GGUF_FAMILIES", "gguf_model", "gguf_arch", "layer_sizes"]


@dataclass(frozen=True)
class _Family:
    arch: str  # llama.cpp architecture of a model whose blocks have one size
    permute_qk: bool  # llama.cpp's rope for ``arch`` pairs adjacent dims (NORM), HF rotates halves
    hetero: bool  # blocks of different sizes can be written as ``deci``
    qk_norm: bool = False


# model_type -> how llama.cpp runs it (convert_hf_to_gguf.py: LlamaModel, Qwen2Model, Qwen3Model). ``deci`` loads a
# q bias of the full width only, and has no q/k norms: Qwen2 / Qwen3 blocks of different sizes are refused.
GGUF_FAMILIES = {"llama": _Family("llama", True, True), "mistral": _Family("llama", True, True),
                 "qwen2": _Family("qwen2", False, False), "qwen3": _Family("qwen3", False, False, qk_norm=True)}


@dataclass(frozen=True)
class GGUFLayer:
    """One block's sizes as written: query heads, KV heads, MLP channels (0 heads: attention-free)."""

    heads: int
    kv_heads: int
    ff: int


@dataclass
class GGUFModel:
    """What the export writes: ``arch``, hyper-parameters, layers and tensors (name -> fp32 array)."""

    arch: str
    layers: list[GGUFLayer]
    hparams: dict
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    padded_mlp: list[int] = field(default_factory=list)  # layers whose MLP got zero channels (empty, or rounded up)
    padded_attention: list[int] = field(default_factory=list)  # attention-free layers written with one zero group

    @property
    def homogeneous(self) -> bool:
        return self.arch != "deci"


def _linear(block: nn.Module, path: str) -> nn.Linear:
    return block.get_submodule(path)


def layer_sizes(model: nn.Module) -> list[GGUFLayer]:
    """Query heads, KV heads and MLP channels of every block, read from the Linear shapes."""
    adapter = get_adapter(model)
    hd = _head_dim(model)
    out = []
    for block in adapter.get_blocks(model):
        attn, mlp = adapter.attention(block), adapter.mlp_module(block)
        q, k = _linear(attn, adapter.q).out_features, _linear(attn, adapter.k).out_features
        ff = _linear(mlp, adapter.mlp_in[0]).out_features
        out.append(GGUFLayer(q // hd, k // hd, ff))
    return out


def _head_dim(model: nn.Module) -> int:
    c = model.config
    return int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


def _rope(config) -> tuple[float, dict | None]:
    """(rope theta, rope scaling dict or None) across transformers' two spellings."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or None
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = (params or scaling or {}).get("rope_type") or (params or scaling or {}).get("type") or "default"
    return float(theta), (None if kind == "default" else {**(scaling or {}), **params, "rope_type": kind})


def _check(model: nn.Module) -> _Family:
    fam = GGUF_FAMILIES.get(family(model))
    if fam is None:
        raise UserError(f"--format gguf: llama.cpp has no architecture evoprune can write for {family(model)!r} "
                        f"models (supported: {', '.join(sorted(GGUF_FAMILIES))}); export it as a Hugging Face "
                        "directory instead")
    _, scaling = _rope(model.config)
    if scaling is not None and scaling["rope_type"] not in ("linear", "llama3"):
        raise UserError(f"--format gguf: rope scaling {scaling['rope_type']!r} is not supported by evoprune's "
                        "GGUF writer (supported: none, linear, llama3)")
    return fam


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's half-rotation rows of ``heads`` heads -> llama.cpp's adjacent-pair order (per head)."""
    if heads == 0:
        return w
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_freqs(config, scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """The ``rope_freqs`` factors llama.cpp multiplies Llama-3 rope wavelengths by (the converter's formula)."""
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0), \
        scaling.get("high_freq_factor", 4.0)
    old = scaling.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old / low, old / high
    out = []
    for f in base.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _refuse_mixed(model: nn.Module, fam: _Family, sizes: list[GGUFLayer], keep: list[int], blocks, adapter) -> bool:
    """Whether every block has one size; :class:`UserError` for mixed sizes that ``deci`` cannot take."""
    first = (sizes[0].heads, sizes[0].kv_heads, sizes[0].ff)
    odd = [i for i, s in enumerate(sizes) if (s.heads, s.kv_heads, s.ff) != first or not s.heads or not s.ff]
    if not odd:
        return True
    if not fam.hetero:
        i = odd[0]
        raise UserError(f"--format gguf: llama.cpp runs {family(model)} blocks of one size only; block {keep[i]} "
                        f"has {sizes[i].heads} query heads and {sizes[i].ff} MLP channels (llama.cpp's per-layer "
                        "'deci' architecture has no q/k norms); export it as a Hugging Face directory")
    if any(_linear(adapter.attention(b), adapter.q).bias is not None for b in blocks):
        raise UserError("--format gguf: llama.cpp's per-layer 'deci' architecture takes attention biases of the "
                        "full width only; this model has biases and blocks of different sizes")
    return False


def _hparams(config, n_blocks: int, head_dim: int) -> dict:
    theta, scaling = _rope(config)
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None) if (types is None or "sliding_attention" in types) else None
    # llama.cpp's llama / qwen2 / qwen3 architectures attend to the whole context: where HF slides a window
    # (Mistral v0.1, Qwen2 with use_sliding_window), the file claims only the context both compute alike
    ctx = int(min(config.max_position_embeddings, window or config.max_position_embeddings))
    return {"context_length": ctx, "embedding_length": int(config.hidden_size), "block_count": n_blocks,
            "head_dim": head_dim, "rope_theta": theta, "rms_eps": float(config.rms_norm_eps),
            "vocab_size": int(config.vocab_size), "rope_scaling": scaling}


def _attention_tensors(j: int, block, s: GGUFLayer, adapter, fam: _Family, permute: bool) -> dict[str, np.ndarray]:
    attn = adapter.attention(block)
    t = {f"blk.{j}.attn_norm.weight": _np(block.input_layernorm.weight)}
    for name, path, heads in (("attn_q", adapter.q, s.heads), ("attn_k", adapter.k, s.kv_heads),
                              ("attn_v", adapter.v, None), ("attn_output", adapter.o, None)):
        lin = _linear(attn, path)
        w, b = lin.weight, lin.bias
        if permute and heads is not None:
            w, b = _permute(w, heads), (_permute(b, heads) if b is not None else None)
        t[f"blk.{j}.{name}.weight"] = _np(w)
        if b is not None:
            t[f"blk.{j}.{name}.bias"] = _np(b)
    if fam.qk_norm:
        t[f"blk.{j}.attn_q_norm.weight"] = _np(attn.q_norm.weight)
        t[f"blk.{j}.attn_k_norm.weight"] = _np(attn.k_norm.weight)
    return t


def _zero_attention(j: int, heads: int, head_dim: int, hidden: int) -> dict[str, np.ndarray]:
    """One attention group of zeros: attention over zero values adds zero to the residual stream."""
    z = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    return {f"blk.{j}.attn_norm.weight": np.ones(hidden, np.float32), f"blk.{j}.attn_q.weight": z(heads * head_dim,
            hidden), f"blk.{j}.attn_k.weight": z(head_dim, hidden), f"blk.{j}.attn_v.weight": z(head_dim, hidden),
            f"blk.{j}.attn_output.weight": z(hidden, heads * head_dim)}


def _mlp_tensors(j: int, block, ff: int, adapter, hidden: int) -> dict[str, np.ndarray]:
    """The MLP with zero channels up to ``ff`` (silu(0) * 0 through a zero down column adds nothing)."""
    mlp = adapter.mlp_module(block)
    gate, up = (_np(_linear(mlp, n).weight) for n in adapter.mlp_in)
    down = _np(_linear(mlp, adapter.mlp_out).weight)
    extra = ff - gate.shape[0]
    rows = np.zeros((extra, hidden), np.float32)
    return {f"blk.{j}.ffn_norm.weight": _np(block.get_submodule(adapter.mlp_norm).weight),
            f"blk.{j}.ffn_gate.weight": np.concatenate([gate, rows]),
            f"blk.{j}.ffn_up.weight": np.concatenate([up, rows]),
            f"blk.{j}.ffn_down.weight": np.concatenate([down, rows.T], axis=1)}


def _layout(model: nn.Module) -> tuple[_Family, str, list[int], list[GGUFLayer]]:
    """(family, llama.cpp architecture, kept block indices, their sizes); :class:`UserError` for what llama.cpp
    cannot express. Reads shapes only: no tensor is copied."""
    fam = _check(model)
    adapter = get_adapter(model)
    sizes = layer_sizes(model)
    keep = [i for i, s in enumerate(sizes) if s.heads or s.ff]  # an empty block is the identity: left out
    if not keep:
        raise UserError("--format gguf: every block is empty; nothing for llama.cpp to run")
    blocks = [adapter.get_blocks(model)[i] for i in keep]
    sizes = [sizes[i] for i in keep]
    return fam, fam.arch if _refuse_mixed(model, fam, sizes, keep, blocks, adapter) else "deci", keep, sizes


def gguf_arch(model: nn.Module) -> str:
    """The llama.cpp architecture ``model`` is written as; :class:`UserError` when it cannot be (no copies)."""
    return _layout(model)[1]


@torch.no_grad()
def gguf_model(model: nn.Module, ff_multiple: int = 1) -> GGUFModel:
    """The in-memory ``model`` (any pruning applied) as llama.cpp tensors and hyper-parameters.

    ``ff_multiple``: MLP widths are rounded up to a multiple of it with zero channels (gate / up rows and down
    columns of zeros: the same function), because llama.cpp's q8_0 quantizer refuses rows whose length is not a
    multiple of its block (32). An attention-free first block gets one zero attention group (the same
    function), because llama.cpp reads the head size from the first layer. :class:`UserError` (before any
    tensor is copied) when llama.cpp cannot express the model: an unsupported family or rope scaling, or
    blocks of different sizes in a family ``deci`` cannot run.
    """
    fam, arch, keep, sizes = _layout(model)
    adapter = get_adapter(model)
    c, hd, h = model.config, _head_dim(model), int(model.config.hidden_size)
    blocks = [adapter.get_blocks(model)[i] for i in keep]
    pad_attn = [0] if arch == "deci" and not sizes[0].heads else []
    per_group = max((s.heads // s.kv_heads for s in sizes if s.kv_heads), default=1)
    written = [GGUFLayer(s.heads or (per_group if j in pad_attn else 0), s.kv_heads or (1 if j in pad_attn else 0),
                         -(-max(s.ff, 1) // ff_multiple) * ff_multiple) for j, s in enumerate(sizes)]
    hp = _hparams(c, len(blocks), hd)
    emb = model.get_input_embeddings().weight
    t = {"token_embd.weight": _np(emb), "output_norm.weight": _np(adapter.final_norm(model).weight)}
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.data_ptr():
        t["output.weight"] = _np(head.weight)
    if hp["rope_scaling"] is not None and hp["rope_scaling"]["rope_type"] == "llama3":
        t["rope_freqs.weight"] = _llama3_freqs(c, hp["rope_scaling"], hd, hp["rope_theta"])
    for j, (block, s, ws) in enumerate(zip(blocks, sizes, written)):
        if j in pad_attn:
            t.update(_zero_attention(j, ws.heads, hd, h))
        elif s.heads:
            t.update(_attention_tensors(j, block, s, adapter, fam, fam.permute_qk or arch == "deci"))
        t.update(_mlp_tensors(j, block, ws.ff, adapter, h))
    return GGUFModel(arch=arch, layers=written, hparams=hp, tensors=t,
                     padded_mlp=[j for j, (s, ws) in enumerate(zip(sizes, written)) if ws.ff != s.ff],
                     padded_attention=pad_attn)
