"""Width pruning with reconstruction: the kept output-projection columns updated to preserve each layer's output.

Owns :class:`Reconstruction` (the ``--reconstruct`` choices and the dampening live in :mod:`.kinds`). When a
width plan removes attention groups or MLP channels of a block, the input columns they own in the attention
output projection ``o`` and the MLP output projection go; ``ls`` then sets the kept columns to the
least-squares solution that best reproduces the dense projection's output on the dense model's calibration
activations (:func:`~evoprune.prune.obs.reconstruct`: the structured-OBS update for the removed set, from
``H = X^T X`` dampened by ``damp * mean(diag H)``). A block's update depends only on that block's kept
structures, so it is computed once per (block, projection, kept columns) and cached; ``none`` leaves the kept
columns as they are (the published Wanda-sp / Self-Pruner / OWL / LLM-Pruner setting).

Measured on SmolLM2-135M, uniform Wanda-sp at 30% (docs/RESULTS.md, "Width reconstruction"): held-out
wikitext2 ppl 1950.0 without it, 184.4 with FLAP's bias compensation, 111.9 with ``ls`` (damp 0.3), on 4 x 512
calibration tokens; on 2 x 128 tokens ``ls`` gives 195.9 (none: 1172.1). Bias compensation on top of ``ls`` added
nothing, so no bias is written and exports need none.

Memory: every block's two Hessians in float32 on the cache device (SmolLM2: 322 MB), computed in chunks of blocks
whose float64 Hessians fit ``hessian_mb``; ``cache_mb`` of solved columns; one dense copy of the two projections
of every block (their exact restore).
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

import torch

from ..data.calibration import CalibSet
from ..models.loading import LoadedModel
from ..models.slicing import check_plan, output_columns, width_linears, width_spec
from .hessians import OUTPUT_PROJ, hessian_chunks
from .kinds import RECONSTRUCT_CACHE_MB, RECONSTRUCT_DAMP
from .obs import reconstruct

__all__ = ["Reconstruction"]


class Reconstruction:
    """Least-squares reconstructed output projections of ``lm`` for any width plan (see the module docstring).

    Built from one pass of Hessians over ``calib`` (``token_layers`` records its cost). :meth:`applied` runs a
    block of code with a plan's masked, reconstructed weights in place and restores the dense ones bit for bit;
    :meth:`apply_inplace` writes them for good (the pruned model, before slicing)."""

    def __init__(self, lm: LoadedModel, calib: CalibSet, *, damp: float = RECONSTRUCT_DAMP, batch_size: int = 1,
                 hessian_mb: float = 2048.0, cache_mb: float = RECONSTRUCT_CACHE_MB, device: str | None = None) -> None:
        self.lm, self.damp = lm, float(damp)
        self.spec = width_spec(lm.model, lm.adapter)
        blocks = lm.adapter.get_blocks(lm.model)
        self.weights = {(i, role): width_linears(lm.adapter, b)[role].weight for i, b in enumerate(blocks)
                        for role in OUTPUT_PROJ.values()}
        self.dense = {key: w.detach().clone() for key, w in self.weights.items()}
        self.hessians: dict = {}
        self.token_layers = 0
        for _, hess, tl in hessian_chunks(lm, calib, hessian_mb, batch_size):
            self.token_layers += tl
            for (i, unit), h in hess.items():
                w = self.weights[(i, OUTPUT_PROJ[unit])]
                self.hessians[(i, OUTPUT_PROJ[unit])] = h.to(device or w.device, torch.float32)
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes, self.cache_limit = 0, int(float(cache_mb) * 2 ** 20)
        self.solved = 0  # reconstructions computed (cache misses)

    def columns(self, block: int, role: str, kept: torch.Tensor) -> torch.Tensor:
        """The reconstructed kept columns ``kept`` of block ``block``'s projection ``role`` (``o`` or ``mlp_out``),
        in the weight's dtype and device; cached (least recently used go first past ``cache_mb``)."""
        key = (block, role, tuple(kept.tolist()))
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        dense = self.dense[(block, role)]
        cols = reconstruct(dense, self.hessians[(block, role)], kept, self.damp).to(dense.dtype).contiguous()
        self.solved += 1
        size = cols.numel() * cols.element_size()
        if size <= self.cache_limit:
            self.cache[key] = cols
            self.cache_bytes += size
            while self.cache_bytes > self.cache_limit:
                _, old = self.cache.popitem(last=False)
                self.cache_bytes -= old.numel() * old.element_size()
        return cols

    @torch.no_grad()
    def _write(self, plan) -> list:
        check_plan(self.spec, plan)
        touched = []
        for i in range(self.spec.n_layers):
            for role, (kept, removed) in output_columns(self.spec, plan, i).items():
                if not len(removed):  # nothing removed: the dense weights are the best ones
                    continue
                w = self.weights[(i, role)]
                w.zero_()
                if len(kept):
                    w.index_copy_(1, kept.to(w.device), self.columns(i, role, kept))
                touched.append((i, role))
        return touched

    @contextmanager
    def applied(self, model, plan) -> Iterator[None]:
        """Run the block with ``plan``'s masked, reconstructed output projections in ``model`` (this
        reconstruction's model), then restore the dense weights exactly, also on exceptions."""
        if model is not self.lm.model:
            raise ValueError("a Reconstruction applies to the model it was built from")
        touched = None
        try:
            touched = self._write(plan)
            yield
        finally:
            with torch.no_grad():
                for key in self.weights if touched is None else touched:  # a failed write may have touched any
                    self.weights[key].copy_(self.dense[key])

    def apply_inplace(self, plan) -> None:
        """Write ``plan``'s masked, reconstructed output projections into the model for good: slicing it by
        ``plan`` then gives the reconstructed pruned model."""
        self._write(plan)
