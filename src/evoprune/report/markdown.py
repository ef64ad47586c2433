"""``evoprune report RUN``: ``report.md`` with a summary table, the fitness and pattern plots and the best candidates.

Owns :func:`write_report`. Reads only the run directory; torch is not imported. Runs whose history names
origins (Self-Pruner, width ``evo``) also get ``origin.png``; Self-Pruner runs a table of the LLM operator's
contribution per kind of call.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError, user_input
from ..files import atomic_write_text
from .plots import TOP_N, plot_fitness, plot_origin, plot_pattern
from .runs import is_feasible, load_run, read_eval_files, top_candidates
from .tables import finite, fmt, fmt_layers, fmt_wall, md_table

__all__ = ["write_report"]


def _summary_rows(run: dict) -> list[list[str]]:
    cfg, res, best = run["config"], run["result"] or {}, run["best"] or {}
    hist = run["history"]
    n, k = run["n"], run["k"]
    loss = best.get("loss")
    calib = res.get("calib") or {}
    c = cfg["calibration"]
    calib_txt = (f"{calib.get('source', c['calib'])}, {calib.get('sampling', c['sampling'])}, "
                 f"{calib.get('samples', '?')} x {calib.get('seqlen', c['seqlen'])} tokens")
    evals = res.get("evaluations", len(hist))
    tl = res.get("token_layers", hist[-1]["token_layers"] if hist else None)
    dense_tl = res.get("dense_token_layers_per_eval")
    rows = [
        ["status", "finished" if run["finished"] else f"unfinished, {run['status']}: {len(hist)} evaluations so far"],
        ["method", str(cfg["method"])],
        ["model", str(cfg["model"]["model"])],
        *([["space", f"{cfg['space']}: mean rate {cfg['budget']['sparsity']} over {n} blocks"],
           ["rates", ", ".join(f"{r:.3f}" for r in best.get("rates") or [])],
           ["params", f"{fmt(res.get('params'), ',.0f')} of {fmt(res.get('params_dense'), ',.0f')} "
                      f"(prunable: {fmt(res.get('param_sparsity'), '.1%')} removed)"]]
          if run["width"] else
          [["budget", (f"{k} sub-layers" if cfg["budget"]["drop_count"] is not None else
                       f"{cfg['budget']['sparsity']:.1%} of the block parameters")
            + (f" (removed {res['sparsity']:.1%})" if finite(res.get("sparsity")) else "")],
           ["dropped attention", fmt_layers(sorted(best.get("attention", ())))],
           ["dropped MLP", fmt_layers(sorted(best.get("mlp", ())))],
           ["whole blocks dropped", fmt_layers(sorted(best.get("dropped", ())))]]
          if run["sublayers"] else
          [["k (dropped / blocks)", f"{k} / {n}" + (f" (sparsity {k / n:.1%})" if k is not None and n else "")],
           ["dropped layers", fmt_layers(sorted(best.get("dropped", ())))]]),
        ["calib loss", fmt(loss, ".4f")],
        ["calib ppl", fmt(math.exp(loss), ".2f") if finite(loss) else "-"],
        ["evaluations", str(evals)],
        ["token-layers", fmt(tl, ",.0f") + (f" ({tl / dense_tl:.1f} dense-evaluation equivalents)"
                                            if finite(tl) and finite(dense_tl) and dense_tl else "")],
        ["wall", fmt_wall(res.get("wall_s"))],
        ["calibration", calib_txt],
        ["seed", str(cfg["seed"])],
    ]
    opts = cfg["method_options"]
    if opts:
        rows.append(["method options", ", ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
                                                 for k, v in opts.items())])
    return rows


_LLM_COLS = ("calls", "replies", "refused", "proposals", "valid", "repaired", "projected", "invalid", "duplicates",
             "used", "fallback", "evaluated", "top_k", "best_so_far")


def _llm_section(llm: dict) -> list[str]:
    """What the LLM operator contributed, per kind of call (``result.json``'s ``llm``)."""
    kinds = list(llm["by_kind"].items()) + [("total", llm)]
    rows = [[kind] + [str(d.get(c, 0)) for c in _LLM_COLS] for kind, d in kinds]
    share = llm.get("usable_share")
    return ["## The LLM operator", "",
            f"Structured output: `{llm.get('structured')}`; usable proposals (valid, repaired or projected): "
            + (f"{share:.0%}" if finite(share) else "-")
            + (f"; projected replies missed the sparsity by {llm['miss_sum'] / llm['projected']:.3f} on average"
               if llm.get("projected") else "") + ".", "",
            md_table(["kind", *_LLM_COLS], rows), "",
            "`used`: distinct new children taken from the LLM; `fallback`: children the non-LLM operators made "
            "instead; `top_k`: LLM children in the final population; `best_so_far`: LLM children that improved "
            "the best loss when evaluated." + (f" Note: {llm['note']}." if llm.get("note") else ""), ""]


def write_report(path, out_dir=None) -> dict:
    """Write ``report.md``, ``fitness.png`` and ``pattern.png`` for the run at ``path``; returns what was written."""
    run = load_run(path)
    if not run["history"]:
        raise UserError(f"{run['path']}: no evaluations in history.jsonl yet; nothing to report")
    if out_dir is not None and not str(out_dir).strip():
        raise UserError("--out must not be empty")
    out = Path(out_dir).expanduser() if out_dir is not None else run["path"]
    with user_input("--out directory", out):
        out.mkdir(parents=True, exist_ok=True)
    fit_png, pat_png, md = out / "fitness.png", out / "pattern.png", out / "report.md"
    plot_fitness(run, fit_png)
    plot_pattern(run, pat_png)
    org_png = out / "origin.png"
    has_origin = plot_origin(run, org_png)
    best = run["best"] or {}
    name = run["path"].name
    n_partial = sum(1 for r in run["history"] if not is_feasible(run, r))
    parts = [f"# evoprune report: `{name}`", "", f"Run directory: `{run['path']}`", "",
             md_table(["", ""], _summary_rows(run)), "",
             "## Fitness", "", f"![fitness]({fit_png.name})", "",
             "Each dot is one evaluated candidate (calibration loss = mean token NLL on the calibration set), "
             f"coloured by {run['round_name']}; the red step line is the "
             "best loss found so far among candidates that meet the budget. Left: against evaluations; right: "
             "against token-layers (tokens x decoder blocks actually run, including the one dense pass that builds "
             "the cache)."
             + (f" {n_partial} hollow dots are intermediate candidates below the budget." if n_partial else ""), "",
             "## Best candidate", ""]
    if best.get("rates"):
        parts += [f"![rates]({pat_png.name})", "", "Per-block pruning rates of the best candidate.", ""]
    elif run["sublayers"]:
        parts += [f"![pattern]({pat_png.name})", "",
                  f"Top: the attention and MLP of the {run['n']} decoder blocks, the dropped ones dark. Bottom: how "
                  f"often each is dropped among the {TOP_N} best distinct candidates.", ""]
    else:
        parts += [f"![pattern]({pat_png.name})", "",
                  f"Top: the {run['n']} decoder blocks, the dropped ones dark and crossed. Bottom: how often each "
                  f"block is dropped among the {TOP_N} best distinct candidates (red: dropped in the best).", ""]
    top = top_candidates(run, 5)
    if top:
        width = "rates" in top[0]
        if width:
            desc, head = (lambda r: f"{min(r['rates']):.2f}-{max(r['rates']):.2f}"), "rate range"
        elif run["sublayers"]:
            desc = lambda r: f"attn {fmt_layers(r['dropped_attention'])}; MLP {fmt_layers(r['dropped_mlp'])}"  # noqa: E731
            head = "dropped sub-layers"
        else:
            desc, head = (lambda r: fmt_layers(r["dropped"])), "dropped layers"
        parts += ["### Best candidates", "",
                  md_table(["rank", head, "calib loss", "calib ppl",
                             "evaluation #"],
                            [[str(i + 1), desc(r), f"{r['loss']:.4f}", f"{math.exp(r['loss']):.2f}",
                              str(r["eval"])] for i, r in enumerate(top)]), ""]
    if has_origin:
        parts += ["## Where the candidates came from", "", f"![origin]({org_png.name})", "",
                  "Each evaluated candidate coloured by the operator that made it: `llm-*` were proposed by the LLM "
                  "operator, the others by the non-LLM operators (the fallback when the LLM gives too few).", ""]
    llm = (run["result"] or {}).get("llm")
    if llm and llm.get("by_kind"):
        parts += _llm_section(llm)
    evals = read_eval_files(run["path"])
    if evals:
        parts += ["## Held-out evaluations", "", "From `eval_*.json` in the run directory.", "",
                  md_table(["metric", "value"], [[kk, f"{v:.4f}"] for kk, v in evals.items()]), ""]
    atomic_write_text(md, "\n".join(parts))
    plots = [str(fit_png), str(pat_png)] + ([str(org_png)] if has_origin else [])
    return {"run": str(run["path"]), "report": str(md), "plots": plots,
            "finished": run["finished"], "dropped_layers": sorted(best.get("dropped", ())), "rates": best.get("rates"),
            **({"dropped_attention": best.get("attention"), "dropped_mlp": best.get("mlp")} if run["sublayers"] else {}),
            "calib_loss": best.get("loss"), "evaluations": len(run["history"]), "held_out": evals}
