"""The one ask -> evaluate -> tell loop, with run directories and resume.

Owns :func:`run_search`. The loop is the same for every space and method: what a space means for the
model lives in its problem (:mod:`evoprune.runner.problems`), what a method needs and adds is declared
by its strategy (:class:`~evoprune.search.base.Strategy`: ``needs``, ``check``, ``result_extras``); the
loop branches on neither's name. The strategy asks for candidates, the problem's evaluators score each
on the calibration set, every evaluation is appended to ``history.jsonl``, and after every ``tell``
the strategy state and counters are written atomically to ``RUN/state``.

Resume contract: for the same configuration, a run killed at any point and continued with
:func:`run_search` (``resume=True``) ends with the same result and ``history.jsonl`` as an
uninterrupted run. Evaluations logged after the last saved state are reused, not recomputed, when the
resumed strategy asks for the same candidates (it always does: its random generator state is part of
the saved state).

``token_layers`` counts logical search work: tokens x decoder blocks actually run, including building
caches and one-shot scores once per run (not again on resume, so the count is the same as an
uninterrupted run's). With ``cache_mb`` (shared-prefix LRU), a resumed run replays the logged
evaluations through the LRU's bookkeeping, so later evaluations hit the same entries and report the
same token-layers (ghost entries are recomputed on a hit, uncounted).

Multi-fidelity (a staged method with ``tokens_per_stage``): the strategy asks for
:class:`~evoprune.search.staged.Request` objects (genome, stage); stage ``s`` scores on its data slice
(:func:`~evoprune.runner.problems.common.stage_slices`), each stage with its own evaluator. History rows
of such runs carry a ``stage`` field; ``calib_loss`` is the best candidate's loss at the last (full)
stage.

``budget_token_layers``: before each evaluation, the loop stops once the spent ``token_layers`` reach
the budget; the result is the best full-fidelity candidate so far (``stopped_early: true``). Without
one, the method's :meth:`~evoprune.search.base.Strategy.default_budget` (derived from the space and the
calibration size; ``evo``'s is documented in :mod:`evoprune.search.layers.evo`) applies, and only once
a full-fidelity candidate exists. ``result.json`` records the budget that applied.

Workers (``workers > 1`` or ``ray_address``): the candidates of each ``ask()`` batch are evaluated in
parallel by Ray actors (:mod:`evoprune.runner.distributed`) and consumed in candidate order; the driver
replays each candidate through its own evaluators' bookkeeping first, so token-layers, the budget's
stopping point, ``history.jsonl`` and ``result.json`` are those of the sequential run.

One writer (:mod:`evoprune.runner.opening`): the run directory is locked for the whole call, so a
second ``search`` or ``resume`` of the same directory is refused with the holder's pid. A stop from
outside (SIGINT, SIGTERM: :class:`~evoprune.errors.Interrupted`) or a failed write (a full disk:
:class:`~evoprune.errors.WriteFailed`) leaves the directory resumable and carries the command that
continues it (``evoprune resume RUN``); resuming ends as the undisturbed run would have.

``--report-to`` (:mod:`evoprune.runner.reporting`): after every state save, the generation counter, the
best full-fidelity loss so far, the evaluations and the token-layers are streamed to TensorBoard / wandb;
the run directory stays the source of truth.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..environment import stack
from ..errors import UserError
from .calibration import build_calib
from .coarse import block_start
from .config import SearchConfig
from .display import Display
from .reporting import generation_metrics, reporters
from .opening import open_run, opened, preflight
from .problems.contract import Evaluator, Problem
from .rundir import RunDir

__all__ = ["run_search"]

# testing knob: seconds to sleep before each evaluation, so kill-and-resume tests can hit mid-run points
_EVAL_DELAY = float(os.environ.get("EVOPRUNE_EVAL_DELAY_S", "0") or 0)


def _make_strategy(cfg: SearchConfig, problem, inputs: dict, operator):
    from ..search import make_strategy

    kw = {"operator": operator} if operator is not None else {}
    return make_strategy(cfg.method, problem.space, np.random.default_rng([cfg.seed, 2]),
                         **cfg.strategy_options(inputs), **kw)


def _setup(cfg: SearchConfig, run: RunDir, resume: bool, progress: bool, operator, lm=None):
    """Model (``lm``: already loaded), problem, calibration, counters and the strategy (restored from the saved
    state on resume)."""
    import torch

    from ..models.loading import load_pretrained
    from .problems import PROBLEMS

    if lm is None:
        lm = load_pretrained(cfg.model.model, dtype=getattr(torch, cfg.model.dtype), device=cfg.model.device,
                             progress=progress, device_map=cfg.load_device_map)
    problem = PROBLEMS[cfg.space](cfg, lm)
    cfg.strategy_cls.check(problem.space, cfg.method_options)  # refuse before any expensive setup
    if not resume:
        run.write_config(cfg.to_dict())
    state = run.read_state() if resume else None
    calib = build_calib(cfg, lm, run, progress)
    needs = cfg.requirements
    counters = {"evaluations": 0, "token_layers": 0, "generation": 0}
    searched_first = state is None and "start" in needs  # a finer space starts from the block search's answer
    start = block_start(cfg, lm, run, progress, run_search) if searched_first else None
    spent, inputs = problem.prepare(calib, run, fresh=state is None, needs=needs)
    if searched_first:
        inputs["start"] = start
        spent += start["token_layers"] if start else 0
    if state is not None:
        counters.update(state["counters"])
        inputs = dict(state.get("extra_options", {}))  # the one-shot inputs as the run first computed them
    else:
        counters["token_layers"] += spent
    if "operator" in needs and operator is None:
        operator = _make_operator(cfg, lm, run, problem)
    strategy = _make_strategy(cfg, problem, inputs, operator)
    if state is not None:
        try:
            strategy.load_state_dict(state["strategy"])
        except (KeyError, ValueError) as e:
            raise UserError(f"{run.path}: cannot resume ({e})") from None
    return lm, problem, calib, counters, inputs, strategy, state


def run_search(cfg: SearchConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
               operator=None, lm=None) -> dict:
    """Run (or continue) the search ``cfg`` in run directory ``out``; returns ``result.json``'s content.

    ``operator``: an LLM operator for methods that need one (default: an
    :class:`~evoprune.search.llm.operator.LLMOperator` built from the ``operator`` section, logging every
    call to ``RUN/llm_calls.jsonl``). ``lm``: the model of ``cfg.model``, already loaded (a run inside a run).
    """
    with opened(out):
        return _run_search(cfg, out, resume, progress, operator, lm)


def _run_search(cfg: SearchConfig, out, resume: bool, progress: bool, operator, lm=None) -> dict:
    t0 = time.time()
    run, resume, done = open_run(cfg, out, resume)
    if done is not None:
        return done
    preflight(cfg, run)
    reporter = reporters(cfg.execution.report_to, run.path, cfg.to_dict())  # imports now; opened by _loop
    lm, problem, calib, counters, inputs, strategy, state = _setup(cfg, run, resume, progress, operator, lm)
    run.append_env({"event": "resume" if resume else "start", "time": round(time.time(), 3), **stack()})
    history = run.read_history()
    committed, pending = history[: counters["evaluations"]], history[counters["evaluations"]:]
    if len(committed) < counters["evaluations"]:
        raise UserError(f"{run.path}: corrupted run (history shorter than the saved state)")
    run.rewrite_history(committed)
    parts, links = {}, _links(problem.evaluators)
    for r in committed:  # the LRUs' bookkeeping and race references, as the uninterrupted run left them
        stage = r.get("stage")
        _reused(Job(None, stage, problem.space.from_key(r["pattern"]), problem.evaluators[-1 if stage is None else
                    stage], r, None, _continued(r["pattern"], stage, links, parts)))
        if not r.get("raced") and "batch_losses" in r:
            parts[(r["pattern"], stage)] = tuple(r["batch_losses"])
    prev_wall = (state or {}).get("wall_s", 0.0)

    def save_state() -> None:
        run.write_state({"counters": counters, "strategy": strategy.state_dict(), "extra_options": inputs,
                         "wall_s": round(prev_wall + time.time() - t0, 3)})

    if state is None:
        save_state()
    stopped = _loop(cfg, run, problem, strategy, counters, {(r["pattern"], r.get("stage")): r for r in pending},
                    save_state, progress, t0, parts, reporter)
    if strategy.best is None:
        raise UserError(f"--budget-token-layers {cfg.budget.budget_token_layers} ran out before any full-fidelity "
                        f"evaluation; raise it")
    return _finish(cfg, run, problem, strategy, counters, calib, stopped, prev_wall + time.time() - t0, progress)


def _loop(cfg: SearchConfig, run: RunDir, problem: Problem, strategy, counters: dict, reuse: dict, save_state,
          progress: bool, t0: float, parts: dict, reporter) -> bool:
    """Ask, evaluate, log, tell until the strategy is done or the budget stops it; returns whether it stopped.
    ``parts``: batch losses of the complete evaluations so far (race references), extended here."""
    evaluators, given = problem.evaluators, cfg.budget.budget_token_layers
    budget = given if given is not None else strategy.default_budget(tuple(e.calib.n_tokens for e in evaluators))
    counters["budget_token_layers"] = budget
    races = cfg.selection.races
    links = _links(evaluators)

    def exhausted(extra: int = 0) -> bool:
        # a method's default budget never ends a run before its first full-fidelity candidate
        return budget is not None and counters["token_layers"] + extra >= budget and (
            given is not None or strategy.best is not None)
    display = Display(progress, cfg.method)
    best_seen = strategy.best[1] if strategy.best else math.inf
    stopped, pool = False, None
    try:
        reporter.open()
        if cfg.distributed and not strategy.done:
            pool = _start_pool(cfg, run, problem, progress)
        while not strategy.done and not stopped:
            cands = strategy.ask()
            fits = []
            for s in _scored(cands, evaluators, reuse, exhausted, parts, strategy.race_of, pool, links):
                counters["evaluations"] += 1
                counters["token_layers"] += s.token_layers
                row = {"eval": counters["evaluations"], "generation": counters["generation"],
                       "pattern": s.candidate.key, **problem.row(s.genome), "loss": s.loss, "tokens": s.tokens,
                       "eval_token_layers": s.token_layers, "token_layers": counters["token_layers"]}
                if s.stage is not None:
                    row["stage"] = s.stage
                if (races and len(s.batch_losses) > 1) or links or not s.complete:  # race refs, continuations
                    row["batch_losses"] = list(s.batch_losses)
                if not s.complete:
                    row["raced"] = True
                else:
                    parts[(s.candidate.key, s.stage)] = tuple(s.batch_losses)
                origin = strategy.origin_of(s.genome)
                if origin is not None:
                    row["origin"] = origin
                run.append_history(row)
                fits.append(s.loss if s.complete else math.inf)
                if s.complete and (s.stage is None or s.stage == len(evaluators) - 1):
                    best_seen = min(best_seen, s.loss)
                display.update(counters["generation"], best_seen, counters["evaluations"], counters["token_layers"])
            stopped = len(fits) < len(cands)  # only the budget ends a batch early
            if fits:
                strategy.tell(cands[: len(fits)], fits)
            counters["generation"] = strategy.generation
            save_state()
            reporter.log(counters["generation"], generation_metrics(counters, strategy.best))
            run.append_wall({"generation": counters["generation"], "evaluations": counters["evaluations"],
                             "elapsed_s": round(time.time() - t0, 3)})
    finally:
        display.close()
        if pool is not None:
            pool.close()
        reporter.close()
    return stopped


def _start_pool(cfg: SearchConfig, run: RunDir, problem, progress: bool):
    from .distributed import WorkerPool

    for ev in problem.evaluators:  # the driver only replays from now on
        ev.release()
    if progress:
        print(f"starting {cfg.execution.workers} Ray worker(s)", file=sys.stderr, flush=True)
    return WorkerPool(cfg, run.path, problem.setup_files, eval_delay_s=_EVAL_DELAY, log=run.append_workers)


def _finish(cfg: SearchConfig, run: RunDir, problem, strategy, counters: dict, calib, stopped: bool, wall: float,
            progress: bool) -> dict:
    best_g, best_loss = strategy.best
    c = cfg.calibration
    result = {
        "method": cfg.method, "model": cfg.model.model, "space": cfg.space, **problem.result(best_g),
        "calib_loss": best_loss, "calib_ppl": math.exp(best_loss),
        "evaluations": counters["evaluations"], "token_layers": counters["token_layers"],
        "wall_s": round(wall, 2), "seed": cfg.seed, "stopped_early": stopped,
        **({} if counters.get("budget_token_layers") is None
           else {"budget_token_layers": counters["budget_token_layers"]}),
        "calib": {"source": c.calib if not c.calib_from else f"run:{c.calib_from}", "sampling": c.sampling,
                  "samples": calib.n_samples, "seqlen": calib.seqlen},
        **strategy.result_extras(),
    }
    run.write_result(result)
    if progress:
        print(f"best: {problem.summary(best_g)}; calib loss {best_loss:.4f} (ppl {result['calib_ppl']:.2f}); "
              f"{result['evaluations']} evaluations, {result['token_layers']:.3g} token-layers", file=sys.stderr)
    return result


def _race(spec: dict | None, stage, ev, parts: dict):
    """The :class:`~evoprune.fitness.racing.Race` of a candidate with race ``spec`` (``None``: not raced)."""
    from ..fitness.racing import Race

    if not spec or not spec["refs"]:
        return None
    ref = tuple(parts[(k, stage)] for k in spec["refs"] if (k, stage) in parts)
    race = Race(ref, ev.batch_tokens, rank=spec["rank"], margin=spec["margin"]) if ref else None
    return race if race is not None and race.active else None


def _links(evaluators) -> dict[int, list[tuple[int, int]]]:
    """Stage ``t`` -> ``[(s, k), ...]``: lower stages ``s`` (latest first) whose data are the first ``k`` batches
    of stage ``t``'s (:meth:`~evoprune.fitness.whole_model.WholeModelEvaluator.extends`); only stages with one."""
    out = {}
    for t, ev in enumerate(evaluators):
        ext = getattr(ev, "extends", None)
        found = [(s, k) for s in range(t - 1, -1, -1) if ext is not None and (k := ext(evaluators[s])) is not None]
        if found:
            out[t] = found
    return out


def _continued(key: str, stage, links: dict, parts: dict) -> tuple:
    """Batch totals a candidate at ``stage`` continues from: its complete evaluation at the latest linked lower
    stage (see :func:`_links`); ``()`` when there is none."""
    for s, k in links.get(stage, ()):
        got = parts.get((key, s))
        if got is not None and len(got) == k:
            return got
    return ()


class Job(NamedTuple):
    """A candidate to score, planned alike for the sequential loop and a wave of workers: ``stage`` (``None``:
    one), the stage's ``evaluator``, the row it replays (``reused``), its ``race``, the losses it continues."""

    candidate: Any
    stage: int | None
    genome: Any
    evaluator: Evaluator
    reused: dict | None
    race: Any
    done: tuple


class Scored(NamedTuple):
    """A scored candidate, in ask order: loss, tokens and token-layers spent, per-batch losses, and whether
    every batch was scored (``complete``; a raced candidate stops early)."""

    candidate: Any
    stage: int | None
    genome: Any
    loss: float
    tokens: int
    token_layers: int
    batch_losses: tuple
    complete: bool


def _reused(job: Job) -> Scored:
    r = job.reused
    raced = bool(r.get("raced"))
    job.evaluator.replay(job.genome, len(r["batch_losses"]) if raced else None, len(job.done))
    return Scored(job.candidate, job.stage, job.genome, r["loss"], r["tokens"], r["eval_token_layers"],
                  tuple(r.get("batch_losses", ())), not raced)


def _scored(cands, evaluators: list[Evaluator], reuse: dict, exhausted, parts: dict, race_of, pool=None, links=None):
    """The :class:`Scored` of ``cands``, in order.

    Stops before the first candidate at which ``exhausted()`` (the budget is spent; the caller updates
    its running total between items; ``exhausted(extra)``: would it be after ``extra`` more). Rows of
    ``reuse`` (logged after the last saved state) are replayed, not evaluated. A request with race
    references is raced against their batch losses in ``parts`` (``(key, stage)`` -> per-batch loss
    totals of complete evaluations). With a :class:`~evoprune.runner.distributed.WorkerPool` the
    candidates are evaluated in parallel in waves: a wave holds the next :class:`Job` s that are sure to
    come before the budget's stop (counting each at its evaluator's ``dense_token_layers``, an upper
    bound; a raced one's cost is only known once it ran); its results are replayed in order through
    the driver's evaluators (the LRU bookkeeping gives the sequential run's token-layers, hence the
    same budget stop), so the caller sees exactly what the sequential loop sees and nothing past the
    stop is dispatched. A candidate whose lower stage scored the first batches of its stage's data
    continues from them (``links``, :func:`_continued`).
    """
    plan: list[Job] = []
    for c in cands:
        if pool is None and exhausted():
            return
        stage = getattr(c, "stage", None)
        genome = getattr(c, "pattern", c)
        ev = evaluators[-1 if stage is None else stage]
        r = reuse.pop((c.key, stage), None)
        done = _continued(c.key, stage, links or {}, parts)
        race = None if r is not None else _race(race_of(c), stage, ev, parts)
        job = Job(c, stage, genome, ev, r, race, done)
        if pool is not None:
            plan.append(job)
        elif r is not None:
            yield _reused(job)
        else:
            if _EVAL_DELAY:
                time.sleep(_EVAL_DELAY)
            e = ev.evaluate(genome, race=race, done=done)
            yield Scored(c, stage, genome, e.loss, e.tokens, e.token_layers, tuple(e.batch_losses), e.complete)
    i = 0
    while i < len(plan):
        wave, ahead = [], 0
        while i < len(plan) and not exhausted(ahead):
            job = plan[i]
            wave.append(job)
            ahead += job.reused["eval_token_layers"] if job.reused is not None else job.evaluator.dense_token_layers
            i += 1
        if not wave:
            return
        results = pool.imap([(j.genome, j.stage, j.race, j.done) for j in wave if j.reused is None])
        for job in wave:
            if job.reused is not None:
                yield _reused(job)
                continue
            loss, tokens, _, batch_losses, complete = next(results)
            tl = job.evaluator.replay(job.genome, None if complete else len(batch_losses), len(job.done))
            yield Scored(job.candidate, job.stage, job.genome, loss, tokens, tl, tuple(batch_losses), complete)


def _make_operator(cfg: SearchConfig, lm, run: RunDir, problem):
    """The LLM operator of a run whose strategy needs one, logging every call to ``RUN/llm_calls.jsonl``."""
    from ..models.loading import display_name
    from ..search.llm.operator import LLMOperator

    name = display_name(getattr(lm, "name", None) or cfg.model.model)
    return LLMOperator(cfg.operator, n_layers=problem.n, beta=problem.space.beta, model_name=name,
                       log_path=Path(run.path) / "llm_calls.jsonl", seed=cfg.seed)
