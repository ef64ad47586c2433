"""The common sections of a search configuration: model, calibration, budget, fitness, execution.

Owns one frozen, validated dataclass per concern, each owning its defaults (on the field, via
:func:`evoprune.options.opt`) and its validation (:class:`~evoprune.errors.UserError` on construction).
The space options live with their problems (:mod:`evoprune.runner.problems`), the method options with
their strategies (``config_cls``), the LLM operator's with it (:class:`evoprune.search.llm.operator.OperatorConfig`),
the brief training's with it (:class:`evoprune.finetune.options.TrainingOptions`).
Torch-free.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..data.sources import check_source
from ..errors import UserError
from ..options import opt
from ..spaces import k_from_sparsity

__all__ = ["ModelOptions", "CalibOptions", "BudgetOptions", "FitnessOptions", "ExecutionOptions",
           "DTYPES", "SAMPLINGS", "FITNESSES", "REPORT_TO", "DEVICE_MAPS", "check_device_name"]

DTYPES = ("float32", "bfloat16", "float16")
SAMPLINGS = ("random", "ccds")
FITNESSES = ("nll", "kl")
REPORT_TO = ("tensorboard", "wandb", "none")  # --report-to: Hugging Face Trainer's report_to names
from ..search.defaults import AUTO_CACHE_MB  # noqa: E402  (re-exported: benchmarks read it here)


# torch device types a model can run on; availability is checked before a model loads (models.preflight)
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|npu|mtia)(:\d+)?")
# from_pretrained(device_map=...) strategies (accelerate); a device name places the whole model there
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_name(value, flag: str = "--device") -> None:
    """Refuse a device string that names no torch device (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ...)."""
    if not _DEVICE.fullmatch(str(value).strip()):
        raise UserError(f"{flag} {value!r} is not a device (use cpu, cuda, cuda:N or mps)")


def _positive(section, *names: str) -> None:
    for name in names:
        v = getattr(section, name)
        if v is not None and (isinstance(v, bool) or int(v) < 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


@dataclass(frozen=True)
class ModelOptions:
    """Which model, where, in which precision."""

    model: str = opt("smollm2-135m", "alias (smollm2-135m), run dir, .gguf file, local HF dir or hub id")
    device: str = opt("cpu", "torch device (cpu, cuda, cuda:N)")
    dtype: str = opt("float32", "weights dtype", choices=DTYPES)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        if not str(self.model).strip():
            raise UserError("--model must not be empty")
        check_device_name(self.device)


@dataclass(frozen=True)
class CalibOptions:
    """The calibration set every candidate is scored on (``RUN/calib.pt``)."""

    calib: str = opt("wikitext2", "calibration source: wikitext2 | c4 | text:PATH | jsonl:PATH[:field]")
    # random 4 x 512: the setting every default search was measured and ranked with (RESULTS, "Leaderboard");
    # EvoP keeps its paper's CCDS x 2048 (its strategy's ``calibration``)
    sampling: str = opt("random", "random (SLEB-style windows) | ccds (EvoP's clustered chunks) (default: random; "
                                  "evop: ccds)", choices=SAMPLINGS, legacy="ccds")
    nsamples: int = opt(4, "random sampling: number of windows", legacy=5)
    seqlen: int = opt(512, "tokens per calibration sample (default: 512; evop: 2048)", legacy=2048)
    clusters: int = opt(5, "ccds: KMeans clusters")
    samples_per_cluster: int = opt(1, "ccds: samples per cluster")
    chunk_sentences: int = opt(60, "ccds: sentences per chunk")
    embedder: str | None = opt(None, "ccds: sentence encoder id/path (default: bundled all-MiniLM-L6-v2)")
    calib_from: str | None = opt(None, "reuse the calibration set of another run directory")
    batch_size: int = opt(1, "calibration samples per forward")

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise UserError(f"unknown sampling {self.sampling!r} (choose from {', '.join(SAMPLINGS)})")
        _positive(self, "nsamples", "seqlen", "clusters", "samples_per_cluster", "chunk_sentences", "batch_size")
        if self.seqlen < 2:
            raise UserError(f"--seqlen must be >= 2, got {self.seqlen}")
        check_source(self.calib, files=False, what="--calib")
        for name in ("embedder", "calib_from"):
            v = getattr(self, name)
            if v is not None and not str(v).strip():
                raise UserError(f"--{name.replace('_', '-')} must not be empty")


@dataclass(frozen=True)
class BudgetOptions:
    """How much to prune, and how much search work to allow. Exactly one of ``sparsity`` and ``drop_count``."""

    sparsity: float | None = opt(None, "layers: fraction of blocks to drop, k = round(s*N), halves up; width / "
                                       "levels: fraction of the blocks' attention and MLP parameters")
    drop_count: int | None = opt(None, "layers: number of blocks to drop (k)")
    budget_token_layers: int | None = opt(None, "stop once the spent token-layers reach this")

    def __post_init__(self) -> None:
        if (self.sparsity is None) == (self.drop_count is None):
            raise UserError("give exactly one of --sparsity and --drop-count")
        if self.sparsity is not None and not 0.0 < float(self.sparsity) < 1.0:
            raise UserError(f"--sparsity must be in (0, 1), got {self.sparsity}")
        if self.drop_count is not None and int(self.drop_count) < 1:
            raise UserError(f"--drop-count must be >= 1, got {self.drop_count}")
        _positive(self, "budget_token_layers")

    def k(self, n_layers: int) -> int:
        """Blocks to drop of ``n_layers``: ``drop_count``, or :func:`~evoprune.spaces.k_from_sparsity`."""
        return int(self.drop_count) if self.drop_count is not None else k_from_sparsity(n_layers, self.sparsity)


@dataclass(frozen=True)
class FitnessOptions:
    """What a candidate's fitness is, and the cache that makes it cheaper."""

    fitness: str = opt("nll", "nll (mean next-token NLL) | kl (KL to the dense model's next-token distribution)",
                       choices=FITNESSES)
    kl_topk: int | None = opt(None, "--fitness kl: keep only the dense model's top-K log-probs per token")
    cache_mb: float | str = opt("auto", "MiB for the shared-prefix hidden-state LRU (0: off; auto: "
                                        f"{AUTO_CACHE_MB:g}, layers / sublayers: at most that of the memory the dense "
                                        "prefix caches leave; off for training-aware levels)", kind="str", legacy=0.0)
    cache_every: str = opt("auto", "layers / sublayers: keep the dense state of every J-th position and recompute "
                                   "the rest (counted in token-layers); auto: 1 (every position) unless that does "
                                   "not fit the cache device, then the smallest J that does")

    def __post_init__(self) -> None:
        if self.fitness not in FITNESSES:
            raise UserError(f"unknown fitness {self.fitness!r} (choose from {', '.join(FITNESSES)})")
        if self.kl_topk is not None and (self.fitness != "kl" or int(self.kl_topk) < 1):
            raise UserError("--kl-topk needs --fitness kl and must be >= 1")
        mb = str(self.cache_mb).strip().lower()
        if mb != "auto":
            try:
                mb = float(mb)
            except ValueError:
                mb = float("nan")
            if not mb >= 0:
                raise UserError(f"--cache-mb must be auto or a number >= 0, got {self.cache_mb!r}")
        object.__setattr__(self, "cache_mb", mb)
        every = str(self.cache_every).strip().lower()
        if every != "auto":
            if not every.isdigit() or int(every) < 1:
                raise UserError(f"--cache-every must be auto or an integer >= 1, got {self.cache_every!r}")
            every = int(every)
        object.__setattr__(self, "cache_every", every)


    def lru_mb(self, space: str, trains: bool = False) -> float:
        """MiB of the shared-prefix LRU for a run of ``space`` (``auto``: :data:`AUTO_CACHE_MB`, which the layer
        spaces cap by the memory their dense caches leave when the run starts, :mod:`.problems.prefix`); a run
        that trains its candidates (training-aware levels) has none: training changes every block."""
        if trains:
            return 0.0
        if self.cache_mb != "auto":
            return float(self.cache_mb)
        return AUTO_CACHE_MB


def _report_to(value) -> str:
    """``--report-to`` normalized: ``"none"``, or the names (``tensorboard``, ``wandb``) once each, comma-separated."""
    parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    names = list(dict.fromkeys(str(n).strip().lower() for n in parts if str(n).strip()))
    bad = [n for n in names if n not in REPORT_TO]
    if bad or not names or ("none" in names and len(names) > 1):
        what = f"unknown --report-to {bad[0]!r}" if bad else f"--report-to {','.join(names)!r} is not valid"
        raise UserError(f"{what} (choose from {', '.join(REPORT_TO)}, or a comma list like tensorboard,wandb)")
    return ",".join(names)


@dataclass(frozen=True)
class ExecutionOptions:
    """How a run executes, not what it computes: may change between a run and its resume (not compared)."""

    workers: int = opt(1, "evaluate candidates on N Ray actors, one model each (1: no Ray)")
    ray_address: str | None = opt(None, "run the workers on an existing Ray cluster (e.g. auto, ray://head:10001)")
    gpus_per_worker: float | None = opt(None, "with --device cuda: GPUs per actor (default 1; a fraction shares a GPU)")
    device_map: str | None = opt(None, "load the model with from_pretrained(device_map=...), e.g. auto (default: auto "
                                       "when --gpus-per-worker > 1)")
    hessian_mb: float = opt(2048.0, "levels: MiB of float64 Hessians per level-database pass")
    cache_device: str | None = opt(None, "device of the cached hidden states (layers / sublayers: the dense cache; "
                                         "width / levels: the block-prefix LRU; default: the model's; cpu beside a "
                                         "CUDA model: pinned host memory)")
    report_to: str = opt("none", "stream per-generation best calib loss, evaluations and token-layers beside the run "
                                 "directory: tensorboard (RUN/tensorboard) | wandb (RUN/wandb) | none, or a comma list",
                         kind="names")

    def __post_init__(self) -> None:
        w = self.workers
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w != int(w) or w < 1:
            raise UserError(f"--workers must be an integer >= 1, got {w!r}")
        object.__setattr__(self, "workers", int(w))
        a = self.ray_address
        if a is not None and not (str(a) in ("auto", "local") or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", str(a))):
            raise UserError(f"--ray-address {a!r} is not a Ray address (auto, local, HOST:PORT or ray://HOST:PORT)")
        g = self.gpus_per_worker
        if g is not None and not (math.isfinite(float(g)) and float(g) > 0):
            raise UserError(f"--gpus-per-worker must be > 0, got {g}")
        if self.device_map is not None and str(self.device_map) not in DEVICE_MAPS:
            try:
                check_device_name(self.device_map, "--device-map")
            except UserError:
                raise UserError(f"--device-map {self.device_map!r}: choose from {', '.join(DEVICE_MAPS)}, or a device "
                                f"such as cpu or cuda:0") from None
        if not (math.isfinite(float(self.hessian_mb)) and float(self.hessian_mb) > 0):
            raise UserError(f"--hessian-mb must be a number > 0, got {self.hessian_mb}")
        if self.cache_device is not None:
            check_device_name(self.cache_device, "--cache-device")
        object.__setattr__(self, "report_to", _report_to(self.report_to))

    @property
    def distributed(self) -> bool:
        """Whether candidates are evaluated by Ray workers (``workers > 1`` or a ``ray_address``)."""
        return self.workers > 1 or self.ray_address is not None

    def load_device_map(self, device: str) -> str | None:
        """The ``device_map`` models are loaded with: ``--device-map``, or ``auto`` when one worker holds
        several GPUs (``--gpus-per-worker`` > 1: accelerate splits the blocks over them)."""
        if self.device_map is not None:
            return self.device_map
        g = self.gpus_per_worker
        return "auto" if g is not None and float(g) > 1 and str(device).startswith("cuda") else None
