"""Reading run directories for reports: config, result, history, derived n / k / best, held-out evaluations.

Owns :func:`load_run`, :func:`read_eval_files`, :func:`eval_metrics`, :func:`top_candidates` and
:func:`finite`. Reads only the run directory files (:mod:`evoprune.runner.rundir`); no model is loaded,
torch is not imported.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..runner.config import SearchConfig
from ..runner.pruned import run_result
from ..runner.rundir import RunDir
from .tables import finite, scored

__all__ = ["load_run", "read_eval_files", "eval_metrics", "top_candidates", "is_acc", "is_feasible"]


def _n_from_history(hist: list[dict]) -> int | None:
    for r in hist:
        m = re.match(r"[LS](\d+):", str(r.get("pattern", "")))
        if m:
            return int(m.group(1))
    return None


def load_run(path) -> dict:
    """Config, result (``None`` while running), history and derived ``n``/``k``/best of one run directory, and its
    ``status`` (:meth:`~evoprune.runner.rundir.RunDir.status`: finished, in progress with the writer's pid, or
    interrupted).

    ``config`` is the run's configuration in the current record format (a flat record of an earlier
    version is converted), ``round_name`` what its method's generations are (e.g. SLEB's steps),
    ``width`` whether candidates are per-block rates (width and levels runs).
    """
    run = RunDir(path)
    search = SearchConfig.from_dict(run.read_config())
    cfg = search.to_dict()
    res = run.read_result()
    src = res if res is not None else run_result(run)  # unfinished: the best candidate of its last saved state
    hist = run.read_history()
    n = (res or {}).get("n_layers") or _n_from_history(hist)
    k = (res or {}).get("k")
    width = "rates" in (res or {}) or any(r.get("rates") is not None for r in hist)
    sub = search.space == "sublayers"
    if sub:
        best = None
        if src is not None:
            both = sorted(set(src["dropped_attention"]) & set(src["dropped_mlp"]))
            best = {"dropped": list(src.get("dropped_layers", both)), "loss": src.get("calib_loss"), "rates": None,
                    "attention": list(src["dropped_attention"]), "mlp": list(src["dropped_mlp"])}
        else:
            feasible = [r for r in hist if scored(r) and r.get("feasible", True)]
            if feasible:
                b = min(feasible, key=lambda r: r["loss"])
                best = {"dropped": sorted(set(b["dropped_attention"]) & set(b["dropped_mlp"])), "loss": b["loss"],
                        "rates": None, "attention": b["dropped_attention"], "mlp": b["dropped_mlp"]}
        return {"path": run.path, "config": cfg, "result": res, "history": hist, "n": n, "k": k, "best": best,
                "finished": res is not None, "status": run.status(), "width": False, "sublayers": True,
                "round_name": search.strategy_cls.round_name}
    if width:
        n = n or next((len(r["rates"]) for r in hist if r.get("rates")), None)
    if k is None and n and not width:
        k = search.budget.k(n)
    feasible = [r for r in hist if scored(r) and (k is None or len(r.get("dropped", ())) == k)]
    if width:
        if src is not None:
            best = {"dropped": [], "loss": src.get("calib_loss"), "rates": src.get("rates")}
        elif feasible:
            b = min(feasible, key=lambda r: r["loss"])
            best = {"dropped": [], "loss": b["loss"], "rates": b.get("rates")}
        else:
            best = None
    elif src is not None:
        best = {"dropped": list(src.get("dropped_layers", ())), "loss": src.get("calib_loss"),
                "rates": src.get("rates")}
    elif feasible:
        b = min(feasible, key=lambda r: r["loss"])
        best = {"dropped": list(b["dropped"]), "loss": b["loss"], "rates": None}
    else:
        best = None
    return {"path": run.path, "config": cfg, "result": res, "history": hist, "n": n, "k": k, "best": best,
            "finished": res is not None, "status": run.status(), "width": width, "sublayers": False,
            "round_name": search.strategy_cls.round_name}


def is_feasible(run: dict, row: dict) -> bool:
    """Whether a history row meets the run's budget (a layer run: exactly k blocks dropped)."""
    if run.get("sublayers"):
        return bool(row.get("feasible", True))
    return run["k"] is None or len(row.get("dropped", ())) == run["k"]


def eval_metrics(obj) -> dict[str, float]:
    """Held-out numbers in one eval JSON object: ``{"wikitext2 ppl": ..., "mean acc": ..., "<task> acc": ...}``;
    an ``evoprune bench`` result gives the pruned model's ``decode tok/s`` and ``prefill tok/s``."""
    out: dict[str, float] = {}
    if not isinstance(obj, dict):
        return out
    if "speedup" in obj and isinstance(obj.get("rows"), list):  # evoprune bench result: the pruned model's speed
        pruned = next((r for r in obj["rows"] if isinstance(r, dict) and r.get("name") != "dense"), None) or {}
        for key, name in (("decode_tok_s", "decode tok/s"), ("prefill_tok_s", "prefill tok/s")):
            if finite(pruned.get(key)):
                out[name] = float(pruned[key])
        return out
    if "tasks" in obj and isinstance(obj["tasks"], dict):  # evoprune eval (zero-shot) result
        for task, v in obj["tasks"].items():
            if isinstance(v, dict) and finite(v.get("acc")):
                out[f"{task} acc"] = float(v["acc"])
        if finite(obj.get("mean_acc")):
            out["mean acc"] = float(obj["mean_acc"])
        return out
    if "ppl" in obj and "dataset" in obj:  # evoprune ppl JSON line
        if finite(obj["ppl"]):
            out[f"{obj['dataset']} ppl"] = float(obj["ppl"])
        return out
    for key, v in obj.items():  # {"wikitext2": ppl, "mean acc": x, ...}
        if isinstance(v, dict):
            out.update(eval_metrics(v))
        elif finite(v):
            name = str(key)
            out[name if ("acc" in name or name.endswith(("ppl", "tok/s"))) else f"{name} ppl"] = float(v)
    return out


def read_eval_files(path) -> dict[str, float]:
    """Metrics from every ``eval_*.json`` in a run directory (a JSON object, or JSON lines: the last one counts)."""
    out: dict[str, float] = {}
    for f in sorted(Path(path).glob("eval_*.json")):
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            lines = [s for s in text.splitlines() if s.strip().startswith("{")]
            try:
                obj = json.loads(lines[-1]) if lines else None
            except json.JSONDecodeError:
                obj = None
        if obj is None:
            print(f"evoprune: warning: {f} is not JSON; ignored", file=sys.stderr)
            continue
        out.update(eval_metrics(obj))
    return out


def top_candidates(run: dict, n: int) -> list[dict]:
    """The ``n`` lowest-loss distinct feasible candidates (first evaluation of each pattern)."""
    seen, rows = set(), []
    for r in run["history"]:
        if not scored(r) or not is_feasible(run, r):
            continue
        if r["pattern"] in seen:
            continue
        seen.add(r["pattern"])
        rows.append(r)
    return sorted(rows, key=lambda r: (r["loss"], r["eval"]))[:n]


def is_acc(metric: str) -> bool:
    return "acc" in metric
