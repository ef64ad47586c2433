"""From per-layer width-pruning rates to the structures each layer keeps.

Owns :class:`WidthPlan` and :func:`plan_widths` (no model forward, a few
milliseconds: a search calls it for every candidate).

Allocation for block ``i`` with rate ``p`` (fraction of its prunable
parameters to remove; structures and counts from
:func:`evoprune.models.slicing.width_spec`):

1. remove ``g = floor(p * G + 1/2)`` attention groups (``G`` groups; halves round up);
2. remove the number of MLP channels ``c`` that brings the removed parameter
   count closest to ``p * total``: ``c = floor((p * total - g * group_params) /
   channel_params + 1/2)``, clamped to ``[0, I]``.

Attention is coarse (SmolLM2-135M has 3 groups of 3 query heads per block), so
the MLP absorbs the rounding. ``p = 1`` removes every group and channel (the
block is then the residual stream plus the o / MLP-output biases); ``p = 0``
keeps the block intact. The removed structures are those with the lowest
importance (ties: lower index first); kept indices are sorted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import UserError
from ..models.loading import LoadedModel
from ..models.slicing import LayerWidth, WidthSpec, width_spec
from .importance import WidthImportance

__all__ = ["WidthPlan", "plan_widths", "allocate", "sublayer_plan"]


@dataclass(frozen=True)
class WidthPlan:
    """What each decoder block keeps.

    - ``rates``: the requested per-block rates;
    - ``kept_groups[i]`` / ``kept_channels[i]``: sorted kept attention-group /
      MLP-channel indices of block ``i``;
    - ``layer_rates[i]``: the fraction of block ``i``'s prunable parameters
      actually removed;
    - ``params_kept`` / ``params_total``: prunable block parameters (q/k/v/o +
      MLP, weights and biases) kept / in the dense model.
    """

    rates: tuple[float, ...]
    kept_groups: tuple[tuple[int, ...], ...]
    kept_channels: tuple[tuple[int, ...], ...]
    layer_rates: tuple[float, ...]
    params_kept: int
    params_total: int

    @property
    def n_layers(self) -> int:
        return len(self.kept_groups)

    @property
    def sparsity(self) -> float:
        """Fraction of prunable block parameters removed."""
        return 1.0 - self.params_kept / self.params_total if self.params_total else 0.0

    def to_dict(self) -> dict:
        return {"rates": list(self.rates), "kept_groups": [list(k) for k in self.kept_groups],
                "kept_channels": [list(k) for k in self.kept_channels], "layer_rates": list(self.layer_rates),
                "params_kept": self.params_kept, "params_total": self.params_total}

    @classmethod
    def from_dict(cls, d: dict) -> "WidthPlan":
        return cls(tuple(float(r) for r in d["rates"]), tuple(tuple(int(i) for i in k) for k in d["kept_groups"]),
                   tuple(tuple(int(i) for i in k) for k in d["kept_channels"]),
                   tuple(float(r) for r in d["layer_rates"]), int(d["params_kept"]), int(d["params_total"]))


def allocate(layer: LayerWidth, rate: float) -> tuple[int, int]:
    """``(groups_removed, channels_removed)`` for one block at ``rate`` (see the module docstring)."""
    g = min(layer.groups, math.floor(rate * layer.groups + 0.5))
    want = rate * layer.total - g * layer.group_params
    c = math.floor(want / layer.channel_params + 0.5) if layer.channel_params else 0
    return g, max(0, min(layer.channels, c))


def _rates(rates, n_layers: int) -> tuple[float, ...]:
    raw = getattr(rates, "rates", rates)  # a genome.RateVector or a plain sequence
    try:
        out = tuple(float(r) for r in raw)
    except (TypeError, ValueError):
        raise UserError(f"width rates must be numbers, got {raw!r}") from None
    if len(out) != n_layers:
        raise UserError(f"{len(out)} width rates for a model with {n_layers} layers")
    bad = [r for r in out if not (math.isfinite(r) and 0.0 <= r <= 1.0)]
    if bad:
        raise UserError(f"width rates must be in [0, 1], got {bad[:3]}")
    return out


def plan_widths(lm_or_model, importance: WidthImportance, rates: Sequence[float]) -> WidthPlan:
    """The :class:`WidthPlan` removing, per block, the least important structures at ``rates``.

    ``lm_or_model``: a :class:`~evoprune.models.loading.LoadedModel`, a dense HF
    causal LM, or its precomputed :class:`~evoprune.models.slicing.WidthSpec`
    (fastest). ``rates``: one float in ``[0, 1]`` per block, or a
    :class:`~evoprune.genome.RateVector`. :class:`UserError` when the rates or
    the importance do not fit the model.
    """
    if isinstance(lm_or_model, WidthSpec):
        spec = lm_or_model
    elif isinstance(lm_or_model, LoadedModel):
        spec = width_spec(lm_or_model.model, lm_or_model.adapter)
    else:
        spec = width_spec(lm_or_model)
    rates = _rates(rates, spec.n_layers)
    if importance.n_layers != spec.n_layers or any(
            len(g) != lw.groups or len(c) != lw.channels
            for g, c, lw in zip(importance.group_scores, importance.channel_scores, spec.layers)):
        raise UserError("width importance was computed for a model of a different shape")
    kept_g, kept_c, layer_rates, kept_total = [], [], [], 0
    for lw, rate, (g_order, c_order) in zip(spec.layers, rates, importance.orders):
        g, c = allocate(lw, rate)
        kept_g.append(tuple(sorted(g_order[g:])))
        kept_c.append(tuple(sorted(c_order[c:])))
        removed = g * lw.group_params + c * lw.channel_params
        layer_rates.append(removed / lw.total)
        kept_total += lw.total - removed
    return WidthPlan(rates, tuple(kept_g), tuple(kept_c), tuple(layer_rates), kept_total, spec.total)


def sublayer_plan(lm_or_spec, attention: Sequence[int], mlp: Sequence[int]) -> WidthPlan:
    """The :class:`WidthPlan` that keeps no attention group of the blocks in ``attention`` and no MLP channel of
    those in ``mlp``, and everything elsewhere: a sub-layer pattern in the width format (the export of
    ``--space sublayers`` runs). ``lm_or_spec``: as in :func:`plan_widths`. The output biases of the
    emptied projections are not part of the plan (see
    :func:`evoprune.models.sublayers.zero_output_biases`)."""
    spec = lm_or_spec if isinstance(lm_or_spec, WidthSpec) else width_spec(
        lm_or_spec.model if isinstance(lm_or_spec, LoadedModel) else lm_or_spec,
        lm_or_spec.adapter if isinstance(lm_or_spec, LoadedModel) else None)
    a, m = set(attention), set(mlp)
    bad = sorted(i for i in a | m if not 0 <= i < spec.n_layers)
    if bad:
        raise UserError(f"sub-layer blocks out of range: {bad} (model has {spec.n_layers} layers)")
    kept_g = tuple(() if i in a else tuple(range(lw.groups)) for i, lw in enumerate(spec.layers))
    kept_c = tuple(() if i in m else tuple(range(lw.channels)) for i, lw in enumerate(spec.layers))
    removed = [(lw.groups * lw.group_params if i in a else 0) + (lw.channels * lw.channel_params if i in m else 0)
               for i, lw in enumerate(spec.layers)]
    rates = tuple(r / lw.total for r, lw in zip(removed, spec.layers))
    return WidthPlan(rates, kept_g, kept_c, rates, spec.total - sum(removed), spec.total)
