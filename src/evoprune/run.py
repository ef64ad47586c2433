"""The one ask -> evaluate -> tell loop, with run directories and resume.

The loop is the same for every search space; what a space means for the model
(setup, evaluators, history fields, result fields) lives in
:mod:`evoprune.problems` (``layers``: block dropping; ``width``: per-layer
width-pruning rates, Self-Pruner and its baselines).

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

Workers (``workers > 1`` or ``ray_address``): the candidates of each ``ask()``
batch are evaluated in parallel by Ray actors (:mod:`evoprune.distributed`) and
consumed in candidate order; the driver replays each candidate through its own
evaluators' bookkeeping first, so token-layers, the budget's stopping point,
``history.jsonl`` and ``result.json`` are those of the sequential run.
``workers``, ``ray_address`` and ``gpus_per_worker`` are execution options:
not compared on resume, no effect on the result.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .config import EXECUTION_OPTIONS, METHOD_OPTIONS, SearchConfig  # noqa: F401  (re-exported)
from .errors import UserError
from .record import RunDir, is_run_dir

__all__ = ["SearchConfig", "run_search", "METHOD_OPTIONS"]

# testing knob: seconds to sleep before each evaluation, so kill-and-resume tests can hit mid-run points
_EVAL_DELAY = float(os.environ.get("EVOPRUNE_EVAL_DELAY_S", "0") or 0)


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
    diff = [f"{k}: {old[k]!r} != {new[k]!r}" for k in new if old.get(k) != new[k] and k not in EXECUTION_OPTIONS]
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


def run_search(cfg: SearchConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
               operator=None) -> dict:
    """Run (or continue) the search ``cfg`` in run directory ``out``; returns ``result.json``'s content.

    ``operator``: an LLM operator for ``--method self-pruner`` (default: an
    :class:`~evoprune.search.llm_operator.LLMOperator` built from the ``operator_*``
    options, logging every call to ``RUN/llm_calls.jsonl``).
    """
    import torch

    from .models import load_model
    from .problems import make_problem
    from .search import make_strategy

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
    lm = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, progress=progress,
                    device_map=cfg.load_device_map)
    problem = make_problem(cfg, lm)
    space = problem.space
    options = cfg.strategy_options()
    if cfg.method == "random" and cfg.budget > space.size():
        options["budget"] = space.size()
    if cfg.method == "exhaustive":
        make_strategy("exhaustive", space, np.random.default_rng(0), **options)  # refuses before any work
    if not resume:
        run.write_config(cfg.to_dict())
    state = run.read_state() if resume else None
    calib = _build_calib(cfg, lm, run, progress)
    counters = {"evaluations": 0, "token_layers": 0, "generation": 0}
    spent, extra = problem.prepare(calib, run, fresh=state is None)
    evaluators = problem.evaluators
    if state is not None:
        counters.update(state["counters"])
        options.update(state.get("extra_options", {}))
    else:
        counters["token_layers"] += spent
        options.update(extra)
    if cfg.method == "self-pruner":
        options["operator"] = operator if operator is not None else _make_operator(cfg, lm, run, problem)
    strategy = make_strategy(cfg.method, space, np.random.default_rng([cfg.seed, 2]), **options)
    options.pop("operator", None)
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
        evaluators[r.get("stage", -1)].replay(space.from_key(r["pattern"]))
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
    pool = None
    try:
        if cfg.distributed and not strategy.done:
            from .distributed import WorkerPool

            for ev in evaluators:  # the driver only replays from now on
                ev.release()
            if progress:
                print(f"starting {cfg.workers} Ray worker(s)", file=sys.stderr, flush=True)
            pool = WorkerPool(cfg, run.path, problem.setup_files, eval_delay_s=_EVAL_DELAY, log=run.append_workers)
        while not strategy.done and not stopped:
            cands = strategy.ask()
            fits = []
            for c, stage, genome, loss, tokens, tl in _scored(cands, evaluators, reuse, budget,
                                                              lambda: counters["token_layers"], pool):
                counters["evaluations"] += 1
                counters["token_layers"] += tl
                row = {"eval": counters["evaluations"], "generation": counters["generation"], "pattern": c.key,
                       **problem.row(genome), "loss": loss, "tokens": tokens, "eval_token_layers": tl,
                       "token_layers": counters["token_layers"]}
                if stage is not None:
                    row["stage"] = stage
                run.append_history(row)
                fits.append(loss)
                if stage is None or stage == len(evaluators) - 1:
                    best_seen = min(best_seen, loss)
                display.update(counters["generation"], best_seen, counters["evaluations"], counters["token_layers"])
            stopped = len(fits) < len(cands)  # only the budget ends a batch early
            if fits:
                strategy.tell(cands[: len(fits)], fits)
            counters["generation"] = strategy.generation
            save_state()
            run.append_wall({"generation": counters["generation"], "evaluations": counters["evaluations"],
                             "elapsed_s": round(time.time() - t0, 3)})
    finally:
        display.close()
        if pool is not None:
            pool.close()
    if strategy.best is None:
        raise UserError(f"--budget-token-layers {budget} ran out before any full-fidelity evaluation; raise it")
    best_g, best_loss = strategy.best
    result = {
        "method": cfg.method, "model": cfg.model, "space": cfg.space, **problem.result(best_g),
        "calib_loss": best_loss, "calib_ppl": math.exp(best_loss),
        "evaluations": counters["evaluations"], "token_layers": counters["token_layers"],
        "wall_s": round(prev_wall + time.time() - t0, 2), "seed": cfg.seed, "stopped_early": stopped,
        "calib": {"source": cfg.calib if not cfg.calib_from else f"run:{cfg.calib_from}", "sampling": cfg.sampling,
                  "samples": calib.n_samples, "seqlen": calib.seqlen},
    }
    if hasattr(strategy, "llm_stats"):
        result["llm"] = dict(strategy.llm_stats)
    run.write_result(result)
    if progress:
        print(f"best: {problem.summary(best_g)}; calib loss {best_loss:.4f} (ppl {result['calib_ppl']:.2f}); "
              f"{result['evaluations']} evaluations, {result['token_layers']:.3g} token-layers", file=sys.stderr)
    return result


def _scored(cands, evaluators, reuse: dict, budget: int | None, spent, pool=None):
    """``(candidate, stage, genome, loss, tokens, token_layers)`` of ``cands``, in candidate order.

    Stops before the first candidate at which the token-layers spent so far
    reach ``budget`` (``spent()``: the caller's running total, updated between
    items). Rows of ``reuse`` (logged after the last saved state) are replayed,
    not evaluated. With a :class:`~evoprune.distributed.WorkerPool` the
    candidates are first replayed in order through the driver's evaluators (the
    LRU bookkeeping gives the sequential run's token-layers, hence the same
    budget stop, and nothing past it is dispatched), then evaluated in parallel
    and yielded in order: the caller sees exactly what the sequential loop sees.
    """
    plan, total = [], spent()
    for c in cands:
        if budget is not None and (spent() if pool is None else total) >= budget:
            break
        stage = getattr(c, "stage", None)
        genome = getattr(c, "pattern", c)
        ev = evaluators[-1 if stage is None else stage]
        r = reuse.pop((c.key, stage), None)
        if r is not None:
            ev.replay(genome)
            item = (c, stage, genome, r["loss"], r["tokens"], r["eval_token_layers"])
        elif pool is not None:
            item = (c, stage, genome, None, None, ev.replay(genome))  # evaluated below, by the workers
        else:
            if _EVAL_DELAY:
                time.sleep(_EVAL_DELAY)
            e = ev.evaluate(genome)
            item = (c, stage, genome, e.loss, e.tokens, e.token_layers)
        if pool is None:
            yield item
        else:
            plan.append(item)
            total += item[5]
    if not plan:
        return
    results = pool.imap([(genome, stage) for _, stage, genome, loss, _, _ in plan if loss is None])
    for c, stage, genome, loss, tokens, tl in plan:
        if loss is None:
            loss, tokens, _ = next(results)
        yield c, stage, genome, loss, tokens, tl


def _make_operator(cfg: SearchConfig, lm, run: RunDir, problem):
    """The LLM operator of a self-pruner run (None when every LLM step is ablated)."""
    if not (cfg.llm_init or cfg.llm_mutation or cfg.llm_crossover):
        return None
    from .search.llm_operator import LLMOperator, OperatorConfig

    oc = OperatorConfig(url=cfg.operator_url, model=cfg.operator_model, timeout_s=cfg.operator_timeout_s,
                        max_retries=cfg.operator_retries, call_budget=cfg.operator_call_budget,
                        temperature=cfg.operator_temperature, max_tokens=cfg.operator_max_tokens)
    return LLMOperator(oc, n_layers=problem.n, beta=problem.space.beta, model_name=_model_name(cfg, lm),
                       log_path=Path(run.path) / "llm_calls.jsonl")


def _model_name(cfg: SearchConfig, lm) -> str:
    name = getattr(lm, "name", None) or cfg.model
    return {"smollm2-135m": "SmolLM2-135M-Instruct"}.get(name, name)
