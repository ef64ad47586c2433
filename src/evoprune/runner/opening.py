"""Opening a run directory for writing: one writer, the same search, the checks before the model loads, and
what a stopped run says.

Owns :func:`opened` (the context every ``run_search`` call runs in: the directory's writer lock; a stop
from outside or a failed write turned into :class:`~evoprune.errors.Interrupted` /
:class:`~evoprune.errors.WriteFailed` carrying ``evoprune resume RUN``; a new run refused by a
:class:`~evoprune.errors.UserError` before its first saved state leaves its directory as it found it), :func:`open_run` (a new run, a
resume, or a finished run's result; a directory holding another search is refused) and
:func:`preflight` (devices, the files the run will read, its window against the model's context).
"""
from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import Interrupted, UserError, WriteFailed, is_write_failure, user_input
from ..locking import writer_lock
from .config import EXECUTION_SECTION, SearchConfig
from .rundir import RunDir, is_run_dir

__all__ = ["opened", "open_run", "preflight"]


@contextmanager
def opened(out: str | Path) -> Iterator[RunDir]:
    """Hold ``out``'s writer lock (created if missing) and say how to continue the run if it stops (see the
    module docstring)."""
    with writer_lock(out, "run directory"):
        run = RunDir(out)
        fresh = not any(run.path.iterdir())
        try:
            yield run
        except UserError:
            if fresh and not run.state_path.exists():  # refused before it started: leave nothing behind
                _empty(run.path)
            raise
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
            raise Interrupted(signum, resume=_resume_command(run)) from None
        except OSError as e:
            if not is_write_failure(e):
                raise
            where = e.filename if e.filename is not None else run.path
            raise WriteFailed(f"cannot write {os.fsdecode(where)}: {e.strerror}", resume=_resume_command(run)) \
                from None


def _empty(path: Path) -> None:
    """Remove what a refused fresh run wrote into its (empty when it started, locked since) directory."""
    for p in path.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _resume_command(run: RunDir) -> str | None:
    """``evoprune resume RUN`` for a run that holds a configuration and no result yet; else ``None``."""
    return f"evoprune resume {run.path}" if is_run_dir(run.path) and not run.result_path.exists() else None


def open_run(cfg: SearchConfig, out, resume: bool) -> tuple[RunDir, bool, dict | None]:
    """The run directory, whether this is a resume, and its finished result (if any)."""
    run = RunDir(out)
    with user_input("--out directory", run.path):
        exists = run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir()))
    if exists:
        if not is_run_dir(run.path):
            raise UserError(f"--out {run.path} exists and is not an evoprune run directory")
        old, new = _flat(SearchConfig.from_dict(run.read_config())), _flat(cfg)
        diff = [f"{k}: {old.get(k)!r} != {v!r}" for k, v in new.items() if old.get(k) != v]
        if diff:
            raise UserError(f"{run.path} holds a run with different arguments ({'; '.join(diff)}); "
                            f"use 'evoprune resume {run.path}' or a new --out")
        return run, True, run.read_result()
    if resume:
        raise UserError(f"{run.path}: nothing to resume")
    return run, False, None


def preflight(cfg: SearchConfig, run: RunDir) -> None:
    """What can be refused before the model loads: the devices, and for a run without its calibration set yet,
    the files it will read and its window against the model's context."""
    from ..models.preflight import check_device, check_spec, check_window, model_facts
    from .calibration import check_calib
    from .pruned import base_spec

    check_device(cfg.model.device)
    check_device(cfg.execution.cache_device, "--cache-device")
    check_spec(cfg.model.model)
    if run.calib_path.exists():  # a resumed run scores on the set it saved
        return
    check_calib(cfg)
    if cfg.training is not None and cfg.training.data:
        from ..finetune.options import check_train_source

        check_train_source(cfg.training.data, what="--train-data")
    c = cfg.calibration
    if not c.calib_from:
        check_window(model_facts(base_spec(cfg.model.model)), c.seqlen, f"--seqlen {c.seqlen}", cfg.model.model)


def _flat(cfg: SearchConfig) -> dict:
    """``{"section.field": value}`` of everything but the execution options (those may differ on resume)."""
    out = {}
    for name, value in cfg.to_dict().items():
        if isinstance(value, dict):
            if name != EXECUTION_SECTION:
                out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out
