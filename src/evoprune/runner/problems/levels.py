"""``--space levels``: DarwinLM's attention and MLP compression levels from a level database.

Owns :class:`LevelsOptions` and :class:`LevelProblem`: a level database (built once per model,
calibration set and ladder; found again under ``$EVOPRUNE_CACHE/levels`` or ``--levels-db``; the run
that builds it counts its token-layers), the :class:`~evoprune.spaces.LevelSpace`, and one
:class:`~evoprune.fitness.levels.LevelEvaluator` per selection stage, each with its fitness slice and,
when the strategy trains candidates (``"training"`` in its requirements, ``training_aware`` on), its
training windows (disjoint from the calibration set); one-shot, ``--cache-mb`` holds their block-prefix
states (:func:`~evoprune.fitness.whole_model.share_prefixes`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ...files import atomic_write_json
from ...options import opt
from ...prune.kinds import DB_METHODS
from .common import stage_slices, stage_tokens

__all__ = ["LevelsOptions", "LevelProblem", "trains"]


@dataclass(frozen=True)
class LevelsOptions:
    """Options of the level space (the database and the budget's shape)."""

    database: str = opt("obs", "obs (ZipLM-style structured OBS with weight updates) | wanda_sp (Wanda-sp order, "
                               "weights unchanged)", choices=DB_METHODS)
    levels_db: str | None = opt(None, "level database directory (default: $EVOPRUNE_CACHE/levels/<fingerprint>; "
                                      "built on first use, reused by every run with the same model, calibration set "
                                      "and ladder)")
    attn_levels: int | None = opt(None, "attention ladder steps (default min(groups, 8))")
    mlp_levels: int | None = opt(None, "MLP ladder steps (default: one MLP step ~ one attention step in parameters)")
    obs_damp: float = opt(0.01, "OBS Hessian dampening, fraction of its mean diagonal")
    separate_budgets: bool = opt(False, "attention and MLP each lose --sparsity of their parameters (default: one "
                                        "joint budget)")

    def __post_init__(self) -> None:
        if self.database not in DB_METHODS:
            raise UserError(f"unknown --database {self.database!r} (choose from {', '.join(DB_METHODS)})")
        for name in ("attn_levels", "mlp_levels"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if not 0.0 <= float(self.obs_damp) < 1.0:
            raise UserError(f"--obs-damp must be in [0, 1), got {self.obs_damp}")
        if self.levels_db is not None and (not str(self.levels_db).strip() or Path(self.levels_db).expanduser().is_file()):
            raise UserError(f"--levels-db {self.levels_db!r} must name a directory (it is built there on first use)")


def trains(cfg) -> bool:
    """Whether the run trains its candidates before scoring them (training-aware selection)."""
    return cfg.training is not None and cfg.training.training_aware and "training" in cfg.requirements


def train_tokens(cfg, n_samples: int, seqlen: int) -> list[int] | None:
    """Training tokens per selection stage of a run that trains its candidates (``None``: one-shot):
    ``--train-tokens-per-stage``, by default each stage's fitness tokens."""
    if not trains(cfg):
        return None
    if cfg.training.tokens_per_stage is not None:
        return list(cfg.training.tokens_per_stage)
    return [m * t for m, t in stage_slices(stage_tokens(cfg), n_samples, seqlen)]


class LevelProblem:
    """DarwinLM-style levels; see the module docstring."""

    kind = "levels"
    options_cls = LevelsOptions
    setup_files: tuple[str, ...] = ("levels_db.json",)

    @staticmethod
    def check_config(cfg) -> None:
        """Cross-section checks that need no model."""
        if cfg.budget.sparsity is None:
            raise UserError("--space levels needs --sparsity (fraction of the blocks' attention and MLP parameters "
                            "to remove), not --drop-count")
        training = cfg.training
        if training is not None and training.tokens_per_stage is not None:
            n_stages = cfg.selection.n_stages
            if len(training.tokens_per_stage) != n_stages:
                raise UserError(f"--train-tokens-per-stage needs one entry per selection stage ({n_stages}), "
                                f"got {len(training.tokens_per_stage)}")

    def __init__(self, cfg, lm) -> None:
        from ...models.slicing import width_spec
        from ...prune.levels_db import level_ladders
        from ...spaces import LevelSpace

        self.cfg, self.lm = cfg, lm
        o = cfg.space_options
        self.spec = width_spec(lm.model, lm.adapter)
        self.n = self.spec.n_layers
        self.counts = level_ladders(self.spec, o.attn_levels, o.mlp_levels)
        lw = self.spec.layers[0]
        self.space = LevelSpace(self.n, tuple(c * lw.group_params for c in self.counts[0]),
                                tuple(c * lw.channel_params for c in self.counts[1]), float(cfg.budget.sparsity),
                                self.spec.total, separate=o.separate_budgets)
        self.evaluators: list = []
        self.db = None
        self.db_info: dict = {}

    def _database(self, calib, run, fresh: bool) -> int:
        from ...models.loading import cache_dir
        from ...prune.levels_db import LevelDatabase, db_fingerprint

        o, record = self.cfg.space_options, Path(run.path) / "levels_db.json"
        if record.exists():  # a resumed run; if it built the database it counts that once (when still fresh)
            info = json.loads(record.read_text())
            self.db, self.db_info = LevelDatabase.load(info["path"]), info
            return int(info["token_layers"]) if fresh and info.get("built_by_this_run") else 0
        fp = db_fingerprint(self.lm, calib, o.database, *self.counts, o.obs_damp)
        path = Path(o.levels_db).expanduser() if o.levels_db else cache_dir() / "levels" / fp
        spent, built = 0, False
        if (path / "levels.json").exists():
            self.db = LevelDatabase.load(path)
            if self.db.meta.get("fingerprint") != fp:
                raise UserError(f"--levels-db {path} was built from another model, calibration set or ladder")
        else:
            self.db = LevelDatabase.build(self.lm, calib, path, method=o.database, attn_counts=self.counts[0],
                                          mlp_counts=self.counts[1], damp=o.obs_damp,
                                          hessian_mb=self.cfg.execution.hessian_mb,
                                          batch_size=self.cfg.calibration.batch_size, progress=True, fingerprint=fp)
            spent, built = int(self.db.meta["token_layers"]), True
        self.db_info = {"path": str(path), "fingerprint": fp, "built_by_this_run": built,
                        "token_layers": int(self.db.meta["token_layers"]), "build_s": self.db.meta["build_s"]}
        atomic_write_json(record, self.db_info)
        return spent if fresh else 0

    def _train_pool(self, calib):
        from ...finetune.brief import disjoint_windows, shuffled
        from ...finetune.data import pack_windows, train_documents

        cfg = self.cfg
        spec = cfg.training.data or cfg.calibration.calib
        pool = disjoint_windows(pack_windows(self.lm.tokenizer, train_documents(spec), calib.seqlen), calib.input_ids)
        return shuffled(pool, cfg.seed)

    def prepare(self, calib, run, fresh: bool, needs: frozenset) -> tuple[int, dict]:
        from ...fitness.levels import LevelEvaluator
        from ...fitness.whole_model import share_prefixes
        from ...prune.levels_db import AppliedLevels

        cfg = self.cfg
        spent = self._database(calib, run, fresh)
        applied = AppliedLevels(self.lm, self.db)
        slices = stage_slices(stage_tokens(cfg), calib.n_samples, calib.seqlen)
        train = train_tokens(cfg, calib.n_samples, calib.seqlen)
        pool = self._train_pool(calib) if train else None
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
            self.evaluators.append(LevelEvaluator(applied, part, train_windows=windows, train_cfg=cfg.training,
                                                  train_seed=cfg.seed,
                                                  batch_size=cfg.calibration.batch_size, metric=cfg.fitness.fitness,
                                                  kl_topk=cfg.fitness.kl_topk,
                                                  cache_device=cfg.execution.cache_device))
        share_prefixes(self.evaluators, cfg.fitness.lru_mb(cfg.space, bool(train)))
        if fresh:
            for ev in self.evaluators:  # dense KL targets (nll: nothing), before any level is applied
                ev.prepare()
                spent += ev.setup_token_layers
        # a strategy that may train learns whether it does (darwinlm: its one-shot default budget)
        return spent, ({"trains": bool(train)} if "training" in needs else {})

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
                "database": self.cfg.space_options.database, "levels_db": self.db_info,
                "training_aware": trains(self.cfg),
                "params": int(dense - (p.params_total - p.params_kept)), "params_dense": int(dense),
                "prunable_params_kept": int(p.params_kept), "prunable_params_total": int(p.params_total),
                "param_sparsity": 1.0 - p.params_kept / p.params_total}

    def summary(self, g) -> str:
        p = self.plan(g)
        return (f"levels attn {sum(g.attn)} / mlp {sum(g.mlp)} steps; "
                f"{p.params_kept / p.params_total:.1%} of prunable params kept")
