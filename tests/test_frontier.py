"""Ranking runs across spaces: the Pareto fronts and the best run at each budget (report.frontier)."""
from __future__ import annotations

from evoprune.report.frontier import best_per_budget, pareto, quality_metric, value
from evoprune.report.runs import eval_metrics


def _row(name, params, sparsity, ppl=None, decode=None, loss=4.0):
    metrics = {**({"wikitext2 ppl": ppl} if ppl is not None else {}), **({"decode tok/s": decode} if decode else {})}
    return {"name": name, "params": params, "param_sparsity": sparsity, "calib_loss": loss, "metrics": metrics,
            "method": name.split("_")[0]}


def test_front_and_best_across_spaces():
    rows = [_row("layers_20", 110e6, 0.20, 86.0, decode=50.0), _row("width_20", 108e6, 0.21, 70.0, decode=40.0),
            _row("levels_20", 108e6, 0.19, 75.0), _row("layers_30", 99e6, 0.30, 140.0, decode=60.0),
            _row("width_30", 97e6, 0.30, 97.0, decode=45.0), _row("old_run", None, None, 60.0)]
    assert quality_metric(rows) == "wikitext2 ppl" and quality_metric([_row("a", 1, 0.2)]) == "calib loss"
    front = pareto(rows, lambda r: r["params"], lambda r: value(r, "wikitext2 ppl"))
    assert [r["name"] for r in front] == ["width_30", "width_20"]  # levels_20: same size as width_20, worse
    speed = pareto(rows, lambda r: -r["metrics"].get("decode tok/s", 0) or None, lambda r: value(r, "wikitext2 ppl"))
    assert [r["name"] for r in speed] == ["layers_30", "layers_20", "width_20"]  # width_30: slower and worse than layers_20
    best = best_per_budget(rows, "wikitext2 ppl")
    assert [(b["budget"], b["run"]) for b in best] == [(0.2, "width_20"), (0.3, "width_30")]


def test_bench_files_give_the_pruned_speed():
    bench = {"rows": [{"name": "dense", "decode_tok_s": 30.0, "prefill_tok_s": 900.0},
                      {"name": "pruned", "decode_tok_s": 41.5, "prefill_tok_s": 1200.0}], "speedup": {"decode": 1.38}}
    assert eval_metrics(bench) == {"decode tok/s": 41.5, "prefill tok/s": 1200.0}
    # a --ppl-json entry may carry a measured speed beside the perplexities
    assert eval_metrics({"wikitext2": 70.5, "decode tok/s": 41.5}) == {"wikitext2 ppl": 70.5, "decode tok/s": 41.5}
