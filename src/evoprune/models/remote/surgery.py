"""Module surgery of evoprune width-pruned models (standalone: imports only torch).

A width-pruned model is its base family's stock model whose decoder blocks
have fewer attention *groups* and MLP *channels*, possibly a different number
in every block:

- attention group = one key/value head with the query heads that share it
  (``heads_per_group = num_attention_heads // num_key_value_heads``; one head
  for multi-head attention): ``heads_per_group * head_dim`` rows of the query
  projection, ``head_dim`` rows of the key and value projections, and the
  matching ``heads_per_group * head_dim`` input columns of the output
  projection. Whole groups go, so every block keeps the base GQA ratio and the
  stock attention code runs unchanged on the smaller Linear layers;
- MLP channel = one row of every MLP input projection (gate/up, or fc1) and
  the matching input column of the MLP output projection (down, or fc2).

The config's ``evoprune_width`` field describes it::

    {"format": 1, "base_model_type": "llama", "base_architecture": "LlamaForCausalLM",
     "layout": {"blocks": "model.layers", "attn": "self_attn", "q": "q_proj", "k": "k_proj",
                "v": "v_proj", "o": "o_proj", "mlp": "mlp", "mlp_in": ["gate_proj", "up_proj"],
                "mlp_out": "down_proj", "head_attrs": []},
     "head_dim": 64, "heads_per_group": 3,
     "num_kv_groups": [...], "num_attention_heads": [...], "num_key_value_heads": [...],
     "intermediate_sizes": [...]}                        # one entry per decoder block

``layout`` holds attribute paths (relative to the causal LM for ``blocks``, to
one block otherwise; ``mlp`` may be empty when the MLP projections sit on the
block itself) and ``head_attrs``, attention attributes that hold the number
of query heads. A block with zero groups gets :class:`ZeroAttention`, which
outputs zeros (plus the output projection's bias, if any); a block with zero
channels needs nothing special (its MLP outputs zeros plus the output bias).
Projection biases of the output/MLP-output projections are never pruned.

This file is copied verbatim into every width-pruned export (as ``evoprune_width_surgery.py``) and
imported by evoprune itself, so the in-memory sliced model and the exported one are built by the same
code. The export's model class (generated per family, :mod:`evoprune.models.remote`) subclasses the
stock ``<Family>ForCausalLM`` and calls :func:`apply_widths` after ``super().__init__``; weights come
from the checkpoint as usual.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

__all__ = ["WIDTH_KEY", "ZeroAttention", "prune_block", "apply_widths", "spans", "replace_module"]

WIDTH_KEY = "evoprune_width"


# -- module surgery ---------------------------------------------------------------

def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent), name, module)


def _resized(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    """A new Linear from ``lin`` with fewer output rows and/or input columns.

    ``rows``/``cols``: ``None`` keeps that axis; an int gives its new size
    (fresh weights, as the checkpoint fills them); a 1-D index tensor keeps those
    rows/columns with their weights (and, for rows, bias entries) copied.
    """
    w = lin.weight
    copy = isinstance(rows, torch.Tensor) or isinstance(cols, torch.Tensor)
    out_f = lin.out_features if rows is None else (len(rows) if isinstance(rows, torch.Tensor) else int(rows))
    in_f = lin.in_features if cols is None else (len(cols) if isinstance(cols, torch.Tensor) else int(cols))
    has_bias = lin.bias is not None
    if not copy:
        with warnings.catch_warnings():  # "initializing zero-element tensors is a no-op"
            warnings.simplefilter("ignore", UserWarning)
            return nn.Linear(in_f, out_f, bias=has_bias, device=w.device, dtype=w.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        new = nn.Linear(in_f, out_f, bias=has_bias, device="meta", dtype=w.dtype).to_empty(device=w.device)
    with torch.no_grad():
        sub = w if rows is None else w.index_select(0, rows.to(w.device))
        sub = sub if cols is None else sub.index_select(1, cols.to(w.device))
        new.weight.copy_(sub)
        if has_bias:
            new.bias.copy_(lin.bias if rows is None else lin.bias.index_select(0, rows.to(w.device)))
    new.weight.requires_grad_(w.requires_grad)
    if has_bias:
        new.bias.requires_grad_(lin.bias.requires_grad)
    return new


def spans(starts: torch.Tensor, width: int) -> torch.Tensor:
    """Concatenated ``[s*width, (s+1)*width)`` ranges for each ``s`` in ``starts`` (1-D long)."""
    return (starts[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


class ZeroAttention(nn.Module):
    """Stand-in for an attention module with every group pruned.

    Keeps the original children (the now empty projections, q/k norms) so the
    parameter names match the checkpoint. Returns ``(zeros + output bias, None)``
    like the stock attention. With a KV cache it appends one zero key/value of
    shape ``[batch, 1, seq, 1]`` per call: the cache reads its length from the
    stored tensors (an empty tensor would report 0 and, for block 0, shift the
    positions of every later token), and nothing ever attends to them.
    """

    def __init__(self, attn: nn.Module, o_name: str):
        super().__init__()
        for name, child in attn.named_children():
            self.add_module(name, child)
        self.layer_idx = getattr(attn, "layer_idx", None)
        self.o_name = o_name

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, cache=None, **kwargs):
        # older transformers pass the KV cache as ``past_key_values``, newer ones (5.2x) as ``cache``
        cache = cache if cache is not None else past_key_values
        lead = hidden_states.shape[:-1]
        if cache is not None and self.layer_idx is not None and hidden_states.dim() == 3:
            stub = hidden_states.new_zeros(lead[0], 1, lead[1], 1)
            cache.update(stub, stub, self.layer_idx)
        out = self.get_submodule(self.o_name)(hidden_states.new_zeros(*lead, 0))
        return out, None


def prune_block(block: nn.Module, layout: dict, head_dim: int, heads_per_group: int,
                groups: int | Sequence[int] | torch.Tensor, channels: int | Sequence[int] | torch.Tensor) -> None:
    """Shrink one decoder block in place to ``groups`` attention groups and ``channels`` MLP channels.

    An int gives the new count (shapes only; used when a checkpoint will fill
    the weights); a sequence gives the kept indices in the block's current
    numbering (weights copied). Zero groups installs :class:`ZeroAttention`.
    """
    hd, hpg = int(head_dim), int(heads_per_group)
    attn = _get(block, layout["attn"])
    if isinstance(groups, int):
        n_g = groups
        q_sel, kv_sel = n_g * hpg * hd, n_g * hd
    else:
        g = torch.as_tensor(groups, dtype=torch.long)
        n_g = len(g)
        kv_sel = spans(g, hd)
        q_sel = spans(spans(g, hpg), hd)
    replace_module(attn, layout["q"], _resized(_get(attn, layout["q"]), rows=q_sel))
    replace_module(attn, layout["k"], _resized(_get(attn, layout["k"]), rows=kv_sel))
    replace_module(attn, layout["v"], _resized(_get(attn, layout["v"]), rows=kv_sel))
    replace_module(attn, layout["o"], _resized(_get(attn, layout["o"]), cols=q_sel))
    for a in layout.get("head_attrs", ()):
        setattr(attn, a, n_g * hpg)
    if n_g == 0 and not isinstance(attn, ZeroAttention):
        replace_module(block, layout["attn"], ZeroAttention(attn, layout["o"]))

    mlp = _get(block, layout["mlp"])
    if isinstance(channels, int):
        c_sel, n_c = channels, channels
    else:
        c_sel = torch.as_tensor(channels, dtype=torch.long)
        n_c = len(c_sel)
    for name in layout["mlp_in"]:
        replace_module(mlp, name, _resized(_get(mlp, name), rows=c_sel))
    replace_module(mlp, layout["mlp_out"], _resized(_get(mlp, layout["mlp_out"]), cols=c_sel))
    if layout["mlp"] and hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = n_c


def apply_widths(model: nn.Module, width: dict) -> None:
    """Resize every block of a freshly built stock model to the widths in ``width`` (shapes only)."""
    layout = width["layout"]
    blocks = model.get_submodule(layout["blocks"])
    if len(blocks) != len(width["num_kv_groups"]) or len(blocks) != len(width["intermediate_sizes"]):
        raise ValueError(f"{WIDTH_KEY} lists {len(width['num_kv_groups'])} layers, the model has {len(blocks)}")
    for block, g, c in zip(blocks, width["num_kv_groups"], width["intermediate_sizes"]):
        prune_block(block, layout, width["head_dim"], width["heads_per_group"], int(g), int(c))
