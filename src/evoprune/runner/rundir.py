"""Run directories: storage only (configuration, history, atomic state, results, side logs).

Owns :class:`RunDir`, :func:`is_run_dir` and the on-disk layout of ``evoprune search --out RUN``::

    RUN/config.json     the search configuration (``{"evoprune_run": 2, ...}``, see evoprune.runner.config;
                        ``1``: the flat format of earlier versions, still read)
    RUN/calib.pt        the calibration set actually used (token ids + cluster ids)
    RUN/history.jsonl   one line per fitness evaluation (deterministic fields only)
    RUN/state           JSON, atomically replaced after every generation / step
    RUN/result.json     written once at the end
    RUN/wall.jsonl      wall-clock timings (kept apart: they differ between runs)
    RUN/workers.jsonl   Ray worker events of runs with --workers / --ray-address (start: pid, node;
                        lost; close: evaluations and token-layers the workers actually ran)
    RUN/env.jsonl       the software stack, one line each time the run starts or resumes
                        (``{"event": "start"|"resume", "time": ..., **evoprune.environment.stack()}``)

One process writes a run at a time: ``search`` and ``resume`` hold the directory's writer lock
(:func:`evoprune.locking.writer_lock`, an ``flock`` on ``RUN`` itself, so nothing is written to take it);
:meth:`RunDir.status` tells readers whether a run is finished, in progress (and by which pid) or
interrupted.

Every write of a whole file goes to a temporary file in ``RUN`` followed by
``os.replace``, so a run killed at any instant leaves either the old or the new
version, never a torn one. ``history.jsonl`` is append-only; a torn last line is
ignored and rewritten on resume. What a run *means* (its model, its pruned
result) is not this module's business: see :mod:`evoprune.runner.pruned`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, user_input
from ..files import append_jsonl, atomic_open, atomic_write_json, read_jsonl
from ..locking import UNKNOWN_PID, holder

__all__ = ["RunDir", "is_run_dir", "RUN_FORMATS"]

RUN_FORMATS = (1, 2)  # the "evoprune_run" markers this version reads; it writes the last


def is_run_dir(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    try:
        return p.is_file() and json.loads(p.read_text()).get("evoprune_run") in RUN_FORMATS
    except (OSError, json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return False


class RunDir:
    """Accessors for one run directory (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_path = self.path / "config.json"
        self.calib_path = self.path / "calib.pt"
        self.history_path = self.path / "history.jsonl"
        self.state_path = self.path / "state"
        self.result_path = self.path / "result.json"
        self.wall_path = self.path / "wall.jsonl"
        self.workers_path = self.path / "workers.jsonl"
        self.env_path = self.path / "env.jsonl"

    # -- reading ------------------------------------------------------------------
    def _read_json(self, p: Path, what: str) -> dict:
        try:
            with user_input(f"run file ({what})", p, formats=False):
                obj = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path}: missing {p.name} ({what})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: corrupted {p.name} ({e.__class__.__name__})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{self.path}: corrupted {p.name} (not a JSON object)")
        return obj

    def read_config(self) -> dict:
        """The run's configuration record (either format; :meth:`SearchConfig.from_dict` reads both)."""
        if not self.path.is_dir():
            raise UserError(f"run directory not found: {self.path}" if not self.path.exists()
                            else f"{self.path} is not a directory (a run directory was expected)")
        if not self.config_path.is_file():
            raise UserError(f"{self.path} is not an evoprune run (no config.json)")
        cfg = self._read_json(self.config_path, "run configuration")
        if cfg.get("evoprune_run") not in RUN_FORMATS:
            raise UserError(f"{self.path} is not an evoprune run (config.json has no evoprune_run marker)")
        return cfg

    def read_state(self) -> dict | None:
        return self._read_json(self.state_path, "search state") if self.state_path.exists() else None

    def read_result(self) -> dict | None:
        return self._read_json(self.result_path, "result") if self.result_path.exists() else None

    def read_history(self) -> list[dict]:
        """Complete history lines; a torn (unterminated or unparsable) last line is dropped."""
        try:
            return read_jsonl(self.history_path)
        except ValueError as e:
            raise UserError(f"{self.path}: corrupted history.jsonl ({e})") from None

    def status(self) -> str:
        """``finished``; ``in progress (pid N)`` while a writer holds the run; else ``interrupted`` with the
        command that continues it."""
        if self.result_path.exists():
            return "finished"
        pid = holder(self.path)
        if pid is not None:
            return "in progress" + (f" (pid {pid})" if pid != UNKNOWN_PID else "")
        return f"interrupted (continue with: evoprune resume {self.path})"

    # -- writing ------------------------------------------------------------------
    def write_config(self, cfg: dict) -> None:
        """Write the configuration record in the current format (creates the directory)."""
        with user_input("--out directory", self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_path, {"evoprune_run": RUN_FORMATS[-1], **cfg})

    def write_state(self, state: dict) -> None:
        atomic_write_json(self.state_path, state)

    def write_result(self, result: dict) -> None:
        atomic_write_json(self.result_path, result)

    def rewrite_history(self, rows: list[dict]) -> None:
        """Replace the history with ``rows`` (used on resume to drop uncommitted lines)."""
        with atomic_open(self.history_path) as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    def append_history(self, row: dict) -> None:
        append_jsonl(self.history_path, row)

    def append_wall(self, row: dict) -> None:
        append_jsonl(self.wall_path, row, fsync=False)

    def append_workers(self, row: dict) -> None:
        append_jsonl(self.workers_path, row, fsync=False)

    def append_env(self, record: dict) -> None:
        """One line of ``env.jsonl``: the stack this start or resume of the run ran on."""
        append_jsonl(self.env_path, record, fsync=False)
