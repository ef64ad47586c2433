"""The one ask -> evaluate -> tell loop, with run directories and resume.

Owns :class:`SearchConfig` (a frozen, validated description of a search) and
:func:`run_search`. The loop is the same for every method: the strategy asks
for candidates, the evaluator scores each on the calibration set, every
evaluation is appended to ``history.jsonl``, and after every ``tell`` the
strategy state and counters are written atomically to ``RUN/state``.

Resume contract: for the same configuration, a run killed at any point and
continued with :func:`run_search` (``resume=True``) ends with the same
``dropped_layers``, ``calib_loss`` and ``history.jsonl`` as an uninterrupted
run. Evaluations logged after the last saved state are reused, not recomputed,
when the resumed strategy asks for the same candidates (it always does: its
random generator state is part of the saved state).

``token_layers`` counts logical search work: tokens x decoder blocks actually
run, including building caches and one-shot scores once per run (not again
on resume, so the count is the same as an uninterrupted run's). With
``cache_mb`` (shared-prefix LRU), a resumed run replays the logged
evaluations through the LRU's bookkeeping, so later evaluations hit the same
entries and report the same token-layers (ghost entries are recomputed on a
hit, uncounted).

Multi-fidelity (``method="evo"`` with ``tokens_per_stage``): the strategy asks
for :class:`~evoprune.search.evo.Request` objects (pattern, stage). Stage ``s`` with
``T = tokens_per_stage[s]`` tokens uses one data slice shared by all its
candidates: the first ``m = min(n_samples, ceil(T / seqlen))`` calibration
samples, each cut to its first ``T // m`` tokens (so ``m * (T // m) <= T``
tokens). The last stage must be the whole calibration set (``T = n_samples *
seqlen``). Each stage has its own evaluator (own dense prefix cache, built once
per run and counted in ``token_layers``; ``cache_mb`` is split evenly among the
stages' LRUs). History rows of such runs carry a ``stage`` field; ``calib_loss``
is the best candidate's loss at the last (full) stage.

``budget_token_layers``: before each evaluation, the loop stops once the
spent ``token_layers`` reach the budget; the result is the best full-fidelity
candidate so far (``stopped_early: true``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .record import RunDir, is_run_dir

__all__ = ["SearchConfig", "run_search", "METHOD_OPTIONS"]

SAMPLINGS = ("random", "ccds")
# testing knob: seconds to sleep before each evaluation, so kill-and-resume tests can hit mid-run points
_EVAL_DELAY = float(os.environ.get("EVOPRUNE_EVAL_DELAY_S", "0") or 0)
# options forwarded from SearchConfig to each strategy's constructor
METHOD_OPTIONS = {
    "evop": ("population", "generations", "mutation_rate", "elite_fraction", "crossover"),
    "sleb": ("protect_ends",),
    "shortgpt": (),
    "exhaustive": ("force",),
    "random": ("budget",),
    "evo": ("generations", "offspring"),
}
FITNESSES = ("nll", "kl")


@dataclass(frozen=True)
class SearchConfig:
    """Everything that determines a search's result (the run's ``config.json``).

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

    def __post_init__(self) -> None:
        from .search import STRATEGIES

        if self.method not in STRATEGIES:
            raise UserError(f"unknown method {self.method!r} (choose from {', '.join(sorted(STRATEGIES))})")
        if self.space != "layers":
            raise UserError(f"unknown search space {self.space!r} (available: layers)")
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
        for name in ("survivors_per_stage", "tokens_per_stage"):
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
        if (tps is not None or sps is not None) and self.method != "evo":
            raise UserError("--tokens-per-stage and --survivors-per-stage are options of --method evo")
        if tps is not None:
            if sps is None or len(sps) != len(tps):
                raise UserError("--tokens-per-stage needs --survivors-per-stage with as many entries")
            if any(b <= a for a, b in zip(tps, tps[1:])) or tps[0] < 2:
                raise UserError(f"--tokens-per-stage must increase and start at >= 2 tokens, got {tps}")
        elif sps is not None and len(sps) != 1:
            raise UserError("several --survivors-per-stage entries need --tokens-per-stage")

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
        opts = {k: getattr(self, k) for k in METHOD_OPTIONS.get(self.method, ())}
        if self.method == "evo":
            opts["survivors"] = tuple(self.survivors_per_stage or (4,))
        return opts

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


def _build_calib(cfg: SearchConfig, lm, run: RunDir, progress: bool):
    from .data.calibration import CalibSet, ccds, random_windows
    from .data.sources import get_text

    if run.calib_path.exists():
        return CalibSet.load(run.calib_path)
    if cfg.calib_from:
        src = RunDir(cfg.calib_from)
        src.read_config()
        if not src.calib_path.exists():
            raise UserError(f"--calib-from {cfg.calib_from}: run has no calib.pt")
        calib = CalibSet.load(src.calib_path)
    else:
        text = get_text(cfg.calib, "calib")
        rng = np.random.default_rng([cfg.seed, 1])  # calibration stream, apart from the search's
        try:
            if cfg.sampling == "random":
                calib = random_windows(text, lm.tokenizer, cfg.nsamples, cfg.seqlen, rng, source=cfg.calib)
            else:
                calib = ccds(text, lm.tokenizer, clusters=cfg.clusters, samples_per_cluster=cfg.samples_per_cluster,
                             seqlen=cfg.seqlen, chunk_sentences=cfg.chunk_sentences, embedder=cfg.embedder,
                             rng=rng, source=cfg.calib, progress=progress)
        except ValueError as e:
            raise UserError(f"calibration: {e}") from None
    calib.save(run.calib_path)
    return calib


def _check_same_config(run: RunDir, cfg: SearchConfig) -> None:
    old = SearchConfig.from_dict(run.read_config()).to_dict()
    new = cfg.to_dict()
    diff = [f"{k}: {old[k]!r} != {new[k]!r}" for k in new if old.get(k) != new[k]]
    if diff:
        raise UserError(f"{run.path} holds a run with different arguments ({'; '.join(diff)}); "
                        f"use 'evoprune resume {run.path}' or a new --out")


class _Display:
    """A one-line live status (generation, best loss, evaluations, token-layers, elapsed) on stderr."""

    def __init__(self, enabled: bool, method: str):
        # a live line only makes sense on a terminal; logs get the final summary line instead
        enabled = enabled and sys.stderr.isatty()
        self.enabled, self.method, self.t0 = enabled, method, time.time()
        self.live = None
        if enabled:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(stderr=True), refresh_per_second=4, transient=False)
            self.live.start()

    def update(self, gen: int, best: float | None, evals: int, tl: int) -> None:
        if not self.live:
            return
        b = f"{best:.4f} (ppl {math.exp(best):.2f})" if best is not None and math.isfinite(best) else "-"
        el = time.time() - self.t0
        self.live.update(f"[bold]{self.method}[/] gen {gen} | best loss {b} | evals {evals} | "
                         f"token-layers {tl:.3g} | {int(el // 60):02d}:{int(el % 60):02d}")

    def close(self) -> None:
        if self.live:
            self.live.stop()


def run_search(cfg: SearchConfig, out: str | Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Run (or continue) the search ``cfg`` in run directory ``out``; returns ``result.json``'s content."""
    import torch

    from .fitness.evaluator import NLLEvaluator
    from .models import load_model
    from .search import make_strategy
    from .search.base import pattern_from_key
    from .space import LayerDropSpace

    run = RunDir(out)
    if run.path.exists() and any(run.path.iterdir()):
        if not is_run_dir(run.path):
            raise UserError(f"--out {run.path} exists and is not an evoprune run directory")
        _check_same_config(run, cfg)
        resume = True
        done = run.read_result()
        if done is not None:
            return done
    elif resume:
        raise UserError(f"{run.path}: nothing to resume")
    t0 = time.time()
    lm = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, progress=progress)
    n = lm.adapter.n_layers(lm.model)
    k = cfg.k(n)
    protected = (0, n - 1) if cfg.protect_ends else ()
    if not 0 < k < n - len(protected):
        raise UserError(f"cannot drop {k} of {n} blocks ({n - len(protected)} droppable); choose a smaller sparsity")
    space = LayerDropSpace(n, k, protected if cfg.method != "sleb" else ())
    options = cfg.strategy_options()
    if cfg.method == "random" and cfg.budget > space.size():
        options["budget"] = space.size()
    if cfg.method == "exhaustive":
        make_strategy("exhaustive", space, np.random.default_rng(0), **options)  # refuses before any work
    if not resume:
        run.write_config(cfg.to_dict())
    state = run.read_state() if resume else None
    calib = _build_calib(cfg, lm, run, progress)
    slices = cfg.stage_slices(calib.n_samples, calib.seqlen)
    mb = float(cfg.cache_mb) / len(slices)
    evaluators = [NLLEvaluator(lm, calib if (m, t) == (calib.n_samples, calib.seqlen) else calib.slice(m, t),
                               batch_size=cfg.batch_size, prefix_cache=True, metric=cfg.fitness,
                               kl_topk=cfg.kl_topk, cache_mb=mb) for m, t in slices]
    evaluator = evaluators[-1]
    counters = {"evaluations": 0, "token_layers": 0, "generation": 0}
    if state is not None:
        counters.update(state["counters"])
        options.update(state.get("extra_options", {}))
    else:
        extra = {}
        for ev in evaluators:  # the dense hidden-state caches: one dense forward each, counted once per run
            ev.prepare()
            counters["token_layers"] += ev.setup_token_layers
        if cfg.method == "evo":  # BI from the cached dense states of the full set: no extra forward
            extra["scores"] = evaluator.block_influence()
        if cfg.method == "shortgpt":
            from .prune.block_influence import block_influence

            scores, tl = block_influence(lm, calib, batch_size=cfg.batch_size)
            extra["scores"] = [float(s) for s in scores]
            counters["token_layers"] += tl
        options.update(extra)
    strategy = make_strategy(cfg.method, space, np.random.default_rng([cfg.seed, 2]), **options)
    history = run.read_history()
    if state is not None:
        try:
            strategy.load_state_dict(state["strategy"])
        except (KeyError, ValueError) as e:
            raise UserError(f"{run.path}: cannot resume ({e})") from None
        committed, pending = history[: counters["evaluations"]], history[counters["evaluations"]:]
        if len(committed) < counters["evaluations"]:
            raise UserError(f"{run.path}: corrupted run (history shorter than the saved state)")
    else:
        committed, pending = [], history
    run.rewrite_history(committed)
    for r in committed:  # the LRUs' bookkeeping, as the uninterrupted run left it
        evaluators[r.get("stage", -1)].replay(pattern_from_key(r["pattern"]))
    reuse = {(r["pattern"], r.get("stage")): r for r in pending}
    budget = cfg.budget_token_layers
    stopped = False
    display = _Display(progress, cfg.method)
    prev_wall = (state or {}).get("wall_s", 0.0)
    best_seen = strategy.best[1] if strategy.best else math.inf

    def save_state() -> None:
        run.write_state({"counters": counters, "strategy": strategy.state_dict(),
                         "extra_options": {k: options[k] for k in ("scores",) if k in options},
                         "wall_s": round(prev_wall + time.time() - t0, 3)})

    if state is None:
        save_state()
    try:
        while not strategy.done and not stopped:
            cands = strategy.ask()
            fits = []
            for c in cands:
                if budget is not None and counters["token_layers"] >= budget:
                    stopped = True
                    break
                stage = getattr(c, "stage", None)
                pattern = getattr(c, "pattern", c)
                ev_s = evaluators[-1 if stage is None else stage]
                r = reuse.pop((c.key, stage), None)
                if r is None:
                    if _EVAL_DELAY:
                        time.sleep(_EVAL_DELAY)
                    ev = ev_s.evaluate(pattern)
                    loss, tokens, tl = ev.loss, ev.tokens, ev.token_layers
                else:
                    ev_s.replay(pattern)
                    loss, tokens, tl = r["loss"], r["tokens"], r["eval_token_layers"]
                counters["evaluations"] += 1
                counters["token_layers"] += tl
                row = {"eval": counters["evaluations"], "generation": counters["generation"], "pattern": c.key,
                       "dropped": list(c.dropped), "loss": loss, "tokens": tokens, "eval_token_layers": tl,
                       "token_layers": counters["token_layers"]}
                if stage is not None:
                    row["stage"] = stage
                run.append_history(row)
                fits.append(loss)
                if stage is None or stage == len(evaluators) - 1:
                    best_seen = min(best_seen, loss)
                display.update(counters["generation"], best_seen, counters["evaluations"], counters["token_layers"])
            if fits:
                strategy.tell(cands[: len(fits)], fits)
            counters["generation"] = strategy.generation
            save_state()
            run.append_wall({"generation": counters["generation"], "evaluations": counters["evaluations"],
                             "elapsed_s": round(time.time() - t0, 3)})
    finally:
        display.close()
    if strategy.best is None:
        raise UserError(f"--budget-token-layers {budget} ran out before any full-fidelity evaluation; raise it")
    best_p, best_loss = strategy.best
    result = {
        "method": cfg.method, "model": cfg.model, "sparsity": best_p.k / n, "n_layers": n, "k": best_p.k,
        "dropped_layers": list(best_p.dropped), "calib_loss": best_loss, "calib_ppl": math.exp(best_loss),
        "evaluations": counters["evaluations"], "token_layers": counters["token_layers"],
        "dense_token_layers_per_eval": evaluator.dense_token_layers,
        "wall_s": round(prev_wall + time.time() - t0, 2), "seed": cfg.seed, "stopped_early": stopped,
        "calib": {"source": cfg.calib if not cfg.calib_from else f"run:{cfg.calib_from}", "sampling": cfg.sampling,
                  "samples": calib.n_samples, "seqlen": calib.seqlen},
    }
    run.write_result(result)
    if progress:
        print(f"best: drop {result['dropped_layers']} calib loss {best_loss:.4f} (ppl {result['calib_ppl']:.2f}); "
              f"{result['evaluations']} evaluations, {result['token_layers']:.3g} token-layers", file=sys.stderr)
    return result
