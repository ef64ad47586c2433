"""``--space width``: a structured width-pruning rate per decoder layer, mean = the target sparsity.

Owns :class:`WidthOptions` and :class:`WidthProblem`: the :class:`~evoprune.spaces.WidthSpace`, the
structure importance (Wanda-sp or magnitude, from one dense forward of the whole calibration set;
``RUN/importance.pt``, counted once per run), one :class:`~evoprune.fitness.whole_model.WidthEvaluator` per
selection stage (its data slice, :func:`~evoprune.runner.problems.common.stage_slices`; ``--cache-mb`` for
their block-prefix states, :func:`~evoprune.fitness.whole_model.share_prefixes`), and the OWL outlier ratios as
one-shot ``scores`` for strategies that need them. ``result.json`` adds ``rates``, ``importance``,
``params`` (of the pruned model), ``params_dense``, ``prunable_params_kept`` / ``_total`` (the decoder
blocks' attention and MLP projections the rates apply to) and ``param_sparsity``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ...options import opt
from ...prune.kinds import IMPORTANCES, RECONSTRUCT, RECONSTRUCT_DAMP
from .common import stage_slices, stage_tokens

__all__ = ["WidthOptions", "WidthProblem"]


@dataclass(frozen=True)
class WidthOptions:
    """Options of the width space."""

    importance: str = opt("wanda_sp", "ranks heads and channels inside a layer", choices=IMPORTANCES)
    min_rate: float = opt(0.0, "lowest per-layer rate")
    max_rate: float = opt(1.0, "highest per-layer rate (1: a layer may lose all its width)")
    owl_m: float = opt(5.0, "OWL outlier threshold M x layer mean")
    reconstruct: str = opt("ls", "ls: update the kept output-projection columns to preserve each layer's output on "
                                 "the calibration activations (least squares); none: keep them as they are (the "
                                 "published Wanda-sp / Self-Pruner / OWL / LLM-Pruner setting)", choices=RECONSTRUCT,
                           legacy="none")
    reconstruct_damp: float = opt(RECONSTRUCT_DAMP, "--reconstruct ls: dampening, a fraction of the mean Hessian "
                                                    "diagonal", cli=False)

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCES:
            raise UserError(f"unknown importance {self.importance!r} (choose from {', '.join(IMPORTANCES)})")
        if not 0.0 <= float(self.min_rate) <= float(self.max_rate) <= 1.0:
            raise UserError(f"need 0 <= --min-rate <= --max-rate <= 1, got {self.min_rate}, {self.max_rate}")
        if not (math.isfinite(float(self.owl_m)) and float(self.owl_m) > 0):
            raise UserError(f"--owl-m must be a number > 0, got {self.owl_m}")
        if self.reconstruct not in RECONSTRUCT:
            raise UserError(f"unknown --reconstruct {self.reconstruct!r} (choose from {', '.join(RECONSTRUCT)})")
        if not (math.isfinite(float(self.reconstruct_damp)) and float(self.reconstruct_damp) > 0):
            raise UserError(f"reconstruct_damp must be a number > 0, got {self.reconstruct_damp}")


class WidthProblem:
    """Per-layer rates, structures ranked by importance inside each layer; see the module docstring."""

    kind = "width"
    options_cls = WidthOptions
    setup_files: tuple[str, ...] = ("importance.pt",)

    @staticmethod
    def check_config(cfg) -> None:
        """Cross-section checks that need no model."""
        s, o = cfg.budget.sparsity, cfg.space_options
        if s is None:
            raise UserError("--space width needs --sparsity (mean pruning rate of the decoder layers), not --drop-count")
        if cfg.fitness.fitness != "nll":
            raise UserError("--space width supports --fitness nll only")
        if not float(o.min_rate) <= float(s) <= float(o.max_rate):
            raise UserError(f"need 0 <= --min-rate <= --sparsity <= --max-rate <= 1, got "
                            f"{o.min_rate}, {s}, {o.max_rate}")

    def __init__(self, cfg, lm) -> None:
        from ...spaces import WidthSpace

        self.cfg, self.lm = cfg, lm
        self.n = lm.adapter.n_layers(lm.model)
        o = cfg.space_options
        self.space = WidthSpace(self.n, float(cfg.budget.sparsity), lo=float(o.min_rate), hi=float(o.max_rate))
        self.evaluators: list = []
        self.importance = None

    def prepare(self, calib, run, fresh: bool, needs: frozenset) -> tuple[int, dict]:
        from ...fitness.whole_model import WidthEvaluator, share_prefixes
        from ...prune.importance import WidthImportance, compute_importance
        from ...prune.reconstruct import Reconstruction

        cfg, o = self.cfg, self.cfg.space_options
        path = Path(run.path) / "importance.pt"
        spent = 0
        if path.exists():
            self.importance = WidthImportance.load(path)
        else:
            self.importance, spent = compute_importance(self.lm, calib, metric=o.importance, outlier_m=float(o.owl_m),
                                                        batch_size=cfg.calibration.batch_size)
            self.importance.save(path)
        if not fresh:
            spent = 0  # counted by the run that computed it
        slices = stage_slices(stage_tokens(cfg), calib.n_samples, calib.seqlen)
        whole = (calib.n_samples, calib.seqlen)
        recon = None
        if o.reconstruct == "ls":  # the dense model's output-projection Hessians, over the whole calibration set
            recon = Reconstruction(self.lm, calib, damp=o.reconstruct_damp, batch_size=cfg.calibration.batch_size,
                                   hessian_mb=cfg.execution.hessian_mb, device=cfg.execution.cache_device)
            spent += recon.token_layers if fresh else 0
        self.evaluators = [WidthEvaluator(self.lm, calib if (m, t) == whole else calib.slice(m, t), self.importance,
                                          batch_size=cfg.calibration.batch_size, recon=recon,
                                          cache_device=cfg.execution.cache_device) for m, t in slices]
        share_prefixes(self.evaluators, cfg.fitness.lru_mb(cfg.space))
        inputs = {"scores": [float(x) for x in self.importance.outlier_ratio]} if "scores" in needs else {}
        return spent, inputs

    def plan(self, g):
        return self.evaluators[0].plan(g.rates)

    def row(self, g) -> dict:
        return {"rates": list(g.rates)}

    def result(self, g) -> dict:
        p = self.plan(g)
        dense = sum(t.numel() for t in self.lm.model.parameters())
        return {"sparsity": self.space.beta, "n_layers": self.n, "rates": list(g.rates),
                "importance": self.cfg.space_options.importance, "reconstruct": self.cfg.space_options.reconstruct,
                "params": int(dense - (p.params_total - p.params_kept)), "params_dense": int(dense),
                "prunable_params_kept": int(p.params_kept), "prunable_params_total": int(p.params_total),
                "param_sparsity": 1.0 - p.params_kept / p.params_total}

    def summary(self, g) -> str:
        p = self.plan(g)
        return f"rates mean {g.mean:.3f} (min {min(g.rates):.3f}, max {max(g.rates):.3f}); " \
               f"{p.params_kept / p.params_total:.1%} of prunable params kept"
