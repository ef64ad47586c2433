"""The search configuration: :class:`SearchConfig`, one frozen, validated description of a search.

Owns every option of ``evoprune search`` (model, space, method, calibration,
method options, fitness, budgets, caches, the LLM operator, execution options),
their validation (:class:`~evoprune.errors.UserError` on construction), the
mapping from config fields to each strategy's options (:data:`METHOD_OPTIONS`)
and the multi-fidelity stage slices. :mod:`evoprune.run` runs it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import UserError

__all__ = ["SearchConfig", "METHOD_OPTIONS", "EXECUTION_OPTIONS", "SAMPLINGS", "SPACES", "IMPORTANCES", "FITNESSES"]

SAMPLINGS = ("random", "ccds")
# options forwarded from SearchConfig to each strategy's constructor
METHOD_OPTIONS = {
    ("layers", "evop"): ("population", "generations", "mutation_rate", "elite_fraction", "crossover"),
    ("layers", "sleb"): ("protect_ends",),
    ("layers", "shortgpt"): (),
    ("layers", "exhaustive"): ("force",),
    ("layers", "random"): ("budget",),
    ("layers", "evo"): ("generations", "offspring"),
    ("width", "uniform"): (),
    ("width", "owl"): ("owl_lambda",),
    ("width", "evo"): ("population", "mutations", "crossovers", "generations", "step", "owl_lambda"),
    ("width", "self-pruner"): ("population", "mutations", "crossovers", "generations", "step", "owl_lambda",
                               "llm_init", "llm_mutation", "llm_crossover"),
    ("levels", "darwinlm"): ("generations", "offspring", "max_flips", "elitism"),
    ("levels", "uniform"): (),
}
SPACES = ("layers", "width", "levels")
# methods whose candidates are selected in stages (--tokens-per-stage / --survivors-per-stage)
STAGED = (("layers", "evo"), ("levels", "darwinlm"))
IMPORTANCES = ("wanda_sp", "magnitude")
FITNESSES = ("nll", "kl")
# how a run executes, not what it computes: may change between a run and its resume
EXECUTION_OPTIONS = ("workers", "ray_address", "gpus_per_worker", "device_map", "hessian_mb")


@dataclass(frozen=True)
class SearchConfig:
    """Everything that determines a search's result (the run's ``config.json``), plus
    :data:`EXECUTION_OPTIONS` (how it runs: Ray workers), which do not.

    ``sparsity`` s gives k = floor(s*N + 0.5) dropped blocks of N (round half
    up); ``drop_count`` sets k directly. Exactly one of them must be given.
    """

    method: str = "evop"
    model: str = "smollm2-135m"
    space: str = "layers"
    sparsity: float | None = None
    drop_count: int | None = None
    calib: str = "wikitext2"
    sampling: str = "ccds"
    nsamples: int = 5
    seqlen: int = 2048
    clusters: int = 5
    samples_per_cluster: int = 1
    chunk_sentences: int = 60
    embedder: str | None = None
    calib_from: str | None = None
    seed: int = 0
    batch_size: int = 1
    population: int = 20
    generations: int = 10
    mutation_rate: float = 0.05
    elite_fraction: float = 0.3
    crossover: str = "uniform"
    protect_ends: bool = False
    budget: int = 100
    force: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    offspring: int = 16
    survivors_per_stage: tuple | None = None
    tokens_per_stage: tuple | None = None
    fitness: str = "nll"
    kl_topk: int | None = None
    budget_token_layers: int | None = None
    cache_mb: float = 0.0
    # --space width (Self-Pruner and its baselines)
    importance: str = "wanda_sp"
    min_rate: float = 0.0
    max_rate: float = 1.0
    mutations: int = 4
    crossovers: int = 4
    step: float = 0.05
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    llm_init: bool = True
    llm_mutation: bool = True
    llm_crossover: bool = True
    operator_url: str | None = None
    operator_model: str | None = None
    operator_timeout_s: float = 120.0
    operator_retries: int = 3
    operator_call_budget: int = 200
    operator_temperature: float = 0.7
    operator_max_tokens: int | None = None
    # --space levels (DarwinLM): level database, budgets, training-aware selection
    database: str = "obs"
    levels_db: str | None = None
    attn_levels: int | None = None
    mlp_levels: int | None = None
    obs_damp: float = 0.01
    hessian_mb: float = 2048.0
    separate_budgets: bool = False
    max_flips: int = 3
    elitism: bool = True
    training_aware: bool = True
    train_tokens_per_stage: tuple | None = None
    train_mode: str = "lora"
    train_lr: float | None = None
    train_rank: int = 8
    train_data: str | None = None
    # execution options (EXECUTION_OPTIONS): Ray workers; see evoprune.distributed
    workers: int = 1
    ray_address: str | None = None
    gpus_per_worker: float | None = None
    device_map: str | None = None

    def __post_init__(self) -> None:
        from .search import methods

        if self.space not in SPACES:
            raise UserError(f"unknown search space {self.space!r} (choose from {', '.join(SPACES)})")
        if self.method not in methods(self.space):
            raise UserError(f"unknown method {self.method!r} for --space {self.space} "
                            f"(choose from {', '.join(methods(self.space))})")
        if self.space == "width":
            self._check_width()
        if (self.sparsity is None) == (self.drop_count is None):
            raise UserError("give exactly one of --sparsity and --drop-count")
        if self.sparsity is not None and not 0.0 < float(self.sparsity) < 1.0:
            raise UserError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        if self.drop_count is not None and int(self.drop_count) < 1:
            raise UserError(f"--drop-count must be >= 1, got {self.drop_count}")
        if self.sampling not in SAMPLINGS:
            raise UserError(f"unknown sampling {self.sampling!r} (choose from {', '.join(SAMPLINGS)})")
        for name in ("nsamples", "seqlen", "clusters", "samples_per_cluster", "chunk_sentences", "batch_size",
                     "budget"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise UserError(f"--seqlen must be >= 2, got {self.seqlen}")
        for name in ("survivors_per_stage", "tokens_per_stage", "train_tokens_per_stage"):
            v = getattr(self, name)
            if v is not None:
                try:
                    v = tuple(int(x) for x in (v.split(",") if isinstance(v, str) else v))
                except (TypeError, ValueError):
                    raise UserError(f"--{name.replace('_', '-')} must be comma-separated integers, got {v!r}") from None
                if not v or min(v) < 1:
                    raise UserError(f"--{name.replace('_', '-')} must be integers >= 1, got {v}")
                object.__setattr__(self, name, v)
        if int(self.offspring) < 1:
            raise UserError(f"--offspring must be >= 1, got {self.offspring}")
        if self.fitness not in FITNESSES:
            raise UserError(f"unknown fitness {self.fitness!r} (choose from {', '.join(FITNESSES)})")
        if self.kl_topk is not None and (self.fitness != "kl" or int(self.kl_topk) < 1):
            raise UserError("--kl-topk needs --fitness kl and must be >= 1")
        if self.budget_token_layers is not None and int(self.budget_token_layers) < 1:
            raise UserError(f"--budget-token-layers must be >= 1, got {self.budget_token_layers}")
        if float(self.cache_mb) < 0:
            raise UserError(f"--cache-mb must be >= 0, got {self.cache_mb}")
        tps, sps = self.tokens_per_stage, self.survivors_per_stage
        if (tps is not None or sps is not None) and (self.space, self.method) not in STAGED:
            raise UserError("--tokens-per-stage and --survivors-per-stage are options of --method evo (--space layers) "
                            "and --method darwinlm (--space levels)")
        if tps is not None:
            if sps is None or len(sps) != len(tps):
                raise UserError("--tokens-per-stage needs --survivors-per-stage with as many entries")
            if any(b <= a for a, b in zip(tps, tps[1:])) or tps[0] < 2:
                raise UserError(f"--tokens-per-stage must increase and start at >= 2 tokens, got {tps}")
        elif sps is not None and len(sps) != 1:
            raise UserError("several --survivors-per-stage entries need --tokens-per-stage")
        if self.space == "levels":
            self._check_levels()
        self._check_execution()

    def _check_execution(self) -> None:
        w = self.workers
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w != int(w) or w < 1:
            raise UserError(f"--workers must be an integer >= 1, got {w!r}")
        object.__setattr__(self, "workers", int(w))
        if self.ray_address is not None and not str(self.ray_address).strip():
            raise UserError("--ray-address must not be empty (e.g. ray://head:10001 or auto)")
        g = self.gpus_per_worker
        if g is not None and not str(self.device).startswith("cuda"):
            raise UserError("--gpus-per-worker needs --device cuda (CPU workers split the CPUs)")
        if g is not None and not (math.isfinite(float(g)) and float(g) > 0):
            raise UserError(f"--gpus-per-worker must be > 0, got {g}")
        if self.device_map is not None and not str(self.device_map).strip():
            raise UserError("--device-map must not be empty (e.g. auto)")

    def _check_levels(self) -> None:
        from .finetune.brief import TRAIN_MODES
        from .prune.levels_db import DB_METHODS

        if self.drop_count is not None or self.sparsity is None:
            raise UserError("--space levels needs --sparsity (fraction of the blocks' attention and MLP parameters "
                            "to remove), not --drop-count")
        if self.database not in DB_METHODS:
            raise UserError(f"unknown --database {self.database!r} (choose from {', '.join(DB_METHODS)})")
        if self.train_mode not in TRAIN_MODES:
            raise UserError(f"unknown --train-mode {self.train_mode!r} (choose from {', '.join(TRAIN_MODES)})")
        for name in ("attn_levels", "mlp_levels"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if int(self.max_flips) < 1 or int(self.train_rank) < 1:
            raise UserError("--max-flips and --train-rank must be >= 1")
        if not 0.0 <= float(self.obs_damp) < 1.0 or float(self.hessian_mb) <= 0:
            raise UserError("--obs-damp must be in [0, 1) and --hessian-mb > 0")
        if self.train_lr is not None and not float(self.train_lr) > 0:
            raise UserError(f"--train-lr must be > 0, got {self.train_lr}")
        ttp, n_stages = self.train_tokens_per_stage, len(self.tokens_per_stage or (0,))
        if ttp is not None and (not self.training_aware or self.method != "darwinlm"):
            raise UserError("--train-tokens-per-stage needs --method darwinlm with --training-aware on")
        if ttp is not None and len(ttp) != n_stages:
            raise UserError(f"--train-tokens-per-stage needs one entry per selection stage ({n_stages}), got {len(ttp)}")

    @property
    def load_device_map(self) -> str | None:
        """The ``device_map`` models are loaded with: ``--device-map``, or ``auto`` when one worker holds
        several GPUs (``--gpus-per-worker`` > 1: accelerate splits the blocks over them)."""
        if self.device_map is not None:
            return self.device_map
        g = self.gpus_per_worker
        return "auto" if g is not None and float(g) > 1 and str(self.device).startswith("cuda") else None

    @property
    def distributed(self) -> bool:
        """Whether candidates are evaluated by Ray workers (``workers > 1`` or a ``ray_address``)."""
        return self.workers > 1 or self.ray_address is not None

    def _check_width(self) -> None:
        if self.drop_count is not None or self.sparsity is None:
            raise UserError("--space width needs --sparsity (mean pruning rate of the decoder layers), not --drop-count")
        if self.importance not in IMPORTANCES:
            raise UserError(f"unknown importance {self.importance!r} (choose from {', '.join(IMPORTANCES)})")
        if self.fitness != "nll":
            raise UserError("--space width supports --fitness nll only")
        if not 0.0 <= float(self.min_rate) <= float(self.sparsity) <= float(self.max_rate) <= 1.0:
            raise UserError(f"need 0 <= --min-rate <= --sparsity <= --max-rate <= 1, got "
                            f"{self.min_rate}, {self.sparsity}, {self.max_rate}")
        for name in ("mutations", "crossovers", "operator_retries"):
            if int(getattr(self, name)) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if int(self.operator_call_budget) < 1 or float(self.operator_timeout_s) <= 0:
            raise UserError("--operator-call-budget must be >= 1 and --operator-timeout-s > 0")
        llm = self.method == "self-pruner" and (self.llm_init or self.llm_mutation or self.llm_crossover)
        if llm and not (self.operator_url and self.operator_model):
            raise UserError("--method self-pruner needs --operator-url and --operator-model (an OpenAI-compatible "
                            "chat endpoint; the API key is read from $OPENAI_API_KEY)")

    def k(self, n_layers: int) -> int:
        from .space import k_from_sparsity

        return int(self.drop_count) if self.drop_count is not None else k_from_sparsity(n_layers, self.sparsity)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def strategy_options(self) -> dict:
        opts = {k: getattr(self, k) for k in METHOD_OPTIONS.get((self.space, self.method), ())}
        if "owl_lambda" in opts:
            opts["lam"] = opts.pop("owl_lambda")
        if (self.space, self.method) == ("layers", "evo"):
            opts["survivors"] = tuple(self.survivors_per_stage or (4,))
        if (self.space, self.method) == ("levels", "darwinlm"):
            opts["survivors"] = tuple(self.survivors_per_stage or (1,) * len(self.tokens_per_stage or (0,)))
        return opts

    @property
    def trains(self) -> bool:
        """Whether candidates are briefly trained before scoring (training-aware ``darwinlm``)."""
        return (self.space, self.method) == ("levels", "darwinlm") and bool(self.training_aware)

    def train_tokens(self, n_samples: int, seqlen: int) -> list[int] | None:
        """Training tokens per selection stage of a training-aware ``darwinlm`` run (``None``: one-shot):
        ``train_tokens_per_stage``, by default the stage's fitness tokens."""
        if not self.trains:
            return None
        if self.train_tokens_per_stage is not None:
            return list(self.train_tokens_per_stage)
        return [m * t for m, t in self.stage_slices(n_samples, seqlen)]

    def stage_slices(self, n_samples: int, seqlen: int) -> list[tuple[int, int]]:
        """``(samples, tokens per sample)`` of each fidelity stage (one stage: the whole set); see the module doc."""
        if self.tokens_per_stage is None:
            return [(n_samples, seqlen)]
        if self.tokens_per_stage[-1] != n_samples * seqlen:
            raise UserError(f"the last --tokens-per-stage entry must be the whole calibration set "
                            f"({n_samples} x {seqlen} = {n_samples * seqlen} tokens), got {self.tokens_per_stage[-1]}")
        out = []
        for t in self.tokens_per_stage:
            m = min(n_samples, -(-t // seqlen))
            out.append((m, t // m))
        return out
