"""The one-shot width baselines (``--space width``): ``uniform`` (Wanda-sp's allocation) and ``owl``.

Owns :func:`owl_rates`, :class:`OWLConfig`, :class:`UniformStrategy` and :class:`OWLStrategy`. Every
candidate is a :class:`~evoprune.spaces.RateVector` feasible in a :class:`~evoprune.spaces.WidthSpace`
(mean rate = the target sparsity).

- ``uniform``: the same rate ``beta`` in every layer (Wanda-sp's allocation).
- ``owl``: OWL's allocation (Yin et al., 2023) from per-layer outlier ratios
  ``D_i`` (``scores``): ``D`` is min-max scaled to ``[0, 2*lambda]``, centred,
  and a layer's *density* is ``1 - beta + (scaled D_i - mean)``, so layers with
  more outliers lose less; the rates are then projected onto the space (only
  matters when a rate leaves ``[lo, hi]``). ``lambda = 0.08`` as in the paper.

Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...options import opt
from ...spaces import RateVector, SearchError, WidthSpace
from ..base import OneShot
from ..registry import register

__all__ = ["owl_rates", "OWLConfig", "UniformStrategy", "OWLStrategy"]


def owl_rates(space: WidthSpace, outlier_ratio, lam: float = 0.08) -> RateVector:
    """OWL's per-layer rates from outlier ratios ``D_i`` (fraction of outlier weights per layer)."""
    d = np.asarray([float(x) for x in outlier_ratio], dtype=np.float64)
    if d.shape != (space.n_layers,):
        raise SearchError(f"OWL needs one outlier ratio per layer ({space.n_layers}), got {d.size}")
    span = d.max() - d.min()
    scaled = (d - d.min()) / span * 2 * lam if span > 0 else np.zeros_like(d)
    density = scaled - scaled.mean() + (1.0 - space.beta)
    return space.project(1.0 - density)



@dataclass(frozen=True)
class OWLConfig:
    """``lam``: OWL's rate spread lambda; ``scores``: the per-layer outlier ratios (supplied by the runner)."""

    scores: tuple | None = opt(None, "OWL outlier ratio per layer (supplied by the runner)", cli=False)
    lam: float = opt(0.08, "OWL rate spread lambda", flag="owl_lambda")

    def __post_init__(self) -> None:
        if self.scores is not None:
            object.__setattr__(self, "scores", tuple(float(x) for x in self.scores))
        if not 0.0 <= float(self.lam) < 1.0:
            raise SearchError(f"owl lambda must be in [0, 1), got {self.lam}")


@register("uniform", space="width")
class UniformStrategy(OneShot):
    """Every layer at the target rate."""

    def _genome(self) -> RateVector:
        return self.space.uniform()


@register("owl", space="width")
class OWLStrategy(OneShot):
    """OWL's outlier-weighted allocation (see the module docstring)."""

    config_cls = OWLConfig
    inputs = ("scores",)
    needs = frozenset({"scores"})

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        if self.config.scores is None:
            raise SearchError("owl needs per-layer outlier ratios (scores)")

    def _genome(self) -> RateVector:
        return owl_rates(self.space, self.config.scores, self.config.lam)
