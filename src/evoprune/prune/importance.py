"""Importance of width-pruning structures (Wanda-sp, LLM-Pruner's Taylor, magnitude) and OWL outlier ratios.

Owns :class:`WidthImportance` (the saved value a width search ranks structures by; a run keeps it as
``importance.pt``) and :func:`compute_importance`, which fills it from one pass over a calibration set.

Scores, per decoder block (structures as in :mod:`evoprune.models.slicing`: a *group* is one key/value
head with its query heads, a *channel* one MLP intermediate unit); ``||X_c||_2`` is the L2 norm, over
every calibration token, of input feature ``c`` of a projection:

- ``wanda_sp`` — Wanda-sp as published (An et al. 2024, the FLAP paper; the reference code's
  ``prune_wanda_sp``): with ``S = |W| * ||X||_2`` of a projection (each column scaled by its input's
  norm), a group's score is the sum, over the group's input columns of the attention output projection
  (its query heads' ``heads_per_group * head_dim`` columns), of ``S`` averaged over the output rows; a
  channel's score is ``S`` of its MLP-output-projection input column, averaged over the output rows.
  One dense forward; the reference prunes block by block on the already-pruned blocks' outputs, here the
  norms come from the dense model (one statistic serves every rate vector a search tries);
- ``wanda_sp_all`` — the same Wanda score summed over *all* of a structure's weights (its q/k/v rows and
  output-projection columns; its MLP input rows and output column), evoprune's earlier definition;
- ``taylor`` — LLM-Pruner's first-order Taylor importance (Ma et al. 2023), vector-wise as in its
  reference code (``TaylorImportance(taylor="vectorize", group_reduction="sum")``): with the salience
  ``W * dL/dW`` (``L``: mean next-token NLL of the calibration set), every neuron of a structure (a row of
  q/k/v or the MLP input projections, a column of the output projections) scores ``|sum of its salience|``
  and the structure sums its neurons' scores. One forward and backward (3 token-layers per token and block);
- ``magnitude`` — ``sum |W|`` over all of a structure's weights.

OWL outlier ratio (Yin et al. 2023), per block: the fraction of the unstructured Wanda scores
``|W_rc| * ||X_c||_2`` over all of the block's prunable weights (q/k/v/o and MLP projections) that
exceed ``outlier_m`` times the mean score of the block. With no calibration set, ``|W_rc|`` stands in.

Activations are collected by forward hooks on the Linear modules (batch by batch, sums of squares
accumulated in float64); the pass costs ``n_tokens * n_layers`` token-layers (``taylor``: three times
that), returned as ``token_layers``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import torch

from ..data.calibration import CalibSet
from ..finetune.brief import BACKWARD_FACTOR
from ..models.hooks import hooked, last_logits_kwargs, model_device
from ..models.loading import LoadedModel
from ..models.slicing import width_linears, width_spec
from ..tensorfiles import load_tagged, save_tagged
from .kinds import IMPORTANCES

__all__ = ["WidthImportance", "compute_importance", "METRICS"]

METRICS = IMPORTANCES
FORMAT = "evoprune.width_importance/1"
# projection role (see models.slicing.width_linears) -> the input whose feature norms scale its columns;
# q/k/v share one input, so do the MLP input projections: one hook on the first of each
_INPUT_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "o_in", "mlp_in": "mlp_in", "mlp_out": "mlp_out"}


def _kind(role: str) -> str:
    return role.split(".")[0]  # "mlp_in.gate_proj" -> "mlp_in"


@dataclass(frozen=True, eq=False)
class WidthImportance:
    """Per-block structure scores (higher = more important) and OWL outlier ratios.

    - ``metric``: one of :data:`METRICS`;
    - ``group_scores[i]``: float64 ``[groups_i]``, one score per attention group of block ``i``;
    - ``channel_scores[i]``: float64 ``[channels_i]``, one score per MLP channel;
    - ``outlier_ratio[i]``: OWL ratio of block ``i``, in ``[0, 1]``;
    - ``outlier_m``: the OWL threshold multiplier ``M``;
    - ``n_tokens`` / ``token_layers``: calibration tokens and the cost of the
      dense forward (0 when computed without calibration data).
    """

    metric: str
    group_scores: tuple[torch.Tensor, ...]
    channel_scores: tuple[torch.Tensor, ...]
    outlier_ratio: tuple[float, ...]
    outlier_m: float = 5.0
    n_tokens: int = 0
    token_layers: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        g = tuple(torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1) for t in self.group_scores)
        c = tuple(torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1) for t in self.channel_scores)
        o = tuple(float(x) for x in self.outlier_ratio)
        if not (len(g) == len(c) == len(o)) or not g:
            raise ValueError(f"need one entry per layer: {len(g)} group, {len(c)} channel, {len(o)} outlier entries")
        object.__setattr__(self, "group_scores", g)
        object.__setattr__(self, "channel_scores", c)
        object.__setattr__(self, "outlier_ratio", o)

    @property
    def n_layers(self) -> int:
        return len(self.group_scores)

    @cached_property
    def orders(self) -> tuple[tuple[list[int], list[int]], ...]:
        """Per block ``(groups, channels)`` indices from least to most important (ties: lower index first)."""
        return tuple((torch.argsort(g, stable=True).tolist(), torch.argsort(c, stable=True).tolist())
                     for g, c in zip(self.group_scores, self.channel_scores))

    # -- persistence -----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` atomically (``torch.save`` of plain tensors, lists and numbers)."""
        save_tagged(path, FORMAT, {"metric": self.metric, "group_scores": list(self.group_scores),
                                   "channel_scores": list(self.channel_scores), "outlier_ratio": list(self.outlier_ratio),
                                   "outlier_m": float(self.outlier_m), "n_tokens": int(self.n_tokens),
                                   "token_layers": int(self.token_layers)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WidthImportance":
        """Read a file written by :meth:`save` (``weights_only=True``); ``ValueError`` if it is not one."""
        return load_tagged(path, FORMAT, "width importance file", lambda obj: cls(
            obj["metric"], tuple(obj["group_scores"]), tuple(obj["channel_scores"]), tuple(obj["outlier_ratio"]),
            obj["outlier_m"], obj["n_tokens"], obj["token_layers"]))


def _input_norms(lm: LoadedModel, calib: CalibSet, batch_size: int, gradients: bool = False
                 ) -> list[dict[str, torch.Tensor]]:
    """Per block, the L2 norm over all calibration tokens of each projection input feature (float64, CPU).
    ``gradients``: the same pass also backpropagates the mean next-token NLL, leaving ``dL/dW`` in the block
    projections' ``.grad`` (the caller clears them)."""
    model, adapter = lm.model, lm.adapter
    sums: list[dict[str, torch.Tensor]] = []
    hooks = []

    def hook(acc: dict, key: str):
        def fn(module, args, output):
            x = args[0].detach()
            sq = x.float().pow(2).sum(dim=tuple(range(x.dim() - 1))).double()
            acc[key] = sq if key not in acc else acc[key] + sq

        return fn

    for block in adapter.get_blocks(model):
        acc, seen = {}, set()
        sums.append(acc)
        for role, lin in width_linears(adapter, block).items():
            key = _INPUT_OF[_kind(role)]
            if key not in seen:
                seen.add(key)
                hooks.append((lin, hook(acc, key)))
    kw, device = ({} if gradients else last_logits_kwargs(model)), model_device(model)
    with hooked(hooks), torch.set_grad_enabled(gradients):
        for s in range(0, calib.n_samples, int(batch_size)):
            ids = calib.input_ids[s:s + int(batch_size)].to(device)
            out = model(input_ids=ids, labels=ids if gradients else None, use_cache=False, **kw)
            if gradients:  # every sample weighs the same in the mean NLL
                (out.loss * (ids.shape[0] / calib.n_samples)).backward()
    if any(len(acc) != 4 for acc in sums):
        raise RuntimeError("the forward did not call every hooked projection")
    return [{k: v.sqrt().cpu() for k, v in acc.items()} for acc in sums]


def _per_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum consecutive equal slices of ``t`` (rows or columns in group order) into ``groups`` scores."""
    return t.view(groups, -1).sum(1) if groups else t.new_zeros(0)


def _scores(kind: str, lin, metric: str, wanda: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-neuron scores of one projection (float64, CPU): per output row for q/k/v and the MLP inputs, per
    input column for the output projections (see the module docstring)."""
    axis = 0 if kind in ("o", "mlp_out") else 1  # reduce over rows (column neurons) or over columns
    if metric == "taylor":
        return (lin.weight.detach().double() * lin.weight.grad.double()).sum(axis).abs().cpu()
    if metric == "wanda_sp":
        return wanda.mean(axis, dtype=torch.float64).cpu()
    return (wanda if metric == "wanda_sp_all" else weight).sum(axis, dtype=torch.float64).cpu()


@torch.no_grad()
def _block_scores(adapter, block, lw, metric: str, norms: dict | None, outlier_m: float):
    """``(group scores, channel scores, OWL ratio)`` of one block."""
    rows: dict[str, list[torch.Tensor]] = {}  # kind -> per-projection row scores (q/k/v/mlp_in)
    cols: dict[str, torch.Tensor] = {}  # kind -> column scores (o/mlp_out)
    owl: list[torch.Tensor] = []
    for role, lin in width_linears(adapter, block).items():
        kind = _kind(role)
        w = lin.weight.detach().float().abs()
        wanda = w * norms[_INPUT_OF[kind]].to(w.device, torch.float32)[None, :] if norms else w
        owl.append(wanda)
        s = _scores(kind, lin, metric, wanda, w)
        if kind in ("o", "mlp_out"):
            cols[kind] = s
        else:
            rows.setdefault(kind, []).append(s)
    if metric == "wanda_sp":  # the published score: output projections only
        groups, channels = _per_group(cols["o"], lw.groups), cols["mlp_out"]
    else:
        groups = sum(_per_group(t, lw.groups) for t in (rows["q"][0], rows["k"][0], rows["v"][0], cols["o"]))
        channels = torch.stack(rows["mlp_in"]).sum(0) + cols["mlp_out"]
    total = sum(float(s.sum(dtype=torch.float64)) for s in owl)
    count = sum(s.numel() for s in owl)
    thresh = float(outlier_m) * total / max(count, 1)
    return groups, channels, sum(int((s > thresh).sum()) for s in owl) / max(count, 1)


def compute_importance(lm: LoadedModel, calib: CalibSet | None = None, *, metric: str = "wanda_sp",
                       batch_size: int = 1, outlier_m: float = 5.0) -> tuple[WidthImportance, int]:
    """Score every attention group and MLP channel of ``lm`` (see the module docstring).

    Returns ``(importance, token_layers)``. ``calib`` is required for ``wanda_sp``, ``wanda_sp_all`` and
    ``taylor``; with ``magnitude`` it only feeds the OWL ratios (without it they use ``|W|``). One pass over
    ``calib`` in batches of ``batch_size``: ``token_layers = n_tokens * n_layers`` (``taylor``: forward and
    backward, ``3 * n_tokens * n_layers``; 0 without ``calib``), also stored in ``importance.token_layers``.
    The model's weights are unchanged; ``taylor`` leaves no gradients behind.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric != "magnitude" and calib is None:
        raise ValueError(f"{metric} importance needs a calibration set")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, adapter = lm.model, lm.adapter
    spec = width_spec(model, adapter)
    blocks = list(adapter.get_blocks(model))
    params = [lin.weight for b in blocks for lin in width_linears(adapter, b).values()] if metric == "taylor" else []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():  # gradients only where the salience is read
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        norms = _input_norms(lm, calib, batch_size, gradients=bool(params)) if calib is not None else None
        scores = [_block_scores(adapter, b, lw, metric, norms[i] if norms else None, outlier_m)
                  for i, (b, lw) in enumerate(zip(blocks, spec.layers))]
    finally:
        for p, f in flags:
            p.requires_grad_(f)
            p.grad = None
    n_tokens = calib.n_tokens if calib is not None else 0
    cost = n_tokens * spec.n_layers * (BACKWARD_FACTOR if metric == "taylor" else 1)
    imp = WidthImportance(metric, tuple(s[0] for s in scores), tuple(s[1] for s in scores),
                          tuple(s[2] for s in scores), float(outlier_m), n_tokens, cost)
    return imp, imp.token_layers
