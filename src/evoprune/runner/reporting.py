"""Live metrics of a search, streamed beside its run directory: ``--report-to tensorboard|wandb|none``.

Owns :class:`Reporter` (``open()``, ``log(step, metrics)``, ``close()``; the base class reports nothing:
``--report-to none``), :class:`TensorBoardReporter`, :class:`WandbReporter`, :func:`reporters` (the
``--report-to`` names, Hugging Face Trainer's ``report_to`` convention, -> one reporter) and
:func:`generation_metrics` (what the loop streams). The run directory stays the source of truth: a
reporter mirrors what ``RUN/state`` already holds, and nothing a run computes depends on it.

What is streamed, after each ``tell`` the loop checkpoints to ``RUN/state``, at step = the state's
generation counter (completed rounds): ``search/best_calib_loss`` (the best full-fidelity calibration
loss so far, the value ``result.json`` ends with as ``calib_loss``; absent until there is one),
``search/evaluations`` and ``search/token_layers``. Staged methods (one ``tell`` per stage) and a budget
stop in mid-round log a step again with newer values: TensorBoard keeps every point (the newest last),
wandb merges them into the step's row.

- ``tensorboard``: :class:`torch.utils.tensorboard.SummaryWriter` on ``RUN/tensorboard/``, flushed
  after every step. Each process writes its own events file, so a resumed run adds one; TensorBoard
  shows them as one run (a step that was logged before the kill and again after it would show twice;
  the loop only logs steps after the saved state it resumes from, so this does not happen).
- ``wandb``: ``wandb.init(project="evoprune", dir=RUN)`` (its files under ``RUN/wandb/``), named after
  the run directory, with the run's configuration; mode from ``$WANDB_MODE``, else ``offline`` when
  ``$WANDB_API_KEY`` is unset (upload later with ``wandb sync RUN/wandb/offline-run-*``). The wandb run id
  is derived from the run directory's absolute path and ``resume="allow"``, so ``evoprune resume``
  continues the same wandb run (a moved run directory starts a new one). Steps below the step the wandb
  run is at when opened (an online resume: what the server already holds) and below the last step logged
  are not logged (wandb would drop them with a warning); the same step again is merged.

Packages are imported when a reporter is built (a missing one is one :class:`~evoprune.errors.UserError`
line naming the extra), writers are opened by :meth:`Reporter.open` (the loop calls it before its first
``ask``), so a run that fails during setup writes nothing here.
"""
from __future__ import annotations

import hashlib
import importlib
import math
import os
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from .sections import REPORT_TO

__all__ = ["Reporter", "TensorBoardReporter", "WandbReporter", "Reporters", "reporters", "generation_metrics",
           "wandb_run_id"]


class Reporter:
    """Streams metrics somewhere; this base reports nothing (``--report-to none``)."""

    def open(self) -> None:
        """Start the writer (idempotent; :meth:`log` opens too)."""

    def log(self, step: int, metrics: dict) -> None:
        """Record ``metrics`` (name -> number) at ``step``."""

    def close(self) -> None:
        """Flush and stop the writer (idempotent)."""


def _need(module: str, name: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--report-to {name} needs the {name} package: pip install 'evoprune[report]'") from None


class TensorBoardReporter(Reporter):
    """Scalars in ``RUN/tensorboard/`` (``tensorboard --logdir RUN/tensorboard``)."""

    def __init__(self, run_dir: str | Path):
        _need("tensorboard", "tensorboard")
        self.path = Path(run_dir) / "tensorboard"
        self._writer = None

    def open(self) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path))

    def log(self, step: int, metrics: dict) -> None:
        self.open()
        for name, value in metrics.items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()  # watchable now, not at SummaryWriter's next 2-minute flush

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def wandb_run_id(run_dir: str | Path) -> str:
    """The wandb run id of run directory ``run_dir``: the same for every process that opens that path."""
    return "evoprune-" + hashlib.sha1(str(Path(run_dir).resolve()).encode("utf-8")).hexdigest()[:16]


class WandbReporter(Reporter):
    """One wandb run per run directory, resumed with it (see the module docstring)."""

    def __init__(self, run_dir: str | Path, config: dict | None = None):
        self._wandb = _need("wandb", "wandb")
        self.run_dir, self.config = Path(run_dir), dict(config or {})
        self._run, self._next = None, 0

    def open(self) -> None:
        if self._run is not None:
            return
        mode = os.environ.get("WANDB_MODE") or (None if os.environ.get("WANDB_API_KEY") else "offline")
        try:
            self._run = self._wandb.init(project="evoprune", dir=str(self.run_dir), mode=mode, name=self.run_dir.name,
                                         config=self.config, resume="allow", id=wandb_run_id(self.run_dir),
                                         allow_val_change=True)  # execution options may change on resume
        except Exception as e:  # no API key, no network, a bad WANDB_MODE: one line, not wandb's traceback
            text = str(e).strip().splitlines()
            raise UserError(f"--report-to wandb: {text[0] if text else type(e).__name__}") from None
        self._next = int(getattr(self._run, "step", 0) or 0)

    def log(self, step: int, metrics: dict) -> None:
        self.open()
        if step < self._next:
            return
        self._run.log(dict(metrics), step=step)
        self._next = step

    def close(self) -> None:
        if self._run is not None:
            run, self._run = self._run, None
            run.finish()


class Reporters(Reporter):
    """Several reporters as one (``--report-to tensorboard,wandb``), in the given order."""

    def __init__(self, parts: Sequence[Reporter]):
        self.parts = list(parts)

    def open(self) -> None:
        for r in self.parts:
            r.open()

    def log(self, step: int, metrics: dict) -> None:
        for r in self.parts:
            r.log(step, metrics)

    def close(self) -> None:
        for r in self.parts:
            r.close()


def reporters(names: str | Sequence[str], run_dir: str | Path, config: dict | None = None) -> Reporter:
    """The reporter of ``--report-to names`` (``"none"``, ``"tensorboard"``, ``"wandb"`` or a comma list)
    for run directory ``run_dir``; ``config``: the run's configuration record (wandb's run config).
    Imports the packages now (:class:`UserError` when one is missing); opens nothing."""
    parts = names.split(",") if isinstance(names, str) else list(names)
    wanted = [n for n in dict.fromkeys(str(p).strip().lower() for p in parts) if n and n != "none"]
    unknown = [n for n in wanted if n not in REPORT_TO]
    if unknown:
        raise UserError(f"unknown --report-to {unknown[0]!r} (choose from {', '.join(REPORT_TO)})")
    made = [TensorBoardReporter(run_dir) if n == "tensorboard" else WandbReporter(run_dir, config) for n in wanted]
    return made[0] if len(made) == 1 else Reporters(made) if made else Reporter()


def generation_metrics(counters: dict, best) -> dict:
    """What the loop streams after a ``tell``: the best full-fidelity loss so far (``best``: the strategy's
    ``(genome, loss)`` or ``None``), the evaluations and the token-layers spent (``counters``)."""
    out = {"search/best_calib_loss": float(best[1])} if best is not None and math.isfinite(best[1]) else {}
    return {**out, "search/evaluations": int(counters["evaluations"]),
            "search/token_layers": int(counters["token_layers"])}
