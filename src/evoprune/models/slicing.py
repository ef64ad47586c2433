"""Structured width pruning of decoder blocks: structure sizes, masking and slicing.

Owns the architecture side of width pruning, all of it driven by the
adapter's attribute paths (:meth:`~evoprune.models.base.Adapter.width_layout`):

- :class:`LayerWidth` / :func:`width_spec`: the prunable structures of every
  block and their parameter counts (read from the actual Linear shapes);
- :func:`width_masked`: a reversible, cheap scoped edit that makes the model
  compute what the width-pruned model computes (the same products plus exact
  zeros; fp32 matmuls of other widths may sum in another order), for candidate
  evaluation;
- :func:`apply_width_inplace` / :func:`width_sliced`: the physically sliced
  model, for good or for a scope (the export's exact reference and weights).

Structures (see :mod:`evoprune.models.remote.surgery`, which
does the slicing for both the in-memory model and the export):

- attention *group* = one key/value head, the ``heads_per_group`` query heads
  that share it and the matching output-projection columns (one head for MHA).
  Removing whole groups keeps ``num_attention_heads / num_key_value_heads``
  constant, so stock HF attention runs on the smaller Linear layers;
- MLP *channel* = one row of every ``adapter.mlp_in`` projection plus one
  input column of ``adapter.mlp_out``.

Prunable parameters of a block = every weight and bias of q/k/v/o and the MLP
projections (norms excluded). The biases of o and of the MLP output projection
belong to no structure and always stay (``fixed_params``).

A plan is any object with ``kept_groups`` and ``kept_channels`` (per block, the
sorted kept indices) and ``params_total`` (checked against the model), e.g.
:class:`evoprune.prune.width_plan.WidthPlan`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import UserError
from . import remote as remote_files
from .base import Adapter, get_adapter, hf_classes
from .remote import surgery as remote

__all__ = ["LayerWidth", "WidthSpec", "width_spec", "width_linears", "width_masked", "width_sliced", "output_columns",
           "apply_width_inplace", "width_config", "check_plan", "WIDTH_KEY", "is_width_pruned", "save_width_pruned"]

WIDTH_KEY = remote.WIDTH_KEY
_MISSING = object()


@dataclass(frozen=True)
class LayerWidth:
    """Prunable structures of one decoder block.

    - ``groups``: attention groups (= key/value heads); ``channels``: MLP channels;
    - ``group_params`` / ``channel_params``: parameters (weights + biases) removed
      with one group / one channel;
    - ``fixed_params``: prunable-module parameters no structure owns (the o and
      MLP-output biases); ``total = groups*group_params + channels*channel_params + fixed_params``.
    """

    groups: int
    channels: int
    group_params: int
    channel_params: int
    fixed_params: int

    @property
    def total(self) -> int:
        """All parameters of the block's q/k/v/o and MLP projections."""
        return self.groups * self.group_params + self.channels * self.channel_params + self.fixed_params


@dataclass(frozen=True)
class WidthSpec:
    """Prunable structures of a model: one :class:`LayerWidth` per block, plus the head geometry."""

    layers: tuple[LayerWidth, ...]
    head_dim: int
    heads_per_group: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def total(self) -> int:
        return sum(lw.total for lw in self.layers)


def _adapter(model: nn.Module, adapter: Adapter | None) -> Adapter:
    return adapter if adapter is not None else get_adapter(model)


def width_linears(adapter: Adapter, block: nn.Module) -> dict[str, nn.Linear]:
    """The block's prunable projections by role: ``q``, ``k``, ``v``, ``o``, ``mlp_in.<name>``, ``mlp_out``."""
    attn, mlp = adapter.attention(block), adapter.mlp_module(block)
    out = {r: attn.get_submodule(getattr(adapter, r)) for r in ("q", "k", "v", "o")}
    for name in adapter.mlp_in:
        out[f"mlp_in.{name}"] = mlp.get_submodule(name)
    out["mlp_out"] = mlp.get_submodule(adapter.mlp_out)
    return out


def _bias(lin: nn.Linear) -> int:
    return 1 if lin.bias is not None else 0


def width_spec(model: nn.Module, adapter: Adapter | None = None) -> WidthSpec:
    """Structure sizes and parameter counts of every block of ``model`` (as it currently is)."""
    adapter = _adapter(model, adapter)
    cfg = model.config
    hd, hpg = adapter.head_dim(cfg), adapter.heads_per_group(cfg)
    layers = []
    for block in adapter.get_blocks(model):
        lin = width_linears(adapter, block)
        q, k, v, o, out = lin["q"], lin["k"], lin["v"], lin["o"], lin["mlp_out"]
        ins = [m for r, m in lin.items() if r.startswith("mlp_in.")]
        g = k.out_features // hd
        gp = (hpg * hd * (q.in_features + _bias(q)) + hd * (k.in_features + _bias(k))
              + hd * (v.in_features + _bias(v)) + hpg * hd * o.out_features)
        cp = sum(m.in_features + _bias(m) for m in ins) + out.out_features
        fixed = o.out_features * _bias(o) + out.out_features * _bias(out)
        lw = LayerWidth(groups=g, channels=out.in_features, group_params=gp, channel_params=cp, fixed_params=fixed)
        actual = sum(p.numel() for m in lin.values() for p in m.parameters())
        if lw.total != actual or q.out_features != g * hpg * hd:
            raise RuntimeError(f"unexpected projection shapes in {type(block).__name__} (counted {lw.total}, "
                               f"found {actual} parameters)")
        layers.append(lw)
    return WidthSpec(tuple(layers), head_dim=hd, heads_per_group=hpg)


def check_plan(spec: WidthSpec, plan) -> None:
    """:class:`UserError` unless ``plan`` fits ``spec``: layer count, ``params_total`` (when the plan has
    one: a plan made for another model), sorted unique in-range indices."""
    if len(plan.kept_groups) != spec.n_layers or len(plan.kept_channels) != spec.n_layers:
        raise UserError(f"width plan is for {len(plan.kept_groups)} layers, the model has {spec.n_layers}")
    total = getattr(plan, "params_total", None)
    if total is not None and int(total) != spec.total:
        raise UserError(f"width plan was made for a model with {total} prunable block parameters, "
                        f"this one has {spec.total}")
    for i, lw in enumerate(spec.layers):
        for kind, kept, n in (("group", plan.kept_groups[i], lw.groups),
                              ("channel", plan.kept_channels[i], lw.channels)):
            if list(kept) != sorted(set(kept)) or (kept and not (0 <= kept[0] and kept[-1] < n)):
                raise UserError(f"width plan layer {i}: kept {kind} indices must be sorted, unique, in [0, {n})")


def _removed(kept, n: int) -> list[int]:
    keep = set(kept)
    return [j for j in range(n) if j not in keep]


def output_columns(spec: WidthSpec, plan, block: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"o": (kept, removed), "mlp_out": (kept, removed)}``: the input columns (long index tensors) of block
    ``block``'s attention output and MLP output projections that ``plan`` keeps and removes."""
    lw, hd, hpg = spec.layers[block], spec.head_dim, spec.heads_per_group
    kg, kc = plan.kept_groups[block], plan.kept_channels[block]

    def cols(idx, per_group: bool):
        t = torch.tensor(idx, dtype=torch.long)
        return remote.spans(remote.spans(t, hpg), hd) if per_group else t

    return {"o": (cols(list(kg), True), cols(_removed(kg, lw.groups), True)),
            "mlp_out": (cols(list(kc), False), cols(_removed(kc, lw.channels), False))}


@contextmanager
def width_masked(model: nn.Module, plan, adapter: Adapter | None = None) -> Iterator[None]:
    """Run ``model`` as if ``plan`` were applied, then restore the exact original weights.

    Zeroes, per block, the output-projection input columns of every removed
    attention group and the MLP-output input columns of every removed channel.
    That removes exactly their contribution (their q/k/v rows and MLP-input rows
    still compute, but feed only zero columns); the o / MLP-output biases stay,
    as in the sliced model. The zeroed columns are saved first and written back
    on exit, also on exceptions, so the weights are bit-identical afterwards.
    Cost: one column gather + fill per pruned projection, no model copy.
    """
    adapter = _adapter(model, adapter)
    spec = width_spec(model, adapter)
    check_plan(spec, plan)
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (weight, column index, original columns)
    try:
        with torch.no_grad():
            for i, block in enumerate(adapter.get_blocks(model)):
                lin = width_linears(adapter, block)
                for role, (_, cols) in output_columns(spec, plan, i).items():
                    w = lin[role].weight
                    if len(cols):
                        cols = cols.to(w.device)
                        saved.append((w, cols, w.index_select(1, cols)))
                        w.index_fill_(1, cols, 0.0)
        yield
    finally:
        with torch.no_grad():
            for w, cols, orig in reversed(saved):
                w.index_copy_(1, cols, orig)


def width_config(model: nn.Module, plan, adapter: Adapter | None = None) -> dict:
    """The ``evoprune_width`` config entry describing ``model`` pruned by ``plan`` (JSON-able)."""
    adapter = _adapter(model, adapter)
    spec = width_spec(model, adapter)
    check_plan(spec, plan)
    groups = [len(k) for k in plan.kept_groups]
    return {
        "format": 1,
        "base_model_type": model.config.model_type,
        "base_architecture": type(model).__name__,
        "layout": adapter.width_layout(),
        "head_dim": spec.head_dim,
        "heads_per_group": spec.heads_per_group,
        "num_kv_groups": groups,
        "num_attention_heads": [g * spec.heads_per_group for g in groups],
        "num_key_value_heads": groups,
        "intermediate_sizes": [len(k) for k in plan.kept_channels],
    }


def _slice(model: nn.Module, plan, adapter: Adapter) -> Callable[[], None]:
    """Slice every block to ``plan`` in place; return a function that puts the original modules back."""
    if getattr(model.config, WIDTH_KEY, None):
        raise UserError("model is already width-pruned; slice the dense model")
    width = width_config(model, plan, adapter)
    layout = width["layout"]
    undo: list[tuple[nn.Module, str, object]] = []  # (owner, attribute path or name, original value)

    def restore() -> None:
        for owner, name, value in reversed(undo):
            if isinstance(value, nn.Module):
                remote.replace_module(owner, name, value)
            elif value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)

    try:
        for block, kg, kc in zip(adapter.get_blocks(model), plan.kept_groups, plan.kept_channels):
            attn, mlp = adapter.attention(block), adapter.mlp_module(block)
            undo.append((block, adapter.attn, attn))  # a zero-group block gets a ZeroAttention here
            undo += [(attn, getattr(adapter, r), attn.get_submodule(getattr(adapter, r))) for r in ("q", "k", "v", "o")]
            undo += [(mlp, n, mlp.get_submodule(n)) for n in (*adapter.mlp_in, adapter.mlp_out)]
            undo += [(attn, a, getattr(attn, a)) for a in adapter.attn_head_attrs]
            if adapter.mlp and hasattr(mlp, "intermediate_size"):
                undo.append((mlp, "intermediate_size", mlp.intermediate_size))
            remote.prune_block(block, layout, width["head_dim"], width["heads_per_group"], tuple(kg), tuple(kc))
        undo.append((model.config, WIDTH_KEY, getattr(model.config, WIDTH_KEY, _MISSING)))
        setattr(model.config, WIDTH_KEY, width)
    except BaseException:
        restore()
        raise
    return restore


def apply_width_inplace(model: nn.Module, plan, adapter: Adapter | None = None) -> dict:
    """Slice every block of ``model`` to ``plan`` for good (new, smaller ``nn.Linear`` modules).

    Kept rows/columns and biases are copied; a block left with zero groups gets
    :class:`~evoprune.models.remote.surgery.ZeroAttention`. The
    per-layer widths are recorded as ``model.config.evoprune_width`` (returned).
    The model must be dense (not already width-pruned): :class:`UserError` otherwise.
    """
    adapter = _adapter(model, adapter)
    _slice(model, plan, adapter)
    return getattr(model.config, WIDTH_KEY)


@contextmanager
def width_sliced(model: nn.Module, plan, adapter: Adapter | None = None) -> Iterator[dict]:
    """:func:`apply_width_inplace` for the duration of the scope, then the original modules go back.

    Yields the ``evoprune_width`` config entry. The dense projections are kept
    aside (not copied), so the extra memory is the sliced projections only;
    the original module objects and attributes are restored on exit, also on
    exceptions. Slower to enter than :func:`width_masked` (it copies the kept
    weights), but it runs the smaller matrices: the export uses it as the exact
    reference, and its ``state_dict()`` is the export's weights.
    """
    adapter = _adapter(model, adapter)
    restore = _slice(model, plan, adapter)
    try:
        yield getattr(model.config, WIDTH_KEY)
    finally:
        restore()


def is_width_pruned(model: nn.Module) -> bool:
    """Whether ``model`` is width-sliced (its config records ``evoprune_width``)."""
    return bool(getattr(model.config, WIDTH_KEY, None))


def save_width_pruned(model: nn.Module, out) -> None:
    """Write the width-sliced ``model`` (see :func:`apply_width_inplace`) as a ``trust_remote_code``
    directory at ``out``: its weights and config (plus ``auto_map``) and the family's generated
    remote-code files (:func:`evoprune.models.remote.remote_code`)."""
    import json
    from pathlib import Path

    if not is_width_pruned(model):
        raise UserError("model is not width-pruned (no evoprune_width in its config)")
    out = Path(out)
    model.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = dict(remote_files.AUTO_MAP)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name, text in remote_files.remote_code(*hf_classes(model.config.model_type)).items():
        (out / name).write_text(text, encoding="utf-8")
