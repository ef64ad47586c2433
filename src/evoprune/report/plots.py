"""The report figures, drawn with matplotlib's object API on the Agg canvas (no display, no pyplot state).

Owns :func:`plot_fitness` (``fitness.png``), :func:`plot_pattern` (``pattern.png``), :func:`plot_origin`
(``origin.png``, runs whose history names each candidate's origin) and :func:`plot_compare`
(``compare.png``); see :mod:`evoprune.report` for what each shows.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from ..errors import UserError
from ..files import atomic_open
from .runs import is_acc, is_feasible, top_candidates
from .tables import finite, fmt_layers, scored

__all__ = ["plot_fitness", "plot_pattern", "plot_origin", "plot_compare", "plot_front", "TOP_N", "ORIGIN_COLORS"]

TOP_N = 10


def mpl():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'evoprune[eval]' (or matplotlib)") from None
    return Figure


def _save(fig, path: Path) -> None:
    """The figure as a PNG at ``path``, written atomically (a reader never sees half a file)."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def plot_fitness(run: dict, path: Path) -> None:
    Figure = mpl()
    from matplotlib import colormaps

    hist, k = run["history"], run["k"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    pts = [r for r in hist if scored(r)]
    gens = [int(r.get("generation", 0)) for r in pts]
    gmax = max(gens, default=0)
    cmap = colormaps["viridis"]
    method = run["config"]["method"]
    step_name = run["round_name"]
    # best-so-far over feasible candidates (exactly k dropped)
    best, bx_e, bx_t, by = math.inf, [], [], []
    for r in pts:
        if is_feasible(run, r):
            best = min(best, r["loss"])
        if math.isfinite(best):
            bx_e.append(r["eval"])
            bx_t.append(r["token_layers"])
            by.append(best)
    losses = [r["loss"] for r in pts]
    if losses:
        lo, hi = min(losses), max(losses)
        q = sorted(losses)[int(0.95 * (len(losses) - 1))]
        top = hi if hi <= lo + 3 * max(q - lo, 1e-9) else q + 0.15 * (q - lo + 1e-9)
        pad = 0.05 * max(top - lo, 1e-6)
    panels = ((axes[0], "eval", "evaluations"), (axes[1], "token_layers", "token-layers (tokens x blocks run)"))
    for ax, key, xlabel in panels:
        for feasible in (True, False):
            sel = [r for r in pts if is_feasible(run, r) == feasible]
            if not sel:
                continue
            colors = [cmap(int(r.get("generation", 0)) / max(gmax, 1)) for r in sel]
            xs, ys = [r[key] for r in sel], [r["loss"] for r in sel]
            if feasible:
                ax.scatter(xs, ys, c=colors, s=18, alpha=0.75, edgecolors="none",
                           label=f"evaluated candidate (k={k})" if k is not None and not run.get("sublayers")
                           else "evaluated candidate")
            else:
                ax.scatter(xs, ys, facecolors="none", edgecolors=colors, s=18, alpha=0.75, linewidths=0.8,
                           label="partial candidate (below the budget)" if run.get("sublayers")
                           else f"partial candidate (< {k} dropped)")
        if by:
            ax.step(bx_e if key == "eval" else bx_t, by, where="post", color="crimson", lw=2, label="best so far")
        if losses:
            ax.set_ylim(lo - pad, top + pad)
            over = [r for r in pts if r["loss"] > top + pad]
            if over:
                ax.scatter([r[key] for r in over], [top + pad * 0.6] * len(over), marker="^", color="grey", s=16,
                           label=f"{len(over)} above the axis (max {hi:.2f})")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if key == "token_layers":
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    axes[0].set_ylabel("calibration loss (mean NLL, lower is better)")
    axes[0].legend(loc="best", fontsize=8)
    if gmax > 0:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.ticker import MaxNLocator

        cb = fig.colorbar(ScalarMappable(norm=Normalize(0, gmax), cmap=cmap), ax=axes, label=step_name, shrink=0.9)
        cb.locator = MaxNLocator(integer=True)
        cb.update_ticks()
    name = run["path"].name
    what = (f"{k} of {2 * run['n']} sub-layers" if run.get("sublayers") else f"drop {k} of {run['n']} blocks")
    fig.suptitle(f"{name}: {method}, {run['config']['model']['model']}, {what}"
                 + ("" if run["finished"] else " (unfinished)"))
    _save(fig, path)


# LLM children in warm colours, the fallback (non-LLM) operators' in cool ones
ORIGIN_COLORS = {"llm-init": "#d73027", "llm-mutation": "#fc8d59", "llm-crossover": "#fee090",
                 "init": "#313695", "mutation": "#4575b4", "crossover": "#91bfdb"}


def plot_origin(run: dict, path: Path) -> bool:
    """Fitness against evaluations, each candidate coloured by the operator that made it (LLM or fallback), with
    the best-so-far line. Returns ``False`` (nothing written) when the history names no origins."""
    pts = [r for r in run["history"] if scored(r) and r.get("origin")]
    if not pts:
        return False
    Figure = mpl()
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    origins = sorted({r["origin"] for r in pts}, key=lambda o: (not o.startswith("llm-"), o))
    for i, o in enumerate(origins):
        sel = [r for r in pts if r["origin"] == o]
        ax.scatter([r["eval"] for r in sel], [r["loss"] for r in sel], s=22, alpha=0.85, edgecolors="black",
                   linewidths=0.3, color=ORIGIN_COLORS.get(o, f"C{i % 10}"),
                   label=f"{o} ({len(sel)})" + ("" if o.startswith("llm-") else ", fallback/non-LLM"))
    best, xs, ys = math.inf, [], []
    for r in pts:
        best = min(best, r["loss"])
        xs.append(r["eval"])
        ys.append(best)
    ax.step(xs, ys, where="post", color="black", lw=1.6, label="best so far")
    losses = sorted(r["loss"] for r in pts)
    lo, q = losses[0], losses[int(0.95 * (len(losses) - 1))]
    ax.set_ylim(lo - 0.05 * max(q - lo, 1e-6), q + 0.15 * max(q - lo, 1e-6))
    ax.set_xlabel("evaluations")
    ax.set_ylabel("calibration loss (mean NLL, lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{run['path'].name}: {run['config']['method']}, candidates by origin")
    _save(fig, path)
    return True


def plot_pattern(run: dict, path: Path) -> None:
    if run.get("sublayers"):
        return plot_sublayers(run, path)
    Figure = mpl()
    from matplotlib.patches import Rectangle

    n, best = run["n"] or 0, run["best"] or {}
    rates = best.get("rates")
    if rates:
        fig = Figure(figsize=(max(6, 0.28 * len(rates) + 2), 3.2), layout="constrained")
        ax = fig.subplots()
        ax.bar(range(len(rates)), rates, color="steelblue")
        ax.set_xlabel("block")
        ax.set_ylabel("pruning rate")
        ax.set_xticks(range(len(rates)))
        ax.tick_params(axis="x", labelsize=7)
        ax.set_ylim(0, max(1.0, max(rates)))
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{run['path'].name}: per-block pruning rates of the best candidate")
        _save(fig, path)
        return
    dropped = set(best.get("dropped", ()))
    k = run["k"] or len(dropped)
    top = top_candidates(run, TOP_N)
    counts = Counter(i for r in top for i in r["dropped"])
    fig = Figure(figsize=(max(6.5, 0.34 * n + 1.5), 3.6), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, height_ratios=[1, 1.6], sharex=True)
    for i in range(n):
        d = i in dropped
        ax.add_patch(Rectangle((i - 0.45, 0), 0.9, 1, facecolor="#b2182b" if d else "#d9e6f2",
                               edgecolor="black", lw=0.6))
        if d:
            ax.plot([i - 0.35, i + 0.35], [0.15, 0.85], color="white", lw=1.5)
            ax.plot([i - 0.35, i + 0.35], [0.85, 0.15], color="white", lw=1.5)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(-0.05, 1.05)
    ax.set_yticks([])
    ax.tick_params(axis="x", bottom=False)
    for s in ax.spines.values():
        s.set_visible(False)
    loss = best.get("loss")
    ax.set_title(f"best candidate: blocks {fmt_layers(sorted(dropped))} dropped ({len(dropped)} of {n}, dark)"
                 + (f", calib loss {loss:.4f}" if finite(loss) else ""), fontsize=10)
    ax2.bar(range(n), [counts.get(i, 0) for i in range(n)], color=["#b2182b" if i in dropped else "grey"
                                                                  for i in range(n)])
    ax2.set_ylabel(f"times dropped\nin {len(top)} best", fontsize=8)
    ax2.set_ylim(0, max(1, len(top)))
    ax2.set_xticks(range(n))
    ax2.tick_params(axis="x", labelsize=7 if n > 24 else 8)
    ax2.set_xlabel("block index")
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{run['path'].name}: {run['config']['method']}, k={k}", fontsize=11)
    _save(fig, path)


def plot_sublayers(run: dict, path: Path) -> None:
    """The best sub-layer pattern (attention row, MLP row; dark = dropped) and how often each sub-layer is dropped
    among the best candidates."""
    Figure = mpl()
    from matplotlib.patches import Rectangle

    n, best = run["n"] or 0, run["best"] or {}
    attn, mlp = set(best.get("attention", ())), set(best.get("mlp", ()))
    top = top_candidates(run, TOP_N)
    fig = Figure(figsize=(max(6.5, 0.34 * n + 1.5), 4.2), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, height_ratios=[1, 1.6], sharex=True)
    for row, (label, dropped) in enumerate((("attention", attn), ("MLP", mlp))):
        y = 1 - row
        for i in range(n):
            ax.add_patch(Rectangle((i - 0.45, y + 0.05), 0.9, 0.9, edgecolor="black", lw=0.6,
                                   facecolor="#b2182b" if i in dropped else "#d9e6f2"))
        ax.text(-0.8, y + 0.5, label, ha="right", va="center", fontsize=8)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_ylim(0, 2.05)
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    loss = best.get("loss")
    ax.set_title(f"best: attention {fmt_layers(sorted(attn))} and MLP {fmt_layers(sorted(mlp))} dropped (dark)"
                 + (f", calib loss {loss:.4f}" if finite(loss) else ""), fontsize=10)
    ca = Counter(i for r in top for i in r["dropped_attention"])
    cm = Counter(i for r in top for i in r["dropped_mlp"])
    xs = range(n)
    ax2.bar([x - 0.2 for x in xs], [ca.get(i, 0) for i in xs], width=0.4, color="#ef8a62", label="attention")
    ax2.bar([x + 0.2 for x in xs], [cm.get(i, 0) for i in xs], width=0.4, color="#67a9cf", label="MLP")
    ax2.set_ylabel(f"times dropped\nin {len(top)} best", fontsize=8)
    ax2.set_ylim(0, max(1, len(top)))
    ax2.set_xticks(list(xs))
    ax2.tick_params(axis="x", labelsize=7 if n > 24 else 8)
    ax2.set_xlabel("block index")
    ax2.legend(fontsize=8)
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{run['path'].name}: {run['config']['method']}, sub-layers", fontsize=11)
    _save(fig, path)


def plot_compare(rows: list[dict], metrics: list[str], dense: dict | None, path: Path) -> None:
    Figure = mpl()

    panels = ["calib loss", *metrics]
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(4.6 * ncol, 3.8 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False, sharex=True).ravel()
    methods = sorted({str(r["method"]) for r in rows})
    markers, styles = "osD^v<>ph", ["-", "--", "-.", ":"]
    for ax, metric in zip(axes, panels):
        for i, m in enumerate(methods):
            pts = [(r["sparsity"], r["calib_loss"] if metric == "calib loss" else r["metrics"].get(metric))
                   for r in rows if str(r["method"]) == m]
            pts = sorted((100 * s, v) for s, v in pts if finite(s) and finite(v))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", marker=markers[i % len(markers)],
                        ls=styles[i % len(styles)], ms=7 - (i % 3), alpha=0.9, label=m)
        if dense and finite(dense.get(metric)):
            ax.plot([0], [dense[metric]], marker="*", color="black", ms=12, ls="none", label="dense")
            ax.axhline(dense[metric], color="black", ls=":", lw=0.8)
        ax.set_xlabel("layer sparsity (% of blocks dropped)")
        ax.tick_params(axis="x", labelbottom=True)
        ax.set_ylabel(metric + (" (higher is better)" if is_acc(metric) else " (lower is better)"))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    _save(fig, path)


def plot_front(rows: list[dict], metric: str, front: list[dict], dense: dict | None, path: Path) -> None:
    """``metric`` (a held-out perplexity, or the calibration loss) against the pruned model's parameters, one
    marker per method, the Pareto front joined by a line; the dense model as a star when ``dense`` has ``metric``."""
    Figure = mpl()
    from .frontier import value

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    methods = sorted({str(r["method"]) for r in rows})
    markers = "osD^v<>ph"
    for i, m in enumerate(methods):
        pts = [(r["params"] / 1e6, value(r, metric)) for r in rows
               if str(r["method"]) == m and finite(r.get("params")) and value(r, metric) is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", marker=markers[i % len(markers)],
                       label=m, alpha=0.85)
    if front:
        ax.plot([r["params"] / 1e6 for r in front], [value(r, metric) for r in front], color="black", lw=1, ls="--",
                label="Pareto front")
    dense_params = next((r["params_dense"] for r in rows if finite(r.get("params_dense"))), None)
    if dense and finite(dense.get(metric)) and dense_params:
        ax.plot([dense_params / 1e6], [dense[metric]], marker="*", color="black", ms=12, ls="none", label="dense")
    ax.set_xlabel("parameters of the pruned model (M)")
    ax.ticklabel_format(axis="x", useOffset=False)  # runs of one budget differ in the 4th digit
    ax.set_ylabel(metric)
    if metric.endswith("ppl"):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.set_title(f"{metric} vs size, every space")
    _save(fig, path)
