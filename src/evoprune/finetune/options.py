"""Fine-tuning options: recovery LoRA (``evoprune finetune``) and the brief training of training-aware search.

Owns :class:`LoRAConfig`, :class:`BriefTrainConfig` and :class:`TrainingOptions` (the ``training``
section of a search configuration: brief training plus when and on what to do it), their defaults
and validation (:class:`~evoprune.errors.UserError`). Pure Python, so the CLI builds its flags without
importing torch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..options import opt, parse_ints

__all__ = ["LoRAConfig", "BriefTrainConfig", "TrainingOptions", "SCHEDULES", "TRAIN_MODES", "TRAIN_SOURCES", "LOSSES",
           "check_train_source"]

SCHEDULES = ("linear", "constant")
TRAIN_MODES = ("lora", "full")
_DEFAULT_LR = {"lora": 5e-4, "full": 5e-5}
TRAIN_SOURCES = ("wikitext2", "c4", "alpaca:PATH", "jsonl:PATH[:field]", "text:PATH")
# recovery objectives: next-token NLL of the text; KL(dense || pruned) of the next-token distributions (the dense
# model as teacher); their sum; auto: kd+lm where the dense model is known, else lm. kd+lm measured best at equal tokens
# (SmolLM2-135M, 100 x 256 wikitext2 tokens, LoRA defaults; held-out wikitext2 / c4 ppl, docs/RESULTS.md "Recovery"):
# width 30%: lm 58.8 / 98.5, kd 66.4 / 94.2, kd+lm 60.7 / 94.7; layers 20%: lm 45.4 / 56.5, kd 49.8 / 55.3,
# kd+lm 45.8 / 55.2 (the lowest geometric mean of the two on both models)
LOSSES = ("auto", "lm", "kd", "kd+lm")


def check_train_source(spec: str, *, files: bool = True, what: str = "--data") -> None:
    """Refuse, without reading it, a training-data spec :func:`~evoprune.finetune.data.train_documents` would refuse: an unknown kind,
    and (``files``) a file that does not exist."""
    from ..data.sources import check_source  # torch-free

    spec = str(spec)
    if spec.startswith("alpaca:"):
        path = spec[len("alpaca:"):]
        if not path.strip():
            raise UserError(f"{what} {spec!r} names no file (e.g. alpaca:alpaca_data.json)")
        if files and not Path(path).expanduser().is_file():
            raise UserError(f"{what} {spec}: data file not found: {path}")
        return
    if spec in ("wikitext2", "c4") or spec.startswith(("text:", "jsonl:")):
        check_source(spec, files=files, what=what)
        return
    raise UserError(f"unknown training data {spec!r} for {what} (choose from {', '.join(TRAIN_SOURCES)})")


@dataclass(frozen=True)
class LoRAConfig:
    """One LoRA recovery run; validated on construction (:class:`UserError`).

    - ``steps``: optimizer steps (>= 1); ``batch_size`` windows of ``seqlen``
      tokens each per step (``tokens = steps * batch_size * seqlen``);
    - ``rank`` r (>= 1), ``alpha`` (> 0; adapter scale ``alpha / r``),
      ``dropout`` on the adapter input ([0, 1));
    - ``lr`` peak learning rate (> 0), ``warmup_steps`` (0..steps),
      ``schedule`` (``linear`` | ``constant``), ``weight_decay`` (>= 0, AdamW),
      ``max_grad_norm`` (> 0, or ``None``: no clipping);
    - ``target``: projection names (last path component, e.g. ``q_proj``) to
      adapt inside the decoder blocks; ``None``: the family's attention and MLP
      projections (:func:`default_targets`);
    - ``seed``: LoRA init, dropout and window order;
    - ``loss``: ``auto`` | ``lm`` | ``kd`` | ``kd+lm`` (:data:`LOSSES`); ``kd_topk``: distil from the teacher's top-K
      log-probabilities per token, cached once before training (``None``: the teacher runs beside the student);
    - ``mode``: ``lora`` (adapters, merged) | ``full`` (the targeted projection weights themselves).
    """

    steps: int = opt(help="optimizer steps")
    rank: int = opt(8, "LoRA rank r")
    alpha: float = opt(16.0, "LoRA alpha; scale = alpha / r")
    dropout: float = opt(0.05, "LoRA dropout")
    lr: float = opt(2e-4, "peak learning rate, AdamW")
    seqlen: int = opt(512, "tokens per training window")
    batch_size: int = opt(1, "windows per step")
    warmup_steps: int = opt(0, "linear warm-up steps")
    schedule: str = opt("linear", "after warm-up: linear (decay) | constant", choices=SCHEDULES)
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float | None = opt(1.0, "gradient-norm clip (None: no clipping)")
    target: tuple[str, ...] | None = opt(None, "comma-separated projection names to adapt (default: the attention "
                                               "and MLP projections, q/k/v/o/gate/up/down or OPT's q/k/v/out/fc1/fc2)",
                                         kind="names")
    seed: int = opt(0, "LoRA init, dropout and window order")
    loss: str = opt("auto", "lm (next-token NLL) | kd (KL to the dense model's next-token distribution) | kd+lm (both) "
                            "| auto: kd+lm when the dense model is known (a run or export's base, --drop, --teacher), "
                            "else lm", choices=LOSSES)
    kd_topk: int | None = opt(None, "kd: distil from the teacher's top-K log-probabilities per token, cached once "
                                    "before training so the teacher need not stay in memory (default: the teacher "
                                    "runs beside the student, or top-64 cached when memory is short)")
    mode: str = opt("lora", "lora (adapters, merged afterwards) | full (train the targeted projections themselves)",
                    choices=TRAIN_MODES)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        for name in ("steps", "rank", "seqlen", "batch_size", "warmup_steps", "seed"):
            v = getattr(self, name)
            need(isinstance(v, (int, np.integer)) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        need(self.seqlen >= 2, f"seqlen must be >= 2, got {self.seqlen}")
        need(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        need(0 <= self.warmup_steps <= self.steps, f"warmup steps must be in [0, steps={self.steps}], "
                                                   f"got {self.warmup_steps}")
        need(math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight decay must be >= 0, got {self.weight_decay}")
        need(self.max_grad_norm is None or (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0),
             f"max grad norm must be > 0 or None, got {self.max_grad_norm}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.target is not None:
            t = (self.target,) if isinstance(self.target, str) else tuple(self.target)
            t = tuple(str(x).strip() for x in t)
            need(bool(t) and all(t), f"target must name at least one module, got {self.target!r}")
            object.__setattr__(self, "target", t)
        need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        need(self.loss in LOSSES, f"unknown --loss {self.loss!r} (choose from {', '.join(LOSSES)})")
        need(self.mode in TRAIN_MODES, f"unknown --mode {self.mode!r} (choose from {', '.join(TRAIN_MODES)})")
        if self.kd_topk is not None:
            need(isinstance(self.kd_topk, (int, np.integer)) and not isinstance(self.kd_topk, bool)
                 and self.kd_topk >= 1, f"--kd-topk must be an integer >= 1, got {self.kd_topk!r}")
            need(self.loss != "lm", "--kd-topk needs --loss kd, kd+lm or auto")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"] = list(self.target) if self.target is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})



@dataclass(frozen=True)
class BriefTrainConfig:
    """``mode`` lora | full; ``lr`` (default 5e-4 for LoRA, 5e-5 full; constant); LoRA ``rank``;
    ``batch_size`` windows per step. Validated (:class:`UserError`). The seed (LoRA init) is the caller's."""

    mode: str = opt("lora", "lora | full (AdamW on the block projections)", flag="train_mode", choices=TRAIN_MODES)
    lr: float | None = opt(None, "brief-training lr (default 5e-4 lora, 5e-5 full; constant)", flag="train_lr")
    rank: int = opt(8, "LoRA rank of the brief training", flag="train_rank")
    batch_size: int = opt(1, "training windows per step", flag="train_batch_size")

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise UserError(f"unknown training mode {self.mode!r} (choose from {', '.join(TRAIN_MODES)})")
        lr = _DEFAULT_LR[self.mode] if self.lr is None else float(self.lr)
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--train-lr must be > 0, got {self.lr}")
        object.__setattr__(self, "lr", lr)
        for name in ("rank", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"--train-{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class TrainingOptions(BriefTrainConfig):
    """The ``training`` section of a training-aware search (``darwinlm``): the brief training above, whether
    it runs (``training_aware``), on how many tokens per selection stage and on what text."""

    training_aware: bool = opt(True, "fine-tune each candidate briefly before scoring it (off: one-shot at the "
                                     "same search budget)")
    tokens_per_stage: tuple | None = opt(None, "training tokens per selection stage, e.g. 1024,4096 (default: the "
                                               "stage's fitness tokens)", flag="train_tokens_per_stage")
    data: str | None = opt(None, "training text (default: the --calib source; windows that share a 16-token "
                                 "sequence with the calibration set are left out)", flag="train_data")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "training_aware", bool(self.training_aware))
        if self.tokens_per_stage is not None:
            try:
                ttp = parse_ints(self.tokens_per_stage)
            except ValueError as e:
                raise UserError(f"--train-tokens-per-stage: {e}") from None
            if not ttp or min(ttp) < 1:
                raise UserError(f"--train-tokens-per-stage must be integers >= 1, got {ttp}")
            if not self.training_aware:
                raise UserError("--train-tokens-per-stage needs --training-aware on")
            object.__setattr__(self, "tokens_per_stage", ttp)
        if self.data is not None:
            check_train_source(self.data, files=False, what="--train-data")
