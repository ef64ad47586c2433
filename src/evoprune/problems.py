"""What a search space means for a model: setup, evaluators, history rows and results per space kind.

Owns :class:`LayerProblem` (``--space layers``: drop exactly k blocks),
:class:`WidthProblem` (``--space width``: a Wanda-sp width-pruning rate per
layer, mean = the target sparsity), :class:`LevelProblem` (``--space levels``:
DarwinLM's attention and MLP compression levels from a level database, scored
one-shot or after brief training) and :func:`make_problem`. The loop in
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

__all__ = ["LayerProblem", "WidthProblem", "LevelProblem", "make_problem"]


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


class LevelProblem:
    """DarwinLM-style levels: a level database (built once per model, calibration set and ladder; found again
    under ``$EVOPRUNE_CACHE/levels`` or ``--levels-db``), one evaluator per selection stage, each with its
    fitness slice and, when training-aware, its training windows (disjoint from the calibration set)."""

    kind = "levels"
    setup_files: tuple[str, ...] = ("levels_db.json",)

    def __init__(self, cfg, lm) -> None:
        from .models.width import width_spec
        from .prune.levels_db import level_ladders
        from .space_levels import LevelSpace

        if cfg.sparsity is None:
            raise UserError("--space levels needs --sparsity")
        self.cfg, self.lm = cfg, lm
        self.spec = width_spec(lm.model, lm.adapter)
        self.n = self.spec.n_layers
        self.counts = level_ladders(self.spec, cfg.attn_levels, cfg.mlp_levels)
        lw = self.spec.layers[0]
        self.space = LevelSpace(self.n, tuple(c * lw.group_params for c in self.counts[0]),
                                tuple(c * lw.channel_params for c in self.counts[1]), float(cfg.sparsity),
                                self.spec.total, separate=cfg.separate_budgets)
        self.evaluators: list = []
        self.db = None
        self.db_info: dict = {}

    def _database(self, calib, run, fresh: bool) -> int:
        import json

        from .models.loading import cache_dir
        from .prune.levels_db import LevelDatabase, db_fingerprint

        cfg, record = self.cfg, Path(run.path) / "levels_db.json"
        if record.exists():  # a resumed run; if it built the database it counts that once (when still fresh)
            info = json.loads(record.read_text())
            self.db, self.db_info = LevelDatabase.load(info["path"]), info
            return int(info["token_layers"]) if fresh and info.get("built_by_this_run") else 0
        fp = db_fingerprint(self.lm, calib, cfg.database, *self.counts, cfg.obs_damp)
        path = Path(cfg.levels_db).expanduser() if cfg.levels_db else cache_dir() / "levels" / fp
        spent, built = 0, False
        if (path / "levels.json").exists():
            self.db = LevelDatabase.load(path)
            if self.db.meta.get("fingerprint") != fp:
                raise UserError(f"--levels-db {path} was built from another model, calibration set or ladder")
        else:
            self.db = LevelDatabase.build(self.lm, calib, path, method=cfg.database, attn_counts=self.counts[0],
                                          mlp_counts=self.counts[1], damp=cfg.obs_damp, hessian_mb=cfg.hessian_mb,
                                          batch_size=cfg.batch_size, progress=True, fingerprint=fp)
            spent, built = int(self.db.meta["token_layers"]), True
        self.db_info = {"path": str(path), "fingerprint": fp, "built_by_this_run": built,
                        "token_layers": int(self.db.meta["token_layers"]), "build_s": self.db.meta["build_s"]}
        from .record import atomic_write_json

        atomic_write_json(record, self.db_info)
        return spent if fresh else 0

    def _train_pool(self, calib):
        from .finetune.brief import disjoint_windows, shuffled
        from .finetune.data import pack_windows, train_documents

        cfg = self.cfg
        spec = cfg.train_data or cfg.calib
        pool = disjoint_windows(pack_windows(self.lm.tokenizer, train_documents(spec), calib.seqlen), calib.input_ids)
        return shuffled(pool, cfg.seed)

    def prepare(self, calib, run, fresh: bool) -> tuple[int, dict]:
        from .finetune.brief import BriefTrainConfig
        from .fitness.levels import LevelEvaluator
        from .prune.levels_db import AppliedLevels

        cfg = self.cfg
        spent = self._database(calib, run, fresh)
        applied = AppliedLevels(self.lm, self.db)
        slices = cfg.stage_slices(calib.n_samples, calib.seqlen)
        train = cfg.train_tokens(calib.n_samples, calib.seqlen)
        pool = self._train_pool(calib) if train else None
        tcfg = BriefTrainConfig(mode=cfg.train_mode, lr=cfg.train_lr, rank=cfg.train_rank, seed=cfg.seed)
        self.evaluators = []
        for s, (m, t) in enumerate(slices):
            windows = None
            if train:
                need = max(1, train[s] // calib.seqlen)
                if need > pool.shape[0]:
                    raise UserError(f"training data has {pool.shape[0]} windows of {calib.seqlen} tokens apart from "
                                    f"the calibration set; stage {s} needs {need}")
                windows = pool[:need]
            part = calib if (m, t) == (calib.n_samples, calib.seqlen) else calib.slice(m, t)
            self.evaluators.append(LevelEvaluator(applied, part, train_windows=windows, train_cfg=tcfg,
                                                  batch_size=cfg.batch_size, metric=cfg.fitness, kl_topk=cfg.kl_topk))
        if fresh:
            for ev in self.evaluators:  # dense KL targets (nll: nothing), before any level is applied
                ev.prepare()
                spent += ev.setup_token_layers
        return spent, {}

    def plan(self, g):
        return self.db.plan(g.attn, g.mlp, self.spec)

    def row(self, g) -> dict:
        rates = [round(r, 6) for r in self.plan(g).layer_rates]  # per block, for reports
        return {"attn_levels": list(g.attn), "mlp_levels": list(g.mlp), "rates": rates}

    def result(self, g) -> dict:
        p = self.plan(g)
        dense = sum(t.numel() for t in self.lm.model.parameters())
        return {"sparsity": self.space.sparsity, "n_layers": self.n, "attn_levels": list(g.attn),
                "mlp_levels": list(g.mlp), "rates": [round(r, 6) for r in p.layer_rates],
                "database": self.cfg.database, "levels_db": self.db_info,
                "training_aware": self.cfg.trains,
                "params": int(dense - (p.params_total - p.params_kept)), "params_dense": int(dense),
                "prunable_params_kept": int(p.params_kept), "prunable_params_total": int(p.params_total),
                "param_sparsity": 1.0 - p.params_kept / p.params_total}

    def summary(self, g) -> str:
        p = self.plan(g)
        return (f"levels attn {sum(g.attn)} / mlp {sum(g.mlp)} steps; "
                f"{p.params_kept / p.params_total:.1%} of prunable params kept")


PROBLEMS = {"layers": LayerProblem, "width": WidthProblem, "levels": LevelProblem}


def make_problem(cfg, lm):
    return PROBLEMS[cfg.space](cfg, lm)
