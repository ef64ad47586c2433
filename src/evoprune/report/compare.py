"""``evoprune compare RUN...``: calibration loss, held-out perplexity, accuracy and speed across runs and spaces.

Owns :func:`compare_runs` (``DIR/compare.png``, ``DIR/front.png`` and ``DIR/compare.md``, one table row per run,
then the Pareto fronts of quality against parameters and against decode speed, and the best run at each
budget, across every space: :mod:`.frontier`). Speeds come from ``evoprune bench RUN --out
RUN/eval_bench.json``. Held-out numbers come from ``RUN/eval_*.json`` files and from ``--ppl-json FILE`` mapping a run (as given on the
command line, its path, or its directory name) to ``{"wikitext2": ppl, ...}``; a ``"dense"`` entry is
drawn at sparsity 0.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_text
from .frontier import BUDGET_STEP, best_per_budget, pareto, quality_metric, value
from .plots import plot_compare, plot_front
from .runs import eval_metrics, is_acc, load_run, read_eval_files
from .tables import fmt, fmt_layers, md_table

__all__ = ["compare_runs"]


def _ppl_map(path) -> dict:
    if path is None:
        return {}
    if not str(path).strip():
        raise UserError("--ppl-json must not be empty")
    if Path(path).is_dir():
        raise UserError(f"--ppl-json {path} is a directory; give a JSON file")
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

    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()[:10]
    except OSError:
        return None


def _so_far(run: dict) -> dict:
    """The result fields ``compare`` shows, of an unfinished run: its best candidate so far and its counters."""
    cfg, best, hist = run["config"], run["best"] or {}, run["history"]
    c = cfg.get("calibration") or {}
    k, n = run["k"], run["n"]
    sparsity = (cfg.get("budget") or {}).get("sparsity")
    loss = best.get("loss")
    samples = c.get("nsamples") if c.get("sampling") == "random" else \
        (c.get("clusters") or 0) * (c.get("samples_per_cluster") or 0)
    return {"method": cfg.get("method"), "model": (cfg.get("model") or {}).get("model"),
            "sparsity": sparsity if sparsity is not None else (k / n if k and n else None), "k": k, "n_layers": n,
            "dropped_layers": best.get("dropped"), "calib_loss": loss,
            "calib_ppl": math.exp(loss) if loss is not None and math.isfinite(loss) else None,
            "evaluations": len(hist), "token_layers": hist[-1].get("token_layers") if hist else 0, "wall_s": None,
            "calib": {"source": c.get("calib") if not c.get("calib_from") else f"run:{c.get('calib_from')}",
                      "samples": samples, "seqlen": c.get("seqlen")}}


def _rows(runs: list[str], mapping: dict) -> tuple[list[dict], set]:
    """One table row per run (an unfinished run: its best so far), and the ``--ppl-json`` keys they used."""
    used = set()
    rows = []
    for arg in runs:
        run = load_run(arg)
        res = run["result"] if run["finished"] else _so_far(run)
        if not run["finished"]:
            print(f"note: run {arg} is unfinished, {run['status']}: showing its best candidate so far",
                  file=sys.stderr)
        metrics = read_eval_files(run["path"])
        key = _lookup(mapping, arg, run["path"])
        if key is not None:
            used.add(key)
            metrics.update(eval_metrics(mapping[key]))
        calib = res.get("calib") or {}
        space = run["config"].get("space", "layers")
        method = res.get("method") if space == "layers" else f"{space} {res.get('method')}"
        rows.append({"run": str(arg), "name": run["path"].name + ("" if run["finished"] else " (unfinished)"),
                     "status": run["status"], "method": method, "model": res.get("model"),
                     "sparsity": res.get("sparsity"), "k": res.get("k"), "n_layers": res.get("n_layers"),
                     "dropped_layers": res.get("dropped_layers"), "calib_loss": res.get("calib_loss"),
                     "calib_ppl": res.get("calib_ppl"), "evaluations": res.get("evaluations"),
                     "token_layers": res.get("token_layers"), "wall_s": res.get("wall_s"),
                     "calib": f"{calib.get('source')} {calib.get('samples')}x{calib.get('seqlen')}",
                     "calib_sha1": _sha1(run["path"] / "calib.pt"), "params": res.get("params"),
                     "params_dense": res.get("params_dense"), "param_sparsity": res.get("param_sparsity"),
                     "metrics": metrics})
    return rows, used


def compare_runs(runs: list[str], out, ppl_json=None) -> dict:
    """One figure (``compare.png``), the Pareto front across spaces (``front.png``) and one table (``compare.md``)
    over runs; an unfinished run (in progress or interrupted) shows its best candidate so far, marked, and is named
    on stderr. Returns the rows, the fronts and the best run at each budget (:mod:`.frontier`)."""
    if not runs:
        raise UserError("compare needs at least one run directory")
    mapping = _ppl_map(ppl_json)
    rows, used = _rows(runs, mapping)
    dense = None
    for key in mapping:
        if key not in used and key.lower() == "dense":
            dense = eval_metrics(mapping[key])
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
    # the figure shows perplexities, speeds and the mean accuracy; the table shows everything
    fig_metrics = [m for m in metric_names if not is_acc(m)] + [m for m in metric_names if m == "mean acc"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png, front_png, md = out / "compare.png", out / "front.png", out / "compare.md"
    plot_compare(rows, fig_metrics, dense, png)
    quality = quality_metric(rows)
    fronts = {"params": pareto(rows, lambda r: r["params"], lambda r: value(r, quality)),
              "decode": pareto(rows, lambda r: -r["metrics"]["decode tok/s"] if "decode tok/s" in r["metrics"]
                               else None, lambda r: value(r, quality))}
    best = best_per_budget(rows, quality)
    plot_front(rows, quality, fronts["params"], dense, front_png)
    methods = sorted({str(r["method"]) for r in rows})
    table_md = _table(rows, metric_names, dense)
    atomic_write_text(md, _markdown(rows, methods, table_md, quality, fronts, best, png.name, front_png.name))
    return {"figure": str(png), "front_figure": str(front_png), "table": str(md), "methods": methods,
            "metrics": metric_names, "rows": rows, "dense": dense, "quality": quality,
            "table_markdown": table_md + "\n\n" + _ranking(quality, fronts, best, None),
            "front": {k: [r["name"] for r in v] for k, v in fronts.items()},
            "best": [{"budget": b["budget"], "run": b["run"], quality: value(b["row"], quality),
                      "params": b["row"]["params"], "method": b["row"]["method"]} for b in best]}


def _table(rows: list[dict], metric_names: list[str], dense: dict | None) -> str:
    head = ["method", "model", "sparsity", "k / n", "dropped layers", "params", "calib loss", "calib ppl",
            *metric_names, "evaluations", "token-layers", "calibration", "run"]
    table = []
    if dense:
        table.append(["dense", "", "0%", "0", "-", "-", "-", "-",
                      *[fmt(dense.get(m), ".4f" if is_acc(m) else ".2f") for m in metric_names], "", "", "", ""])
    for r in rows:
        table.append([str(r["method"]), str(r["model"]),
                      "-" if r["sparsity"] is None else fmt(100 * r["sparsity"], ".1f") + "%",
                      "-" if r["k"] is None else f"{r['k']} / {r['n_layers']}", fmt_layers(r["dropped_layers"]), _mparams(r["params"]),
                      fmt(r["calib_loss"], ".4f"), fmt(r["calib_ppl"], ".2f"),
                      *[fmt(r["metrics"].get(m), ".4f" if is_acc(m) else ".2f") for m in metric_names],
                      str(r["evaluations"]), fmt(r["token_layers"], ".3g"),
                      r["calib"] + (f" ({r['calib_sha1']})" if r["calib_sha1"] else ""), r["name"]])
    return md_table(head, table)


def _mparams(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def _markdown(rows, methods, table_md: str, quality: str, fronts: dict, best: list, png: str, front_png: str) -> str:
    calibs = {r["calib_sha1"] or r["calib"] for r in rows}
    note = ("" if len(calibs) <= 1 else
            "\n\nNote: the runs use different calibration sets (their calib.pt files differ), so their calibration "
            "losses are not directly comparable.")
    if any(r["name"].endswith(" (unfinished)") for r in rows):
        note += ("\n\nA run marked (unfinished) is still in progress or was interrupted: its row is its best "
                 "candidate so far.")
    return "\n\n".join([f"# evoprune compare: {', '.join(methods)}", f"![compare]({png})", table_md,
                        "calib loss: mean token NLL on each run's calibration set (lower is better); ppl columns: "
                        "held-out perplexity; acc columns: zero-shot accuracy; tok/s: `evoprune bench` of the pruned "
                        "model." + note, _ranking(quality, fronts, best, front_png)]) + "\n"


def _ranking(quality: str, fronts: dict, best: list, front_png: str | None) -> str:
    """The Pareto fronts and the best run at each budget, as markdown (``front_png``: the figure to link)."""
    parts = [f"## Pareto front: {quality} against parameters"] + ([f"![front]({front_png})"] if front_png else [])
    if fronts["params"]:
        parts.append("No other run is both smaller and better than these (runs without a parameter count or "
                     f"{quality} are left out):\n\n" + md_table(
                         ["run", "method", "params", quality],
                         [[r["name"], str(r["method"]), _mparams(r["params"]), fmt(value(r, quality), ".4g")]
                          for r in fronts["params"]]))
    else:
        parts.append(f"No run has both a parameter count and {quality}.")
    if fronts["decode"]:
        parts += [f"## Pareto front: {quality} against decode speed",
                  md_table(["run", "method", "decode tok/s", quality],
                           [[r["name"], str(r["method"]), fmt(r["metrics"]["decode tok/s"], ".1f"),
                             fmt(value(r, quality), ".4g")] for r in fronts["decode"]])]
    if best:
        parts += ["## Best run at each budget",
                  f"Budget: the share of the blocks' attention and MLP parameters removed, to the nearest "
                  f"{100 * BUDGET_STEP:g}%; best: lowest {quality}.\n\n" + md_table(
                      ["budget", "run", "method", "params", quality],
                      [[f"{100 * b['budget']:g}%", b["run"], str(b["row"]["method"]), _mparams(b["row"]["params"]),
                        fmt(value(b["row"], quality), ".4g")] for b in best])]
    return "\n\n".join(parts)
