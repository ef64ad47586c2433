"""Removing a decoder block's attention or MLP while the block stays: the modules that stand in for them.

Owns :class:`SkippedAttention`, :class:`SkippedMLP`, :class:`EmptyProjection` and
:class:`ZeroProjection` (stand-ins whose output is exactly zero, so the block computes its residual
path only), :func:`skip_sublayers` (install them for given blocks, returning the undo) and
:func:`sublayer_params` (the parameters of each block's attention and MLP). The scoped, reversible
edit users call is :meth:`evoprune.models.base.Adapter.skipped`.

Why zeros are a removal: every supported family adds a sub-layer's output to the residual stream,
possibly through a norm (Gemma-3's post-attention / post-feedforward RMSNorm), and a norm of zero is
zero. OPT with layer norm *after* the residual add (``do_layer_norm_before=False``, opt-350m) is
refused: there a removed sub-layer would still be followed by its norm.

A skipped attention still appends a one-slot zero key/value to a KV cache (as the export's
``ZeroAttention`` does), so the cache length that later positions are read from stays right and the
remaining blocks keep their layer indices.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError

__all__ = ["SkippedAttention", "SkippedMLP", "EmptyProjection", "ZeroProjection", "skip_sublayers",
           "sublayer_params", "pruned_size", "check_sublayers", "zero_output_biases"]


class SkippedAttention(nn.Module):
    """In place of a block's attention module: returns ``(zeros like the input, None)``; no parameters."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.layer_idx = getattr(original, "layer_idx", None)

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, cache=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # transformers 5.2x passes ``cache``
        if cache is not None and self.layer_idx is not None and hidden_states.dim() == 3:
            stub = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(stub, stub, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """In place of a block's MLP module: returns zeros like its input."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class EmptyProjection(nn.Module):
    """In place of an MLP input projection that sits on the block (OPT's ``fc1``): a zero-width output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], 0)


class ZeroProjection(nn.Module):
    """In place of an MLP output projection that sits on the block (OPT's ``fc2``): zeros of its output width."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = int(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def check_sublayers(model: nn.Module) -> None:
    """:class:`UserError` when removing a sub-layer of ``model`` would not leave its residual path alone."""
    if getattr(model.config, "do_layer_norm_before", True) is False:
        raise UserError(f"{model.config.model_type} with layer norm after the residual add (do_layer_norm_before="
                        "False) cannot drop attention or MLP separately; use --space layers")


def _replace(owner: nn.Module, path: str, module: nn.Module, undo: list) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = owner.get_submodule(parent_path) if parent_path else owner
    undo.append((parent, name, getattr(parent, name)))
    setattr(parent, name, module)


def skip_sublayers(adapter, blocks: Sequence[nn.Module], attention: Sequence[int],
                   mlp: Sequence[int]) -> Callable[[], None]:
    """Install the stand-ins for the attention of ``blocks[i]`` for ``i`` in ``attention`` and the MLP for ``i``
    in ``mlp``; returns the function that puts the original modules back (in reverse order)."""
    undo: list[tuple[nn.Module, str, nn.Module]] = []

    def restore() -> None:
        for parent, name, original in reversed(undo):
            setattr(parent, name, original)

    try:
        for i in attention:
            _replace(blocks[i], adapter.attn, SkippedAttention(adapter.attention(blocks[i])), undo)
        for i in mlp:
            if adapter.mlp:  # the MLP is a module of its own
                _replace(blocks[i], adapter.mlp, SkippedMLP(), undo)
            else:  # its projections sit on the block (OPT): zero-width in, zeros out
                for name in adapter.mlp_in:
                    _replace(blocks[i], name, EmptyProjection(), undo)
                out = blocks[i].get_submodule(adapter.mlp_out)
                _replace(blocks[i], adapter.mlp_out, ZeroProjection(out.out_features), undo)
    except BaseException:
        restore()
        raise
    return restore


def sublayer_params(adapter, model: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(attention, mlp)``: parameters of every block's attention module (projections and any q/k norms) and
    of its MLP projections (weights and biases); the blocks' layer norms are in neither."""
    attn, mlp = [], []
    for block in adapter.get_blocks(model):
        attn.append(sum(p.numel() for p in adapter.attention(block).parameters()))
        if adapter.mlp:
            mlp.append(sum(p.numel() for p in adapter.mlp_module(block).parameters()))
        else:
            mlp.append(sum(p.numel() for n in (*adapter.mlp_in, adapter.mlp_out)
                           for p in block.get_submodule(n).parameters()))
    return tuple(attn), tuple(mlp)


def pruned_size(adapter, model: nn.Module, attention: Sequence[int], mlp: Sequence[int]) -> dict:
    """Size of ``model`` without the attention of blocks ``attention`` and the MLP of blocks ``mlp`` (a block in both
    goes whole, its layer norms too): ``params`` and ``params_dense`` (every parameter, a tied embedding once) and
    ``param_sparsity``, the share of the blocks' attention and MLP parameters removed."""
    attn, mlps = sublayer_params(adapter, model)
    blocks = adapter.get_blocks(model)
    whole = set(attention) & set(mlp)
    removed = sum(attn[i] for i in set(attention)) + sum(mlps[i] for i in set(mlp))
    norms = sum(sum(p.numel() for p in blocks[i].parameters()) - attn[i] - mlps[i] for i in whole)
    dense = sum(p.numel() for p in model.parameters())
    return {"params": int(dense - removed - norms), "params_dense": int(dense),
            "param_sparsity": removed / (sum(attn) + sum(mlps))}


@torch.no_grad()
def zero_output_biases(adapter, blocks: Sequence[nn.Module], attention: Sequence[int],
                       mlp: Sequence[int]) -> Callable[[], None]:
    """Zero the output-projection bias of ``blocks[i]`` for ``i`` in ``attention`` and the MLP-output bias for ``i``
    in ``mlp`` (OPT has them; Llama-layout families none); returns the function that writes them back.

    The width format keeps those biases (a zero-group attention outputs its bias), so a sub-layer removed
    for good has them zeroed first: then it contributes exactly nothing, as in :func:`skip_sublayers`.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    for ids, get in ((attention, lambda b: adapter.attention(b).get_submodule(adapter.o)),
                     (mlp, lambda b: adapter.mlp_module(b).get_submodule(adapter.mlp_out))):
        for i in ids:
            bias = get(blocks[i]).bias
            if bias is not None:
                saved.append((bias, bias.detach().clone()))
                bias.zero_()

    def restore() -> None:
        with torch.no_grad():
            for bias, value in reversed(saved):
                bias.copy_(value)

    return restore
