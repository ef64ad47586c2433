"""``evoprune compare RUN...``: calibration loss, held-out perplexity and accuracy against sparsity across runs.

Owns :func:`compare_runs` (``DIR/compare.png`` and ``DIR/compare.md``, one table row per run). Held-out
numbers come from ``RUN/eval_*.json`` files and from ``--ppl-json FILE`` mapping a run (as given on the
command line, its path, or its directory name) to ``{"wikitext2": ppl, ...}``; a ``"dense"`` entry is
drawn at sparsity 0.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from ..errors import UserError
from .plots import plot_compare
from .runs import eval_metrics, is_acc, load_run, read_eval_files
from .tables import fmt, fmt_layers, md_table

__all__ = ["compare_runs"]


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

    try:
        return hashlib.sha1(path.read_bytes()).hexdigest()[:10]
    except OSError:
        return None


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
            metrics.update(eval_metrics(mapping[key]))
        calib = res.get("calib") or {}
        space = run["config"].get("space", "layers")
        method = res.get("method") if space == "layers" else f"{space} {res.get('method')}"
        rows.append({"run": str(arg), "name": run["path"].name, "method": method, "model": res.get("model"),
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
    # the figure shows perplexities and the mean accuracy; the table shows everything
    fig_metrics = [m for m in metric_names if not is_acc(m)] + [m for m in metric_names if m == "mean acc"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png, md = out / "compare.png", out / "compare.md"
    plot_compare(rows, fig_metrics, dense, png)
    head = ["method", "model", "sparsity", "k / n", "dropped layers", "calib loss", "calib ppl", *metric_names,
            "evaluations", "token-layers", "calibration", "run"]
    table = []
    if dense:
        table.append(["dense", "", "0%", "0", "-", "-", "-",
                      *[fmt(dense.get(m), ".4f" if is_acc(m) else ".2f") for m in metric_names], "", "", "", ""])
    for r in rows:
        table.append([str(r["method"]), str(r["model"]), fmt(100 * r["sparsity"], ".1f") + "%",
                      f"{r['k']} / {r['n_layers']}", fmt_layers(r["dropped_layers"]), fmt(r["calib_loss"], ".4f"),
                      fmt(r["calib_ppl"], ".2f"),
                      *[fmt(r["metrics"].get(m), ".4f" if is_acc(m) else ".2f") for m in metric_names],
                      str(r["evaluations"]), fmt(r["token_layers"], ".3g"),
                      r["calib"] + (f" ({r['calib_sha1']})" if r["calib_sha1"] else ""), r["name"]])
    methods = sorted({str(r["method"]) for r in rows})
    calibs = {r["calib_sha1"] or r["calib"] for r in rows}
    note = ("" if len(calibs) <= 1 else
            "\n\nNote: the runs use different calibration sets (their calib.pt files differ), so their calibration "
            "losses are not directly comparable.")
    table_md = md_table(head, table)
    md.write_text(f"# evoprune compare: {', '.join(methods)}\n\n![compare]({png.name})\n\n"
                  + table_md
                  + "\n\ncalib loss: mean token NLL on each run's calibration set (lower is better); ppl columns: "
                    "held-out perplexity; acc columns: zero-shot accuracy."
                  + note + "\n")
    return {"figure": str(png), "table": str(md), "methods": methods, "metrics": metric_names, "rows": rows,
            "dense": dense, "table_markdown": table_md}
