"""What a search space means for a model: setup, evaluators, history rows and results per space kind.

Owns :class:`LayerProblem` (``--space layers``: drop exactly k blocks) and
:class:`WidthProblem` (``--space width``: a Wanda-sp width-pruning rate per
layer, mean = the target sparsity) and :func:`make_problem`. The loop in
:mod:`evoprune.run` is the same for both; a problem supplies

- ``space`` (torch-free, handed to the strategy),
- ``prepare(calib, run, fresh)`` -> setup token-layers (dense caches, importance
  scores) and extra strategy options (one-shot scores), counted once per run
  and recovered from the run directory on resume,
- ``setup_files``: files of the run directory besides ``calib.pt`` that
  ``prepare(..., fresh=False)`` reads (a Ray worker gets copies of them; see
  :mod:`evoprune.distributed`),
- ``evaluators`` (one per fidelity stage; ``evaluate(genome)`` -> ``Evaluation``,
  ``replay(genome)`` -> the token-layers ``evaluate`` would report, ``release()``),
- ``row(genome)`` / ``result(genome)``: the space's fields of a history row and
  of ``result.json`` (width: ``rates``; ``params`` = parameters of the pruned
  model, ``params_dense``; ``prunable_params_kept`` / ``_total`` = the decoder
  blocks' attention and MLP projections the rates apply to; ``param_sparsity``
  = 1 - kept / total of those).
"""
from __future__ import annotations

from pathlib import Path

from .errors import UserError

__all__ = ["LayerProblem", "WidthProblem", "make_problem"]


class LayerProblem:
    """Block dropping; see :mod:`evoprune.run` for stages, caches and budgets."""

    kind = "layers"
    setup_files: tuple[str, ...] = ()

    def __init__(self, cfg, lm) -> None:
        from .space import LayerDropSpace

        self.cfg, self.lm = cfg, lm
        n = self.n = lm.adapter.n_layers(lm.model)
        k = cfg.k(n)
        protected = (0, n - 1) if cfg.protect_ends else ()
        if not 0 < k < n - len(protected):
            raise UserError(f"cannot drop {k} of {n} blocks ({n - len(protected)} droppable); choose a smaller sparsity")
        self.space = LayerDropSpace(n, k, protected if cfg.method != "sleb" else ())
        self.evaluators: list = []

    def prepare(self, calib, run, fresh: bool) -> tuple[int, dict]:
        from .fitness.evaluator import NLLEvaluator

        cfg = self.cfg
        slices = cfg.stage_slices(calib.n_samples, calib.seqlen)
        mb = float(cfg.cache_mb) / len(slices)
        self.evaluators = [NLLEvaluator(self.lm, calib if (m, t) == (calib.n_samples, calib.seqlen) else calib.slice(m, t),
                                        batch_size=cfg.batch_size, prefix_cache=True, metric=cfg.fitness,
                                        kl_topk=cfg.kl_topk, cache_mb=mb) for m, t in slices]
        spent, extra = 0, {}
        if fresh:
            for ev in self.evaluators:  # the dense hidden-state caches: one dense forward each, counted once per run
                ev.prepare()
                spent += ev.setup_token_layers
            if cfg.method == "evo":  # BI from the cached dense states of the full set: no extra forward
                extra["scores"] = self.evaluators[-1].block_influence()
            if cfg.method == "shortgpt":
                from .prune.block_influence import block_influence

                scores, tl = block_influence(self.lm, calib, batch_size=cfg.batch_size)
                extra["scores"] = [float(s) for s in scores]
                spent += tl
        return spent, extra

    def row(self, g) -> dict:
        return {"dropped": list(g.dropped)}

    def result(self, g) -> dict:
        return {"sparsity": g.k / self.n, "n_layers": self.n, "k": g.k, "dropped_layers": list(g.dropped),
                "dense_token_layers_per_eval": self.evaluators[-1].dense_token_layers}

    def summary(self, g) -> str:
        return f"drop {list(g.dropped)}"


class WidthProblem:
    """Structured width pruning: per-layer rates, Wanda-sp (or magnitude) ranking inside each layer."""

    kind = "width"
    setup_files: tuple[str, ...] = ("importance.pt",)

    def __init__(self, cfg, lm) -> None:
        from .space import WidthSpace

        if cfg.sparsity is None:
            raise UserError("--space width needs --sparsity (the mean pruning rate of the decoder layers)")
        self.cfg, self.lm = cfg, lm
        self.n = lm.adapter.n_layers(lm.model)
        self.space = WidthSpace(self.n, float(cfg.sparsity), lo=float(cfg.min_rate), hi=float(cfg.max_rate))
        self.evaluators: list = []
        self.importance = None

    def prepare(self, calib, run, fresh: bool) -> tuple[int, dict]:
        from .fitness.width import WidthEvaluator
        from .prune.wanda_sp import WidthImportance, compute_importance

        cfg = self.cfg
        path = Path(run.path) / "importance.pt"
        spent = 0
        if path.exists():
            self.importance = WidthImportance.load(path)
        else:
            self.importance, spent = compute_importance(self.lm, calib, metric=cfg.importance,
                                                        outlier_m=float(cfg.owl_m), batch_size=cfg.batch_size)
            self.importance.save(path)
        if not fresh:
            spent = 0  # counted by the run that computed it
        self.evaluators = [WidthEvaluator(self.lm, calib, self.importance, batch_size=cfg.batch_size)]
        extra = {}
        if cfg.method in ("owl", "evo", "self-pruner"):
            extra["scores"] = [float(x) for x in self.importance.outlier_ratio]
        return spent, extra

    def plan(self, g):
        return self.evaluators[0].plan(g.rates)

    def row(self, g) -> dict:
        return {"rates": list(g.rates)}

    def result(self, g) -> dict:
        p = self.plan(g)
        dense = sum(t.numel() for t in self.lm.model.parameters())
        return {"sparsity": self.space.beta, "n_layers": self.n, "rates": list(g.rates),
                "importance": self.cfg.importance,
                "params": int(dense - (p.params_total - p.params_kept)), "params_dense": int(dense),
                "prunable_params_kept": int(p.params_kept), "prunable_params_total": int(p.params_total),
                "param_sparsity": 1.0 - p.params_kept / p.params_total}

    def summary(self, g) -> str:
        p = self.plan(g)
        return f"rates mean {g.mean:.3f} (min {min(g.rates):.3f}, max {max(g.rates):.3f}); " \
               f"{p.params_kept / p.params_total:.1%} of prunable params kept"


PROBLEMS = {"layers": LayerProblem, "width": WidthProblem}


def make_problem(cfg, lm):
    return PROBLEMS[cfg.space](cfg, lm)
