"""Reports of search runs: ``evoprune report RUN`` and ``evoprune compare RUN...``.

Owns :func:`write_report`, :func:`compare_runs`, their commands and
:func:`add_report_parsers`. Reads only the run directory files described in
:mod:`evoprune.record` (no model is loaded, torch is not imported); plots are
drawn with matplotlib's object API on the Agg canvas (no display, no pyplot
state).

``report`` writes, inside ``RUN``:

* ``fitness.png``: calibration loss of every evaluated candidate (the
  population, coloured by generation / SLEB step) and the best-so-far feasible
  loss, against evaluations (left) and token-layers (right). Candidates with
  fewer than ``k`` blocks dropped (SLEB's intermediate steps) are drawn hollow
  and do not count as best-so-far;
* ``pattern.png``: the best candidate as a 1 x N strip of blocks (dropped ones
  dark and crossed) above how often each block is dropped among the ten best
  distinct candidates; for a result with per-layer ``rates`` (width pruning) a
  bar chart of the rates instead;
* ``report.md``: a summary table, the plots, the best candidates, and any
  held-out results found as ``RUN/eval_*.json``.

``compare`` writes ``DIR/compare.png`` (calibration loss, and held-out
perplexity / mean accuracy where known, against sparsity, one line per
method) and ``DIR/compare.md`` (one table row per run). Held-out numbers come
from ``RUN/eval_*.json`` files (``evoprune eval --out`` results, or
``evoprune ppl`` JSON lines) and from ``--ppl-json FILE`` mapping a run (as
given on the command line, its path, or its directory name) to
``{"wikitext2": ppl, ...}``; a ``"dense"`` entry is drawn at sparsity 0.
"""
from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

from .errors import UserError
from .record import WIDTH_SPACES, RunDir

__all__ = ["load_run", "write_report", "compare_runs", "read_eval_files", "cmd_report", "cmd_compare",
           "add_report_parsers"]

TOP_N = 10


# ---------------------------------------------------------------------------------------------------------------
# reading runs


def _n_from_history(hist: list[dict]) -> int | None:
    for r in hist:
        m = re.match(r"L(\d+):", str(r.get("pattern", "")))
        if m:
            return int(m.group(1))
    return None


def load_run(path) -> dict:
    """Config, result (``None`` while running), history and derived ``n``/``k``/best of one run directory."""
    run = RunDir(path)
    cfg = run.read_config()
    res = run.read_result()
    hist = run.read_history()
    n = (res or {}).get("n_layers") or _n_from_history(hist)
    k = (res or {}).get("k")
    width = cfg.get("space") in WIDTH_SPACES  # per-block rates (levels: the fraction each block loses)
    if width:
        n = n or next((len(r["rates"]) for r in hist if r.get("rates")), None)
    if k is None and n and not width:
        if cfg.get("drop_count") is not None:
            k = int(cfg["drop_count"])
        elif cfg.get("sparsity") is not None:
            k = int(math.floor(float(cfg["sparsity"]) * n + 0.5))
    feasible = [r for r in hist if _finite(r.get("loss")) and (k is None or len(r.get("dropped", ())) == k)]
    if width:
        if res is not None:
            best = {"dropped": [], "loss": res.get("calib_loss"), "rates": res.get("rates")}
        elif feasible:
            b = min(feasible, key=lambda r: r["loss"])
            best = {"dropped": [], "loss": b["loss"], "rates": b.get("rates")}
        else:
            best = None
    elif res is not None:
        best = {"dropped": list(res.get("dropped_layers", ())), "loss": res.get("calib_loss"),
                "rates": res.get("rates")}
    elif feasible:
        b = min(feasible, key=lambda r: r["loss"])
        best = {"dropped": list(b["dropped"]), "loss": b["loss"], "rates": None}
    else:
        best = None
    return {"path": run.path, "config": cfg, "result": res, "history": hist, "n": n, "k": k, "best": best,
            "finished": res is not None}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _eval_metrics(obj) -> dict[str, float]:
    """Held-out numbers in one eval JSON object: ``{"wikitext2 ppl": ..., "mean acc": ..., "<task> acc": ...}``."""
    out: dict[str, float] = {}
    if not isinstance(obj, dict):
        return out
    if "tasks" in obj and isinstance(obj["tasks"], dict):  # evoprune eval (zero-shot) result
        for task, v in obj["tasks"].items():
            if isinstance(v, dict) and _finite(v.get("acc")):
                out[f"{task} acc"] = float(v["acc"])
        if _finite(obj.get("mean_acc")):
            out["mean acc"] = float(obj["mean_acc"])
        return out
    if "ppl" in obj and "dataset" in obj:  # evoprune ppl JSON line
        if _finite(obj["ppl"]):
            out[f"{obj['dataset']} ppl"] = float(obj["ppl"])
        return out
    for key, v in obj.items():  # {"wikitext2": ppl, "mean acc": x, ...}
        if isinstance(v, dict):
            out.update(_eval_metrics(v))
        elif _finite(v):
            name = str(key)
            out[name if ("acc" in name or name.endswith("ppl")) else f"{name} ppl"] = float(v)
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
        out.update(_eval_metrics(obj))
    return out


# ---------------------------------------------------------------------------------------------------------------
# formatting


def _fmt_wall(s) -> str:
    if not _finite(s):
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {s % 60:.0f} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def _fmt(x, spec: str) -> str:
    return format(x, spec) if _finite(x) else "-"


def _layers(xs) -> str:
    return ", ".join(str(i) for i in xs) if xs else "-"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [head, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _mpl():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'evoprune[eval]' (or matplotlib)") from None
    return Figure


# ---------------------------------------------------------------------------------------------------------------
# report


def _plot_fitness(run: dict, path: Path) -> None:
    Figure = _mpl()
    from matplotlib import colormaps

    hist, k = run["history"], run["k"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    pts = [r for r in hist if _finite(r.get("loss"))]
    gens = [int(r.get("generation", 0)) for r in pts]
    gmax = max(gens, default=0)
    cmap = colormaps["viridis"]
    method = run["config"].get("method", "?")
    step_name = "step" if method == "sleb" else "generation"
    # best-so-far over feasible candidates (exactly k dropped)
    best, bx_e, bx_t, by = math.inf, [], [], []
    for r in pts:
        if k is None or len(r.get("dropped", ())) == k:
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
            sel = [r for r in pts if (k is None or len(r.get("dropped", ())) == k) == feasible]
            if not sel:
                continue
            colors = [cmap(int(r.get("generation", 0)) / max(gmax, 1)) for r in sel]
            xs, ys = [r[key] for r in sel], [r["loss"] for r in sel]
            if feasible:
                ax.scatter(xs, ys, c=colors, s=18, alpha=0.75, edgecolors="none",
                                label=f"evaluated candidate (k={k})" if k is not None else "evaluated candidate")
            else:
                ax.scatter(xs, ys, facecolors="none", edgecolors=colors, s=18, alpha=0.75, linewidths=0.8,
                           label=f"partial candidate (< {k} dropped)")
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
    fig.suptitle(f"{name}: {method}, {run['config'].get('model', '?')}, drop {k} of {run['n']} blocks"
                 + ("" if run["finished"] else " (in progress)"))
    fig.savefig(path, dpi=110)


def _plot_pattern(run: dict, path: Path) -> None:
    Figure = _mpl()
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
        fig.savefig(path, dpi=110)
        return
    dropped = set(best.get("dropped", ()))
    k = run["k"] or len(dropped)
    top = _top_candidates(run, TOP_N)
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
    ax.set_title(f"best candidate: blocks {_layers(sorted(dropped))} dropped ({len(dropped)} of {n}, dark)"
                 + (f", calib loss {loss:.4f}" if _finite(loss) else ""), fontsize=10)
    ax2.bar(range(n), [counts.get(i, 0) for i in range(n)], color=["#b2182b" if i in dropped else "grey"
                                                                  for i in range(n)])
    ax2.set_ylabel(f"times dropped\nin {len(top)} best", fontsize=8)
    ax2.set_ylim(0, max(1, len(top)))
    ax2.set_xticks(range(n))
    ax2.tick_params(axis="x", labelsize=7 if n > 24 else 8)
    ax2.set_xlabel("block index")
    ax2.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{run['path'].name}: {run['config'].get('method', '?')}, k={k}", fontsize=11)
    fig.savefig(path, dpi=110)


def _top_candidates(run: dict, n: int) -> list[dict]:
    """The ``n`` lowest-loss distinct feasible candidates (first evaluation of each pattern)."""
    seen, rows = set(), []
    for r in run["history"]:
        if not _finite(r.get("loss")) or (run["k"] is not None and len(r.get("dropped", ())) != run["k"]):
            continue
        if r["pattern"] in seen:
            continue
        seen.add(r["pattern"])
        rows.append(r)
    return sorted(rows, key=lambda r: (r["loss"], r["eval"]))[:n]


def _summary_rows(run: dict) -> list[list[str]]:
    cfg, res, best = run["config"], run["result"] or {}, run["best"] or {}
    hist = run["history"]
    n, k = run["n"], run["k"]
    loss = best.get("loss")
    calib = res.get("calib") or {}
    calib_txt = (f"{calib.get('source', cfg.get('calib'))}, {calib.get('sampling', cfg.get('sampling'))}, "
                 f"{calib.get('samples', '?')} x {calib.get('seqlen', cfg.get('seqlen'))} tokens")
    evals = res.get("evaluations", len(hist))
    tl = res.get("token_layers", hist[-1]["token_layers"] if hist else None)
    dense_tl = res.get("dense_token_layers_per_eval")
    rows = [
        ["status", "finished" if run["finished"] else f"in progress ({len(hist)} evaluations so far)"],
        ["method", str(cfg.get("method"))],
        ["model", str(cfg.get("model"))],
        *([["space", f"{cfg.get('space')}: mean rate {cfg.get('sparsity')} over {n} blocks"],
           ["rates", ", ".join(f"{r:.3f}" for r in best.get("rates") or [])],
           ["params", f"{_fmt(res.get('params'), ',.0f')} of {_fmt(res.get('params_dense'), ',.0f')} "
                      f"(prunable: {_fmt(res.get('param_sparsity'), '.1%')} removed)"]]
          if cfg.get("space") in WIDTH_SPACES else
          [["k (dropped / blocks)", f"{k} / {n}" + (f" (sparsity {k / n:.1%})" if k is not None and n else "")],
           ["dropped layers", _layers(sorted(best.get("dropped", ())))]]),
        ["calib loss", _fmt(loss, ".4f")],
        ["calib ppl", _fmt(math.exp(loss), ".2f") if _finite(loss) else "-"],
        ["evaluations", str(evals)],
        ["token-layers", _fmt(tl, ",.0f") + (f" ({tl / dense_tl:.1f} dense-evaluation equivalents)"
                                            if _finite(tl) and _finite(dense_tl) and dense_tl else "")],
        ["wall", _fmt_wall(res.get("wall_s"))],
        ["calibration", calib_txt],
        ["seed", str(cfg.get("seed"))],
    ]
    from .config import METHOD_OPTIONS

    opts = METHOD_OPTIONS.get((cfg.get("space", "layers"), cfg.get("method")), ())
    if opts:
        rows.append(["method options", ", ".join(f"{o}={cfg.get(o)}" for o in opts)])
    return rows


def write_report(path, out_dir=None) -> dict:
    """Write ``report.md``, ``fitness.png`` and ``pattern.png`` for the run at ``path``; returns what was written."""
    run = load_run(path)
    if not run["history"]:
        raise UserError(f"{run['path']}: no evaluations in history.jsonl yet; nothing to report")
    out = Path(out_dir) if out_dir is not None else run["path"]
    out.mkdir(parents=True, exist_ok=True)
    fit_png, pat_png, md = out / "fitness.png", out / "pattern.png", out / "report.md"
    _plot_fitness(run, fit_png)
    _plot_pattern(run, pat_png)
    cfg, best = run["config"], run["best"] or {}
    name = run["path"].name
    k = run["k"]
    n_partial = sum(1 for r in run["history"] if k is not None and len(r.get("dropped", ())) != k)
    parts = [f"# evoprune report: `{name}`", "", f"Run directory: `{run['path']}`", "",
             _md_table(["", ""], _summary_rows(run)), "",
             "## Fitness", "", f"![fitness]({fit_png.name})", "",
             "Each dot is one evaluated candidate (calibration loss = mean token NLL on the calibration set), "
             f"coloured by {'SLEB step' if cfg.get('method') == 'sleb' else 'generation'}; the red step line is the "
             "best loss found so far among candidates that drop exactly k blocks. Left: against evaluations; right: "
             "against token-layers (tokens x decoder blocks actually run, including the one dense pass that builds "
             "the cache)."
             + (f" {n_partial} hollow dots are intermediate candidates with fewer than k blocks dropped." if n_partial
                else ""), "",
             "## Best candidate", ""]
    if best.get("rates"):
        parts += [f"![rates]({pat_png.name})", "", "Per-block pruning rates of the best candidate.", ""]
    else:
        parts += [f"![pattern]({pat_png.name})", "",
                  f"Top: the {run['n']} decoder blocks, the dropped ones dark and crossed. Bottom: how often each "
                  f"block is dropped among the {TOP_N} best distinct candidates (red: dropped in the best).", ""]
    top = _top_candidates(run, 5)
    if top:
        width = "rates" in top[0]
        desc = (lambda r: f"{min(r['rates']):.2f}-{max(r['rates']):.2f}") if width else (lambda r: _layers(r["dropped"]))
        parts += ["### Best candidates", "",
                  _md_table(["rank", "rate range" if width else "dropped layers", "calib loss", "calib ppl",
                             "evaluation #"],
                            [[str(i + 1), desc(r), f"{r['loss']:.4f}", f"{math.exp(r['loss']):.2f}",
                              str(r["eval"])] for i, r in enumerate(top)]), ""]
    evals = read_eval_files(run["path"])
    if evals:
        parts += ["## Held-out evaluations", "", "From `eval_*.json` in the run directory.", "",
                  _md_table(["metric", "value"], [[kk, f"{v:.4f}"] for kk, v in evals.items()]), ""]
    md.write_text("\n".join(parts))
    return {"run": str(run["path"]), "report": str(md), "plots": [str(fit_png), str(pat_png)],
            "finished": run["finished"], "dropped_layers": sorted(best.get("dropped", ())),
            "calib_loss": best.get("loss"), "evaluations": len(run["history"]), "held_out": evals}


# ---------------------------------------------------------------------------------------------------------------
# compare


def _ppl_map(path) -> dict:
    if path is None:
        return {}
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--ppl-json {path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--ppl-json {path}: not JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, dict) for v in obj.values()):
        raise UserError(f"--ppl-json {path}: expected {{run: {{metric: value, ...}}, ...}}")
    return obj


def _lookup(mapping: dict, arg: str, path: Path):
    for key in (arg, str(path), str(path.resolve()), path.name, arg.rstrip("/")):
        if key in mapping:
            return key
    res = path.resolve()
    for key in mapping:
        try:
            if Path(key).resolve() == res:
                return key
        except OSError:
            pass
    return None


def _sha1(path: Path) -> str | None:
    """Short content hash of a run's calib.pt: equal hashes mean the runs scored on the same calibration set."""
    import hashlib

    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()[:10]
    except OSError:
        return None


def _is_acc(metric: str) -> bool:
    return "acc" in metric


def compare_runs(runs: list[str], out, ppl_json=None) -> dict:
    """One figure (``compare.png``) and one table (``compare.md``) over finished runs; returns the rows."""
    if not runs:
        raise UserError("compare needs at least one run directory")
    mapping = _ppl_map(ppl_json)
    used = set()
    rows = []
    for arg in runs:
        run = load_run(arg)
        if not run["finished"]:
            raise UserError(f"{run['path']}: run has no result.json yet (finish it with: evoprune resume {arg})")
        res = run["result"]
        metrics = read_eval_files(run["path"])
        key = _lookup(mapping, arg, run["path"])
        if key is not None:
            used.add(key)
            metrics.update(_eval_metrics(mapping[key]))
        calib = res.get("calib") or {}
        rows.append({"run": str(arg), "name": run["path"].name, "method": res.get("method"), "model": res.get("model"),
                     "sparsity": res.get("sparsity"), "k": res.get("k"), "n_layers": res.get("n_layers"),
                     "dropped_layers": res.get("dropped_layers"), "calib_loss": res.get("calib_loss"),
                     "calib_ppl": res.get("calib_ppl"), "evaluations": res.get("evaluations"),
                     "token_layers": res.get("token_layers"), "wall_s": res.get("wall_s"),
                     "calib": f"{calib.get('source')} {calib.get('samples')}x{calib.get('seqlen')}",
                     "calib_sha1": _sha1(run["path"] / "calib.pt"),
                     "metrics": metrics})
    dense = None
    for key in mapping:
        if key not in used and key.lower() == "dense":
            dense = _eval_metrics(mapping[key])
    unused = [k for k in mapping if k not in used and k.lower() != "dense"]
    if unused:
        print(f"evoprune: warning: --ppl-json entries matching no run: {', '.join(unused)}", file=sys.stderr)
    rows.sort(key=lambda r: (str(r["method"]), r["sparsity"] or 0, r["name"]))
    metric_names = []
    for r in rows:
        for m in r["metrics"]:
            if m not in metric_names:
                metric_names.append(m)
    for m in dense or {}:
        if m not in metric_names:
            metric_names.append(m)
    # the figure shows perplexities and the mean accuracy; the table shows everything
    fig_metrics = [m for m in metric_names if not _is_acc(m)] + [m for m in metric_names if m == "mean acc"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "compare.png", out / "compare.md"
    _plot_compare(rows, fig_metrics, dense, png)
    head = ["method", "model", "sparsity", "k / n", "dropped layers", "calib loss", "calib ppl", *metric_names,
            "evaluations", "token-layers", "calibration", "run"]
    table = []
    if dense:
        table.append(["dense", "", "0%", "0", "-", "-", "-",
                      *[_fmt(dense.get(m), ".4f" if _is_acc(m) else ".2f") for m in metric_names], "", "", "", ""])
    for r in rows:
        table.append([str(r["method"]), str(r["model"]), _fmt(100 * r["sparsity"], ".1f") + "%",
                      f"{r['k']} / {r['n_layers']}", _layers(r["dropped_layers"]), _fmt(r["calib_loss"], ".4f"),
                      _fmt(r["calib_ppl"], ".2f"),
                      *[_fmt(r["metrics"].get(m), ".4f" if _is_acc(m) else ".2f") for m in metric_names],
                      str(r["evaluations"]), _fmt(r["token_layers"], ".3g"),
                      r["calib"] + (f" ({r['calib_sha1']})" if r["calib_sha1"] else ""), r["name"]])
    methods = sorted({str(r["method"]) for r in rows})
    calibs = {r["calib_sha1"] or r["calib"] for r in rows}
    note = ("" if len(calibs) <= 1 else
            "\n\nNote: the runs use different calibration sets (their calib.pt files differ), so their calibration "
            "losses are not directly comparable.")
    table_md = _md_table(head, table)
    md.write_text(f"# evoprune compare: {', '.join(methods)}\n\n![compare]({png.name})\n\n"
                  + table_md
                  + "\n\ncalib loss: mean token NLL on each run's calibration set (lower is better); ppl columns: "
                    "held-out perplexity; acc columns: zero-shot accuracy."
                  + note + "\n")
    return {"figure": str(png), "table": str(md), "methods": methods, "metrics": metric_names, "rows": rows,
            "dense": dense, "table_markdown": table_md}


def _plot_compare(rows: list[dict], metrics: list[str], dense: dict | None, path: Path) -> None:
    Figure = _mpl()

    panels = ["calib loss", *metrics]
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(4.6 * ncol, 3.8 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False, sharex=True).ravel()
    methods = sorted({str(r["method"]) for r in rows})
    markers, styles = "osD^v<>ph", ["-", "--", "-.", ":"]
    for ax, metric in zip(axes, panels):
        for i, m in enumerate(methods):
            pts = sorted((r["sparsity"], r["calib_loss"] if metric == "calib loss" else r["metrics"].get(metric))
                         for r in rows if str(r["method"]) == m)
            pts = [(100 * s, v) for s, v in pts if _finite(s) and _finite(v)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", marker=markers[i % len(markers)],
                        ls=styles[i % len(styles)], ms=7 - (i % 3), alpha=0.9, label=m)
        if dense and _finite(dense.get(metric)):
            ax.plot([0], [dense[metric]], marker="*", color="black", ms=12, ls="none", label="dense")
            ax.axhline(dense[metric], color="black", ls=":", lw=0.8)
        ax.set_xlabel("layer sparsity (% of blocks dropped)")
        ax.tick_params(axis="x", labelbottom=True)
        ax.set_ylabel(metric + (" (higher is better)" if _is_acc(metric) else " (lower is better)"))
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def cmd_report(args) -> int:
    from .cli import _emit

    res = write_report(args.run, args.out)
    print(f"wrote {res['report']} and {len(res['plots'])} plots "
          f"(best: drop {res['dropped_layers']}, calib loss {_fmt(res['calib_loss'], '.4f')})", file=sys.stderr)
    _emit(res)
    return 0


def cmd_compare(args) -> int:
    from .cli import _emit

    res = compare_runs(args.runs, args.out, args.ppl_json)
    print(res.pop("table_markdown"))
    print(f"wrote {res['figure']} and {res['table']}", file=sys.stderr)
    _emit(res)
    return 0


def add_report_parsers(sub) -> None:
    """Register ``evoprune report`` and ``evoprune compare`` on the CLI's subparsers."""
    p = sub.add_parser("report", help="write RUN/report.md with fitness and pattern plots")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="write the report here instead of into RUN")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="calib loss / held-out ppl / accuracy vs sparsity across runs and methods")
    p.add_argument("runs", nargs="+", help="finished run directories")
    p.add_argument("--out", default="compare", help="output directory (default: %(default)s)")
    p.add_argument("--ppl-json", default=None,
                   help='JSON file mapping run -> {"wikitext2": ppl, ...} (a "dense" entry is drawn at sparsity 0)')
    p.set_defaults(func=cmd_compare)
