"""Which runs are worth having, across spaces: Pareto fronts of quality against size and speed, the best per budget.

Owns :func:`quality_metric` (the number runs are ranked by: a held-out perplexity, wikitext2's first, else the
calibration loss), :func:`pareto` (the runs no other run beats on both axes) and :func:`best_per_budget` (the best
run in each band of removed parameters). Pure Python over ``compare``'s rows (each with ``name``, ``params``,
``param_sparsity``, ``calib_loss`` and ``metrics``); no model, no torch.
"""
from __future__ import annotations

from typing import Callable

from .runs import is_acc
from .tables import finite

__all__ = ["quality_metric", "value", "pareto", "best_per_budget", "BUDGET_STEP"]

BUDGET_STEP = 0.05  # runs whose removed share of the blocks' parameters rounds to the same 5% compete


def quality_metric(rows: list[dict]) -> str:
    """``"wikitext2 ppl"`` when any row has it, else the first held-out perplexity any row has, else
    ``"calib loss"`` (comparable only between runs of one calibration set)."""
    names = [m for r in rows for m in r["metrics"] if m.endswith(" ppl") and not is_acc(m)]
    if "wikitext2 ppl" in names:
        return "wikitext2 ppl"
    return names[0] if names else "calib loss"


def value(row: dict, metric: str):
    """``row``'s number for ``metric`` (``None`` when it has none)."""
    v = row.get("calib_loss") if metric == "calib loss" else row["metrics"].get(metric)
    return v if finite(v) else None


def pareto(rows: list[dict], x: Callable[[dict], float | None], y: Callable[[dict], float | None]) -> list[dict]:
    """The rows with both ``x`` and ``y`` that no other such row matches or beats on both (lower is better), and
    beats on one; sorted by ``x``."""
    pts = [(x(r), y(r), r) for r in rows]
    pts = [(a, b, r) for a, b, r in pts if finite(a) and finite(b)]
    front = [(a, b, r) for a, b, r in pts
             if not any(c <= a and d <= b and (c < a or d < b) for c, d, _ in pts)]
    return [r for _, _, r in sorted(front, key=lambda t: (t[0], t[1]))]


def best_per_budget(rows: list[dict], metric: str) -> list[dict]:
    """Per band of :data:`BUDGET_STEP` of ``param_sparsity``: ``{"budget", "run", "row"}`` of the row with the
    lowest ``metric``, bands in increasing order (rows without either are left out)."""
    bands: dict[float, dict] = {}
    for r in rows:
        s, v = r.get("param_sparsity"), value(r, metric)
        if not (finite(s) and v is not None):
            continue
        band = round(round(s / BUDGET_STEP) * BUDGET_STEP, 4)
        if band not in bands or v < value(bands[band], metric):
            bands[band] = r
    return [{"budget": b, "run": bands[b]["name"], "row": bands[b]} for b in sorted(bands)]
