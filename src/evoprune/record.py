"""Run directories: configuration, history, atomic state, results, and loading a run's model.

Owns the on-disk layout of ``evoprune search --out RUN``::

    RUN/config.json     the frozen search configuration (``{"evoprune_run": 1, ...}``)
    RUN/calib.pt        the calibration set actually used (token ids + cluster ids)
    RUN/history.jsonl   one line per fitness evaluation (deterministic fields only)
    RUN/state           JSON, atomically replaced after every generation / step
    RUN/result.json     written once at the end
    RUN/wall.jsonl      wall-clock timings (kept apart: they differ between runs)
    RUN/workers.jsonl   Ray worker events of runs with --workers / --ray-address (start: pid, node;
                        lost; close: evaluations and token-layers the workers actually ran)

Every write of a whole file goes to a temporary file in ``RUN`` followed by
``os.replace``, so a run killed at any instant leaves either the old or the new
version, never a torn one. ``history.jsonl`` is append-only; a torn last line is
ignored and rewritten on resume.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .atomic import atomic_open
from .errors import UserError

__all__ = ["RunDir", "atomic_write_json", "is_run_dir", "load_run_model", "width_plan", "WIDTH_SPACES"]

# search spaces whose result is a width-pruned model (per-block attention groups and MLP channels)
WIDTH_SPACES = ("width", "levels")

RUN_FORMAT = 1


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def is_run_dir(path: str | Path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("evoprune_run") == RUN_FORMAT
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
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

    # -- reading ------------------------------------------------------------------
    def _read_json(self, p: Path, what: str) -> dict:
        try:
            obj = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path}: missing {p.name} ({what})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{self.path}: corrupted {p.name} ({e.__class__.__name__})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{self.path}: corrupted {p.name} (not a JSON object)")
        return obj

    def read_config(self) -> dict:
        if not self.path.is_dir():
            raise UserError(f"run directory not found: {self.path}")
        if not self.config_path.is_file():
            raise UserError(f"{self.path} is not an evoprune run (no config.json)")
        cfg = self._read_json(self.config_path, "run configuration")
        if cfg.get("evoprune_run") != RUN_FORMAT:
            raise UserError(f"{self.path} is not an evoprune run (config.json has no evoprune_run marker)")
        return cfg

    def read_state(self) -> dict | None:
        return self._read_json(self.state_path, "search state") if self.state_path.exists() else None

    def read_result(self) -> dict | None:
        return self._read_json(self.result_path, "result") if self.result_path.exists() else None

    def read_history(self) -> list[dict]:
        """Complete history lines; a torn (unterminated or unparsable) last line is dropped."""
        if not self.history_path.exists():
            return []
        rows = []
        with open(self.history_path) as f:
            lines = f.readlines()
        for i, line in enumerate(lines):
            if not line.endswith("\n"):
                break  # torn tail of a killed run
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    break
                raise UserError(f"{self.path}: corrupted history.jsonl line {i + 1}") from None
        return rows

    # -- writing ------------------------------------------------------------------
    def write_config(self, cfg: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_path, {"evoprune_run": RUN_FORMAT, **cfg})

    def write_state(self, state: dict) -> None:
        atomic_write_json(self.state_path, state)

    def write_result(self, result: dict) -> None:
        atomic_write_json(self.result_path, result)

    def rewrite_history(self, rows: list[dict]) -> None:
        """Replace the history with ``rows`` (used on resume to drop uncommitted lines)."""
        with atomic_open(self.history_path) as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    def append_history(self, row: dict) -> None:
        with open(self.history_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append_wall(self, row: dict) -> None:
        with open(self.wall_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def append_workers(self, row: dict) -> None:
        with open(self.workers_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


def load_run_model(path, *, dtype=None, device="cpu", progress: bool = True, device_map=None):
    """The base model of a finished run with its best pattern applied (blocks removed in place)."""
    from .models.loading import load_model

    run = RunDir(path)
    cfg = run.read_config()
    res = run.read_result()
    if res is None:
        raise UserError(f"{run.path}: run has no result.json yet (finish it with: evoprune resume {run.path})")
    kw = {"device": device, "progress": progress, "device_map": device_map}
    if dtype is not None:
        kw["dtype"] = dtype
    lm = load_model(cfg["model"], **kw)
    if cfg.get("space") in WIDTH_SPACES:
        from .models.width import apply_width_inplace

        plan = width_plan(run, lm)
        apply_width_inplace(lm.model, plan)
        lm.name = str(path)
        lm.extra["run"] = {"method": res.get("method"), "calib_loss": res.get("calib_loss"), "space": cfg["space"],
                           "rates": list(plan.rates), "params": res.get("params")}
        return lm
    dropped = tuple(res.get("dropped_layers", ()))
    lm.adapter.drop_inplace(lm.model, dropped)
    lm.name, lm.dropped = str(path), dropped
    lm.extra["run"] = {"method": res.get("method"), "calib_loss": res.get("calib_loss")}
    return lm


def width_plan(path, lm):
    """The :class:`~evoprune.prune.width_plan.WidthPlan` of a finished width or levels run, for the unpruned
    base model ``lm``. Width runs: from the rates and ``RUN/importance.pt``. Levels runs: from the run's level
    database, whose weights for the chosen levels are also written into ``lm``'s output / MLP-output
    projections (the masked form: slicing ``lm`` by the plan then gives the pruned model)."""
    from .prune.wanda_sp import WidthImportance
    from .prune.width_plan import plan_widths

    run = path if isinstance(path, RunDir) else RunDir(path)
    res = run.read_result()
    if res is not None and "attn_levels" in res:
        return _levels_plan(run, res, lm)
    imp = run.path / "importance.pt"
    if res is None or "rates" not in res or not imp.is_file():
        raise UserError(f"{run.path}: not a finished width-pruning run (needs result.json with rates and importance.pt)")
    return plan_widths(lm, WidthImportance.load(imp), res["rates"])


def _levels_plan(run: RunDir, res: dict, lm):
    from .prune.levels_db import AppliedLevels, LevelDatabase

    info = res.get("levels_db") or {}
    if not info.get("path") or not (Path(info["path"]) / "levels.json").is_file():
        raise UserError(f"{run.path}: its level database {info.get('path')!r} is gone; rerun the search with the "
                        f"same arguments in a new directory to rebuild it")
    applied = AppliedLevels(lm, LevelDatabase.load(info["path"]))
    applied.apply(res["attn_levels"], res["mlp_levels"])
    return applied.db.plan(res["attn_levels"], res["mlp_levels"], applied.spec)
