"""Importance of width-pruning structures (Wanda-sp, magnitude) and OWL layer outlier ratios.

Owns :class:`WidthImportance` (the saved value a width search ranks
structures by; a run keeps it as ``importance.pt``) and
:func:`compute_importance`, which fills it from one dense forward over a
calibration set.

Scores, per decoder block (structures as in :mod:`evoprune.models.slicing`):

- ``wanda_sp`` (structured Wanda, An et al. 2024): the score of a structure is
  ``sum |W_rc| * ||X_c||_2`` over all of its weights, where ``||X_c||_2`` is the
  L2 norm, over every calibration token, of input feature ``c`` of that
  projection: the normed hidden state for q/k/v and the MLP input
  projections, the attention output (input of o) for o, the intermediate
  activation (input of the MLP output projection) for that projection.
  A group scores its q/k/v rows and its o columns; a channel its MLP-input
  rows and its MLP-output column. Biases carry no score;
- ``magnitude``: ``sum |W_rc|`` over the same weights.

OWL outlier ratio (Yin et al. 2023), per block: the fraction of the unstructured
Wanda scores ``|W_rc| * ||X_c||_2`` over all of the block's prunable weights
(q/k/v/o and MLP projections) that exceed ``outlier_m`` times the mean score
of the block. With ``metric="magnitude"`` and no calibration set, ``|W_rc|``
stands in for the Wanda score.

Activations are collected by forward hooks on the Linear modules during one
dense forward (batch by batch, sums of squares accumulated in float64), costing
``n_tokens * n_layers`` token-layers, returned as ``token_layers``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import torch

from ..data.calibration import CalibSet
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


@torch.no_grad()
def _input_norms(lm: LoadedModel, calib: CalibSet, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Per block, the L2 norm over all calibration tokens of each projection input feature (float64, CPU)."""
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
    kw, device = last_logits_kwargs(model), model_device(model)
    with hooked(hooks):
        for s in range(0, calib.n_samples, int(batch_size)):
            model(input_ids=calib.input_ids[s:s + int(batch_size)].to(device), use_cache=False, **kw)
    if any(len(acc) != 4 for acc in sums):
        raise RuntimeError("the dense forward did not call every hooked projection")
    return [{k: v.sqrt().cpu() for k, v in acc.items()} for acc in sums]


def _per_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum consecutive equal slices of ``t`` (rows or columns in group order) into ``groups`` scores."""
    return t.view(groups, -1).sum(1) if groups else t.new_zeros(0)


@torch.no_grad()
def compute_importance(lm: LoadedModel, calib: CalibSet | None = None, *, metric: str = "wanda_sp",
                       batch_size: int = 1, outlier_m: float = 5.0) -> tuple[WidthImportance, int]:
    """Score every attention group and MLP channel of ``lm`` (see the module docstring).

    Returns ``(importance, token_layers)``. ``calib`` is required for
    ``wanda_sp``; with ``magnitude`` it only feeds the OWL ratios (without it they
    use ``|W|``). One dense forward over ``calib`` in batches of ``batch_size``:
    ``token_layers = n_tokens * n_layers`` (0 without ``calib``), also stored in
    ``importance.token_layers``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric == "wanda_sp" and calib is None:
        raise ValueError("wanda_sp importance needs a calibration set")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, adapter = lm.model, lm.adapter
    spec = width_spec(model, adapter)
    norms = _input_norms(lm, calib, batch_size) if calib is not None else None
    group_scores, channel_scores, outliers = [], [], []
    for i, (block, lw) in enumerate(zip(adapter.get_blocks(model), spec.layers)):
        rows: dict[str, list[torch.Tensor]] = {}  # role -> per-projection row sums (q/k/v/mlp_in)
        cols: dict[str, torch.Tensor] = {}  # role -> column sums (o/mlp_out)
        owl: list[torch.Tensor] = []
        for role, lin in width_linears(adapter, block).items():
            kind = _kind(role)
            w = lin.weight.detach().float().abs()
            wanda = w * norms[i][_INPUT_OF[kind]].to(w.device, torch.float32)[None, :] if norms else w
            owl.append(wanda)
            score = wanda if metric == "wanda_sp" else w
            if kind in ("o", "mlp_out"):  # structures own input columns
                cols[kind] = score.sum(0, dtype=torch.float64).cpu()
            else:  # structures own output rows
                rows.setdefault(kind, []).append(score.sum(1, dtype=torch.float64).cpu())
        parts = (rows["q"][0], rows["k"][0], rows["v"][0], cols["o"])
        group_scores.append(sum(_per_group(t, lw.groups) for t in parts))
        channel_scores.append(torch.stack(rows["mlp_in"]).sum(0) + cols["mlp_out"])
        total = sum(float(s.sum(dtype=torch.float64)) for s in owl)
        count = sum(s.numel() for s in owl)
        thresh = float(outlier_m) * total / max(count, 1)
        outliers.append(sum(int((s > thresh).sum()) for s in owl) / max(count, 1))
    n_tokens = calib.n_tokens if calib is not None else 0
    imp = WidthImportance(metric, tuple(group_scores), tuple(channel_scores), tuple(outliers),
                          float(outlier_m), n_tokens, n_tokens * spec.n_layers)
    return imp, imp.token_layers
