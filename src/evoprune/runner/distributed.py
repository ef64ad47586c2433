"""Distributed candidate evaluation on Ray: one model per worker, results in a fixed order.

Owns :class:`EvalWorker` (a Ray actor: the model loaded once, the run's
problem and evaluators built as the driver's) and :class:`WorkerPool` (the
driver's side: start or join a cluster, keep ``workers`` actors alive, evaluate
a batch of candidates and hand the results back in input order).
:func:`evoprune.runner.loop.run_search` uses it when ``workers > 1`` or ``ray_address``
is set; the ask -> evaluate -> tell loop and the run directory stay the same.

Determinism: the driver consumes results in candidate order, so the strategy,
``history.jsonl`` and ``result.json`` are those of the sequential run (``wall_s``
aside). Token-layers are the sequential run's too: the driver applies every
candidate to its own evaluators' shared-prefix LRU bookkeeping in candidate
order (:meth:`~evoprune.fitness.evaluator.NLLEvaluator.replay`, no tensors) and
logs the token-layers the sequential run would have spent; the
``--budget-token-layers`` check therefore stops at the same candidate, and the
driver never dispatches a candidate past that point (no wasted evaluations).
The work the workers actually did differs (each has its own dense prefix cache
and LRU, and a replaced worker rebuilds them); it is logged in
``RUN/workers.jsonl``, with worker starts (pid, node) and losses. Losses are
bitwise equal on CPU as long as the workers' kernels sum in the same order as
the single process's (torch threads are split among workers; all CPU kernels
tested give the same bits for 1 and 2 threads, but that is not a torch
guarantee). On GPU, equal up to the kernels' own nondeterminism.

Fault tolerance: every worker holds one candidate at a time. A worker lost
mid-evaluation (process killed, node gone, out of memory) is killed for good,
replaced by a fresh actor (which loads the model again) and its candidate is
evaluated again; the result is unchanged. After more than ``workers + 3``
losses in a row without a single result the pool gives up (``RuntimeError``).
An exception raised by the evaluation itself (a bug, a bad pattern) is
re-raised on the driver. A killed driver is an ordinary killed run:
``evoprune resume RUN`` (any ``--workers``) continues it.

Resources: a local cluster gets ``num_cpus`` = the CPUs this process may use;
each actor asks for ``cpus // workers`` CPUs (on a cluster: the largest CPU
count per actor that still places ``workers`` actors on the nodes' CPUs; more
workers than CPUs share them fractionally) and sets ``torch.set_num_threads``
to it (at most the driver's ``OMP_NUM_THREADS`` when set), so actors don't
oversubscribe cores. With ``--device cuda`` each actor
asks for ``gpus_per_worker`` GPUs (default 1; a local cluster refuses more
than it has, an existing cluster may make the actors wait for room); Ray sets
``CUDA_VISIBLE_DEVICES`` and the actor loads the model on ``cuda``.

Workers need ``evoprune`` and the model spec resolvable on their node (the
bundled alias, a path on a shared filesystem, or a hub id); the run directory
need not be shared: the driver ships ``calib.pt`` and the problem's
``setup_files`` (``importance.pt`` for width runs) to every actor, which
copies them into a private scratch directory for ``problem.prepare`` and
deletes it once its evaluators are built. Workers never write the run directory (they are not given
its path); the driver, which holds its writer lock, writes every file there
(``tests/test_run_safety.py`` checks a worker's writes).

Large models: an actor can hold a model split over several GPUs with
``--gpus-per-worker G`` (Ray gives it G GPUs and sets ``CUDA_VISIBLE_DEVICES``):
for ``G > 1`` (or with an explicit ``--device-map``) the actor, and the driver,
load the model with ``from_pretrained(device_map="auto")``, so accelerate spreads
the blocks over the visible GPUs and moves activations between them. The
evaluators send token ids to the first parameter's device and feed cached
hidden states back on the device they were captured on, which accelerate's
dispatch hooks then move as usual. Tested on CPU only (``device_map="auto"``
with no GPU keeps every block on the CPU and gives the same losses); the
multi-GPU split has not run: no multi-GPU machine was available.

The driver still loads the model once (calibration, one-shot scores, width
importance, the dense forward whose token-layers the run counts); after setup
it frees its evaluators' hidden-state caches.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import UserError

__all__ = ["EvalWorker", "WorkerPool", "actor_resources"]

# after this many lost workers in a row (plus the worker count) without a single result, give up
_EXTRA_FAILURES = 3


class EvalWorker:
    """One Ray actor evaluating candidates of one run (plain class; :class:`WorkerPool` wraps it with ``ray.remote``).

    ``cfg``: the run's :meth:`SearchConfig.to_dict`; ``files``: name -> bytes of
    ``calib.pt`` and the problem's ``setup_files``; ``threads``: torch threads;
    ``device``: where the model goes; ``eval_delay_s``: testing knob, seconds
    slept before every evaluation.
    """

    def __init__(self, cfg: dict, files: dict, *, threads: int, device: str, eval_delay_s: float = 0.0) -> None:
        import torch

        from ..data.calibration import CalibSet
        from ..models.loading import load_pretrained
        from .config import SearchConfig
        from .problems import PROBLEMS
        from .rundir import RunDir

        torch.set_num_threads(max(1, int(threads)))
        self.threads, self.device, self.delay = int(threads), device, float(eval_delay_s)
        conf = SearchConfig.from_dict(cfg)
        lm = load_pretrained(conf.model.model, dtype=getattr(torch, conf.model.dtype), device=device, progress=False,
                             device_map=conf.load_device_map)
        self.problem = PROBLEMS[conf.space](conf, lm)
        scratch = Path(tempfile.mkdtemp(prefix="evoprune-worker-"))
        try:
            for name, data in files.items():
                (scratch / name).write_bytes(data)
            calib = CalibSet.load(scratch / "calib.pt")
            self.problem.prepare(calib, RunDir(scratch), fresh=False, needs=conf.requirements)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        for ev in self.problem.evaluators:  # dense caches now, not inside the first timed evaluation
            ev.prepare()

    def info(self) -> dict:
        """``pid``, ``node`` (IP), torch ``threads``, ``device`` and the setup token-layers this actor spent."""
        import ray

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "threads": self.threads,
                "device": self.device,
                "setup_token_layers": sum(ev.setup_token_layers for ev in self.problem.evaluators)}

    def evaluate(self, genome: Any, stage: int | None, race=None, done: tuple = ()) -> tuple:
        """``(loss, tokens, token_layers actually run, batch losses, complete)`` of ``genome`` on stage
        ``stage`` (``None``: the only one), raced by ``race`` (a :class:`~evoprune.fitness.racing.Race`),
        continuing from the batch totals ``done`` of a lower stage (``()``: from the start)."""
        if self.delay:
            time.sleep(self.delay)
        ev = self.problem.evaluators[-1 if stage is None else stage]
        ev = ev.evaluate(genome, race=race, done=done)
        return ev.loss, ev.tokens, ev.token_layers, ev.batch_losses, ev.complete


def actor_resources(node_cpus: Sequence[float], workers: int) -> float:
    """CPUs per actor: the largest whole ``c`` such that ``workers`` actors of ``c`` CPUs fit on the nodes;
    when not even 1 CPU each fits, an even fraction of all CPUs (actors then share cores, one thread each)."""
    best = 0
    for c in range(1, int(max(node_cpus, default=0)) + 1):
        if sum(int(n // c) for n in node_cpus) >= workers:
            best = c
    return best or max(0.01, int(100 * sum(node_cpus) / workers) / 100)


def _lost_errors() -> tuple:
    """Ray exceptions that mean "the worker is gone" (retry elsewhere), as opposed to an evaluation error."""
    from ray import exceptions as x

    return tuple(getattr(x, n) for n in ("RayActorError", "WorkerCrashedError", "OutOfMemoryError", "NodeDiedError",
                                          "ObjectLostError") if hasattr(x, n))


class WorkerPool:
    """``cfg.execution.workers`` Ray actors evaluating one run's candidates (see the module docstring).

    Starts a local Ray cluster (or connects to ``cfg.execution.ray_address``) unless Ray is
    already initialized in this process; :meth:`close` kills the actors and shuts
    down what this pool started. Construction returns once every actor has
    loaded its model (an actor failing there raises :class:`UserError`).
    ``log(row)`` receives the events for ``RUN/workers.jsonl``.
    """

    def __init__(self, cfg, run_path: str | Path, setup_files: Sequence[str] = (), *, eval_delay_s: float = 0.0,
                 log: Callable[[dict], None] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise UserError("--workers / --ray-address need Ray: pip install 'evoprune[ray]'") from None
        self._ray, self.cfg, self.log = ray, cfg, log or (lambda row: None)
        self.n = int(cfg.execution.workers)
        self._started, self._tmp = False, None
        self.evaluations = self.token_layers_run = self.setup_token_layers = self.lost = 0
        self._in_a_row = 0
        self.actors: list = []
        self._info: dict = {}  # info ref of a replacement actor -> (slot, actor): its start event, still to log
        try:
            self._start_cluster()
            nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
            cpus = actor_resources(nodes, self.n)
            cuda = str(cfg.model.device).startswith("cuda")
            gpus = float(cfg.execution.gpus_per_worker or 1) if cuda else 0.0
            have = ray.cluster_resources().get("GPU", 0)
            if self._tmp is not None and gpus * self.n > have:  # our local cluster: would wait forever
                raise UserError(f"--workers {self.n} x {gpus:g} GPUs need {gpus * self.n:g} GPUs; this machine has "
                                f"{have:g} (use --gpus-per-worker < 1 to share, or fewer --workers)")
            run_path = Path(run_path)
            files = {name: (run_path / name).read_bytes() for name in ("calib.pt", *setup_files)}
            self._cls = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(EvalWorker)
            self._args = (cfg.to_dict(), ray.put(files))
            # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs: its "cuda" is one of them
            threads = max(1, int(cpus))
            omp = os.environ.get("OMP_NUM_THREADS", "")
            if omp.isdigit() and int(omp) > 0:  # the driver's cap holds for its workers too
                threads = min(threads, int(omp))
            self._kw = {"threads": threads, "device": "cuda" if cuda else str(cfg.model.device),
                        "eval_delay_s": float(eval_delay_s)}
            self.actors = [self._cls.remote(*self._args, **self._kw) for _ in range(self.n)]
            try:
                infos = ray.get([a.info.remote() for a in self.actors])
            except _lost_errors() as e:
                raise UserError(f"a Ray worker failed to start: {_first_line(e)}") from None
            for slot, info in enumerate(infos):
                self._started_event(slot, info)
        except BaseException:
            self.close()
            raise

    # -- cluster --------------------------------------------------------------------
    def _start_cluster(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return
        kw = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        address = self.cfg.execution.ray_address
        if address:
            try:
                ray.init(address=address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"--ray-address {address}: {_first_line(e)}") from None
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            # short: Ray's unix socket paths live under it (limit ~107 characters)
            self._tmp = tempfile.mkdtemp(prefix="evoprune-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
            ray.init(address="local", num_cpus=cpus, _temp_dir=self._tmp, **kw)  # never $RAY_ADDRESS
        self._started = True

    def close(self) -> None:
        """Kill the actors; shut Ray down (and remove its temp directory) if this pool started it."""
        ray = self._ray
        if self.actors:
            self.log({"event": "close", "evaluations": self.evaluations, "token_layers_run": self.token_layers_run,
                      "setup_token_layers": self.setup_token_layers, "lost": self.lost})
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._started:
            ray.shutdown()
            self._started = False
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- events ---------------------------------------------------------------------
    def _started_event(self, slot: int, info: dict) -> None:
        self.setup_token_layers += int(info.pop("setup_token_layers", 0))
        self.log({"event": "start", "worker": slot, **info, "time": round(time.time(), 3)})

    def _replace(self, slot: int, err: BaseException) -> None:
        """Kill the actor in ``slot`` for good and start a fresh one there."""
        self.lost += 1
        self._in_a_row += 1
        self.log({"event": "lost", "worker": slot, "error": _first_line(err), "time": round(time.time(), 3)})
        if self._in_a_row > self.n + _EXTRA_FAILURES:
            raise RuntimeError(f"{self._in_a_row} Ray workers lost in a row; last: {_first_line(err)}")
        try:
            self._ray.kill(self.actors[slot], no_restart=True)
        except Exception:
            pass
        self.actors[slot] = self._cls.remote(*self._args, **self._kw)
        self._info[self.actors[slot].info.remote()] = (slot, self.actors[slot])

    # -- evaluation -----------------------------------------------------------------
    def imap(self, tasks: Sequence[tuple]) -> Iterator[tuple]:
        """Evaluate ``(genome, stage, race, done)`` tasks; yield ``(loss, tokens, token_layers run, batch losses,
        complete)`` in input order.

        Dispatches as workers free up (one task per worker at a time) and yields
        each result as soon as all earlier ones are in. A lost worker's task is
        resubmitted to its replacement; an evaluation error is re-raised here.
        """
        ray, lost = self._ray, _lost_errors()
        todo, idle = deque(range(len(tasks))), deque(range(self.n))
        running: dict = {}  # eval ref -> (slot, task index, actor)
        done: dict[int, tuple] = {}
        nxt = 0
        while nxt < len(tasks):
            while idle and todo:
                slot, i = idle.popleft(), todo.popleft()
                running[self.actors[slot].evaluate.remote(*tasks[i])] = (slot, i, self.actors[slot])
            if nxt in done:
                yield done.pop(nxt)
                nxt += 1
                continue
            ready, _ = ray.wait([*running, *self._info], num_returns=1)
            for ref in ready:
                if ref in self._info:
                    slot, actor = self._info.pop(ref)
                    try:
                        self._started_event(slot, ray.get(ref))
                    except lost as e:
                        if self.actors[slot] is actor:  # its queued task reports the loss too: replace once
                            self._replace(slot, e)
                    continue
                slot, i, actor = running.pop(ref)
                try:
                    loss, tokens, tl, parts, complete = ray.get(ref)
                except lost as e:
                    todo.appendleft(i)
                    if self.actors[slot] is actor:
                        self._replace(slot, e)
                    idle.append(slot)
                    continue
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    raise (cause if isinstance(cause, Exception) else e) from None
                self._in_a_row = 0
                self.evaluations += 1
                self.token_layers_run += int(tl)
                done[i] = (float(loss), int(tokens), int(tl), tuple(parts), bool(complete))
                idle.append(slot)


def _first_line(e: BaseException) -> str:
    """One line about ``e``: for an actor whose constructor raised, that exception's line (the message's last)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if getattr(e, "_actor_init_failed", False):
        return lines[-1][:300]
    return f"{type(e).__name__}: {lines[0]}"[:300]
