"""Level databases for DarwinLM-style search: every block's attention and MLP, compressed at a ladder of levels.

Owns :func:`level_ladders`, :class:`LevelDatabase` (build once, store on disk,
reuse across runs) and :class:`AppliedLevels` (puts a level vector's weights into
a dense model, loading only the units whose level changed).

Units and levels. Block ``i`` has two units, its attention and its MLP. Attention
level ``a`` removes ``attn_counts[a]`` attention groups (a key/value head with its
query heads, as in :mod:`evoprune.models.slicing`), MLP level ``m`` removes
``mlp_counts[m]`` MLP channels; level 0 keeps the unit dense and the top level
removes all of it. The ladders are the same for every block (the supported
families have equal blocks):

- attention: ``min(G, attn_levels)`` steps of ``G / steps`` groups, rounded (``G`` groups);
- MLP: ``mlp_levels`` steps of ``I / steps`` channels, rounded; by default as many steps
  as make one MLP step remove about as many parameters as one attention step
  (SmolLM2-135M: 3 attention steps of 1 group, 9 MLP steps of 170-171 channels,
  each ~295k parameters), so a level moved from one unit to another keeps the
  total nearly fixed.

Methods:

- ``obs`` (default): ZipLM-style structured OBS (:func:`~evoprune.prune.obs.structured_obs`)
  on the output projection (``o``: structures of ``heads_per_group * head_dim``
  columns) and the MLP output projection (one column per channel), from the
  layer-input Hessians ``X^T X`` over a calibration set; the remaining columns
  are updated. The q/k/v and MLP input rows of a removed structure go with it
  unchanged (nothing else reads them);
- ``wanda_sp``: the Wanda-sp order of :mod:`evoprune.prune.importance`, weights unchanged.

On disk (a directory; written into a temporary sibling and renamed, so a crash
leaves no half database): ``levels.json`` (format, method, ladders, per-block
removal orders, model/calibration fingerprints, build cost) and, for ``obs``,
``block_{i:03d}.safetensors`` with ``attn.{a}`` / ``mlp.{m}``: the updated
output-projection weight restricted to the kept columns (``[hidden, kept]``,
the model's dtype) for every level strictly between 0 and the top. Tensors
are read lazily, one (block, unit, level) at a time.

Build cost: one dense forward over the calibration set per chunk of blocks whose
Hessians fit ``hessian_mb`` (float64), stopped after the chunk's last block;
``token_layers`` = calibration tokens x blocks run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..data.calibration import CalibSet
from ..errors import UserError
from ..files import atomic_dir
from ..models.base import family
from ..models.loading import LoadedModel
from ..models.remote.surgery import spans
from ..models.slicing import WidthSpec, width_linears, width_spec
from .kinds import DB_METHODS
from .hessians import OUTPUT_PROJ, UNITS, hessian_chunks
from .obs import structured_obs
from .width_plan import WidthPlan

__all__ = ["DB_METHODS", "level_ladders", "LevelDatabase", "AppliedLevels", "db_fingerprint"]

FORMAT = "evoprune.levels/1"


def _uniform_spec(spec: WidthSpec):
    first = spec.layers[0]
    if any(lw != first for lw in spec.layers):
        raise UserError("level databases need blocks of equal shape (this model's blocks differ)")
    return first


def _ladder(n: int, steps: int) -> tuple[int, ...]:
    return tuple(sorted({int(math.floor(l * n / steps + 0.5)) for l in range(steps + 1)}))


def level_ladders(spec: WidthSpec, attn_levels: int | None = None,
                  mlp_levels: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(attn_counts, mlp_counts)``: structures removed at each level (see the module docstring)."""
    lw = _uniform_spec(spec)
    a_steps = min(lw.groups, int(attn_levels) if attn_levels else 8)
    if a_steps < 1 or lw.channels < 1:
        raise UserError("a level database needs at least one attention group and one MLP channel per block")
    attn = _ladder(lw.groups, a_steps)
    if mlp_levels:
        m_steps = int(mlp_levels)
    else:  # one MLP step ~ one attention step in parameters
        step = attn[1] * lw.group_params
        m_steps = int(math.floor(lw.channels * lw.channel_params / step + 0.5))
    m_steps = max(1, min(lw.channels, m_steps))
    return attn, _ladder(lw.channels, m_steps)


def db_fingerprint(lm: LoadedModel, calib: CalibSet, method: str, attn_counts, mlp_counts, damp: float) -> str:
    """A short hash naming the database these inputs build (model weights' shapes and a weight sample,
    calibration token ids, method, ladders, damping)."""
    h = hashlib.sha256()
    # "wanda_sp" now orders by the published Wanda-sp score: a new name, so that a database built with the
    # earlier all-weights order is never reused for it
    name = "wanda_sp/published" if method == "wanda_sp" else method
    h.update(json.dumps([FORMAT, name, list(attn_counts), list(mlp_counts), float(damp),
                         family(lm.model)]).encode())
    for name, p in lm.model.named_parameters():
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    h.update(calib.input_ids.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class LevelDatabase:
    """A built database (see the module docstring); :meth:`build` makes one, :meth:`load` opens one."""

    def __init__(self, path: str | os.PathLike, meta: dict) -> None:
        self.path = Path(path)
        self.meta = meta
        self._files: dict[int, object] = {}

    # -- contents -----------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    def counts(self, kind: str) -> tuple[int, ...]:
        return tuple(self.meta["counts"][kind])

    def max_level(self, kind: str) -> int:
        return len(self.meta["counts"][kind]) - 1

    def kept(self, layer: int, kind: str, level: int) -> tuple[int, ...]:
        """Sorted kept group (``attn``) or channel (``mlp``) indices of ``layer`` at ``level``."""
        order = self.meta["order"][kind][layer]
        n = self.meta["structures"][kind]
        removed = set(order[: self.counts(kind)[level]])
        return tuple(j for j in range(n) if j not in removed)

    def weight(self, layer: int, kind: str, level: int) -> torch.Tensor | None:
        """The stored output-projection weight of (``layer``, ``kind``) at ``level`` restricted to the kept
        columns, or ``None`` where the dense columns are used unchanged (``wanda_sp``, level 0, the top)."""
        if self.method != "obs" or level in (0, self.max_level(kind)):
            return None
        if layer not in self._files:
            from safetensors import safe_open

            self._files[layer] = safe_open(str(self.path / f"block_{layer:03d}.safetensors"), "pt")
        return self._files[layer].get_tensor(f"{kind}.{level}")

    def plan(self, attn_levels: Sequence[int], mlp_levels: Sequence[int], spec: WidthSpec) -> WidthPlan:
        """The :class:`WidthPlan` (kept structures, parameter counts) of a level vector on ``spec``'s model."""
        if not (len(attn_levels) == len(mlp_levels) == spec.n_layers == self.n_layers):
            raise UserError(f"level vector for {len(attn_levels)} blocks, the database has {self.n_layers}")
        kg, kc, rates, kept_total = [], [], [], 0
        for i, (lw, a, m) in enumerate(zip(spec.layers, attn_levels, mlp_levels)):
            kg.append(self.kept(i, "attn", int(a)))
            kc.append(self.kept(i, "mlp", int(m)))
            kept = len(kg[-1]) * lw.group_params + len(kc[-1]) * lw.channel_params + lw.fixed_params
            rates.append(1.0 - kept / lw.total)
            kept_total += kept
        return WidthPlan(tuple(rates), tuple(kg), tuple(kc), tuple(rates), kept_total, spec.total)

    # -- persistence ----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "LevelDatabase":
        p = Path(path)
        try:
            meta = json.loads((p / "levels.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{p}: not a level database ({e})") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{p}: not a level database (format {meta.get('format')!r})")
        return cls(p, meta)

    @classmethod
    def build(cls, lm: LoadedModel, calib: CalibSet, path: str | os.PathLike, *, method: str = "obs",
              attn_counts: Sequence[int], mlp_counts: Sequence[int], damp: float = 0.01,
              hessian_mb: float = 2048.0, batch_size: int = 1, progress: bool = False,
              fingerprint: str | None = None) -> "LevelDatabase":
        """Build the database of ``lm`` from ``calib`` into ``path`` (which must not exist yet; if another
        process finishes the same path first, its database is returned). ``fingerprint`` is stored in the
        metadata (see :func:`db_fingerprint`)."""
        if method not in DB_METHODS:
            raise UserError(f"unknown level database method {method!r} (choose from {', '.join(DB_METHODS)})")
        path = Path(path)
        if path.exists():
            raise UserError(f"{path} exists already")
        t0 = time.time()
        spec = width_spec(lm.model, lm.adapter)
        lw = _uniform_spec(spec)
        n = spec.n_layers
        sizes = {"attn": spec.heads_per_group * spec.head_dim, "mlp": 1}
        orders = {"attn": [], "mlp": []}
        counts = {"attn": [int(c) for c in attn_counts], "mlp": [int(c) for c in mlp_counts]}
        token_layers = 0
        with atomic_dir(path, done=lambda p: (p / "levels.json").exists()) as tmp:  # a concurrent run may finish first
            if method == "wanda_sp":
                from .importance import compute_importance

                imp, token_layers = compute_importance(lm, calib, metric="wanda_sp", batch_size=batch_size)
                for g_order, c_order in imp.orders:
                    orders["attn"].append(list(g_order))
                    orders["mlp"].append(list(c_order))
            else:
                token_layers = cls._build_obs(lm, calib, spec, sizes, counts, orders, tmp, damp, hessian_mb,
                                              batch_size, progress)
            meta = {"format": FORMAT, "method": method, "n_layers": n, "family": family(lm.model),
                    "base_model": lm.base, "structures": {"attn": lw.groups, "mlp": lw.channels},
                    "structure_params": {"attn": lw.group_params, "mlp": lw.channel_params},
                    "counts": counts, "order": orders, "damp": float(damp),
                    "calib": {"samples": calib.n_samples, "seqlen": calib.seqlen, "source": calib.meta.get("source")},
                    "token_layers": int(token_layers), "build_s": round(time.time() - t0, 2),
                    "fingerprint": fingerprint}
            (tmp / "levels.json").write_text(json.dumps(meta) + "\n")
        return cls.load(path)

    @staticmethod
    def _build_obs(lm, calib, spec, sizes, counts, orders, tmp: Path, damp, hessian_mb, batch_size, progress) -> int:
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        blocks = lm.adapter.get_blocks(lm.model)
        dtype = width_linears(lm.adapter, blocks[0])["o"].weight.dtype
        spent = 0
        bar = tqdm(total=spec.n_layers, desc="level database (OBS)", unit="block", leave=False,
                   disable=not (progress and sys.stderr.isatty()))
        for ids, hess, tl in hessian_chunks(lm, calib, hessian_mb, batch_size):
            spent += tl
            for i in ids:
                lin = width_linears(lm.adapter, blocks[i])
                tensors = {}
                for kind in UNITS:
                    w = lin[OUTPUT_PROJ[kind]].weight
                    order, ws = structured_obs(w, hess.pop((i, kind)), sizes[kind], counts[kind], damp=damp)
                    orders[kind].append(order)
                    n_struct = w.shape[1] // sizes[kind]
                    for level in range(1, len(counts[kind]) - 1):
                        removed = set(order[: counts[kind][level]])
                        kept = torch.tensor([j for j in range(n_struct) if j not in removed], dtype=torch.long)
                        cols = spans(kept, sizes[kind]).to(ws[level].device)
                        tensors[f"{kind}.{level}"] = ws[level].index_select(1, cols).to(dtype).contiguous().cpu()
                save_file(tensors, str(tmp / f"block_{i:03d}.safetensors"))
                bar.update(1)
        bar.close()
        return spent


class AppliedLevels:
    """Keeps ``lm``'s output / MLP-output projection weights at a level vector (masked form: the columns
    of removed structures are zero, kept columns hold the database's weights), so that slicing the model
    with :meth:`LevelDatabase.plan` (e.g. :func:`~evoprune.models.slicing.width_sliced`) gives the pruned
    model. :meth:`apply` writes only the units whose level changed since the last call and returns how
    many it wrote; :meth:`restore` puts the dense weights back bit for bit (a copy of the two projections
    of every block is kept for that)."""

    def __init__(self, lm: LoadedModel, db: LevelDatabase) -> None:
        self.lm, self.db = lm, db
        self.spec = width_spec(lm.model, lm.adapter)
        if self.spec.n_layers != db.n_layers or _uniform_spec(self.spec).groups != db.meta["structures"]["attn"]:
            raise UserError("the level database was built for a model of a different shape")
        self.size = {"attn": self.spec.heads_per_group * self.spec.head_dim, "mlp": 1}
        blocks = lm.adapter.get_blocks(lm.model)
        self.weights = {(i, k): width_linears(lm.adapter, b)[OUTPUT_PROJ[k]].weight for i, b in enumerate(blocks)
                        for k in UNITS}
        self.dense = {key: w.detach().clone() for key, w in self.weights.items()}
        self.current = {key: 0 for key in self.weights}
        self.loads = 0

    @torch.no_grad()
    def apply(self, attn_levels: Sequence[int], mlp_levels: Sequence[int]) -> int:
        written = 0
        for kind, levels in (("attn", attn_levels), ("mlp", mlp_levels)):
            for i, level in enumerate(levels):
                level = int(level)
                if self.current[(i, kind)] == level:
                    continue
                w, dense = self.weights[(i, kind)], self.dense[(i, kind)]
                cols = spans(torch.tensor(self.db.kept(i, kind, level), dtype=torch.long), self.size[kind])
                cols = cols.to(w.device)
                stored = self.db.weight(i, kind, level)
                src = dense.index_select(1, cols) if stored is None else stored.to(w.device, w.dtype)
                w.zero_()
                w.index_copy_(1, cols, src)
                self.current[(i, kind)] = level
                written += 1
        self.loads += written
        return written

    @torch.no_grad()
    def restore(self) -> None:
        for key, w in self.weights.items():
            if self.current[key] != 0:
                w.copy_(self.dense[key])
                self.current[key] = 0
