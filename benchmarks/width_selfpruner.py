"""Self-Pruner and its baselines on SmolLM2-135M (issue 6): width pruning at 20/30/40/50%.

For each sparsity: ``uniform`` (Wanda-sp at the same rate everywhere), ``owl``
(OWL allocation, lambda 0.08, M 5), ``evo`` (rate-vector evolution, no LLM) and
``self-pruner`` (the LLM operator: the bundled SmolLM2-135M-Instruct served by
``transformers serve`` on 127.0.0.1; if ``EVOPRUNE_OPERATOR_URL`` and
``EVOPRUNE_OPERATOR_MODEL`` are set, also that endpoint, key from
``OPENAI_API_KEY``), plus the three ablations at 30% (no LLM initialization /
mutation / crossover). All runs share one calibration set (wikitext2 valid,
``--nsamples`` x ``--seqlen`` tokens) and the same K, M, S, N. Each result is
scored on held-out wikitext2 test (``--heldout-windows`` x ``--heldout-seqlen``),
exported as a ``trust_remote_code`` directory, reloaded, and its parameters and
CPU prefill latency (1 x ``--bench-seqlen`` tokens, median of ``--repeats``,
timed alternately with the dense model) reported.

    python benchmarks/width_selfpruner.py --write
    python benchmarks/width_selfpruner.py --sparsities 0.3 --generations 1 --population 4  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import floats, md_table, write_section  # noqa: E402
from _runs import MODEL  # noqa: E402

from evoprune.runner.config import SearchConfig  # noqa: E402
from evoprune.runner.loop import run_search  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/width")
    ap.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    ap.add_argument("--ablation-sparsity", type=float, default=0.3)
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--mutations", type=int, default=4)
    ap.add_argument("--crossovers", type=int, default=4)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--operator-max-tokens", type=int, default=200)
    # transformers serve decodes greedily: a retry of the same prompt gets the same reply
    ap.add_argument("--operator-retries", type=int, default=0)
    ap.add_argument("--heldout-seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=8)
    ap.add_argument("--bench-seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help="write the width-pruning section of docs/RESULTS.md")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = dict(model=MODEL, space="width", calib="wikitext2", sampling="random", nsamples=args.nsamples,
                  seqlen=args.seqlen, seed=args.seed)
    ga = dict(population=args.population, mutations=args.mutations, crossovers=args.crossovers,
              generations=args.generations)

    def run(name, **kw):
        cfg = SearchConfig.build(**common, **kw)
        res = run_search(cfg, work / name, progress=False)
        print(f"  {name}: loss {res['calib_loss']:.4f} evals {res['evaluations']} "
              f"params {res['params']:,} ({res['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        return res

    from evoprune.search.llm.server import start_local_server
    from evoprune import load_model

    lm = load_model(MODEL, progress=False)
    endpoints = []
    if os.environ.get("EVOPRUNE_OPERATOR_URL") and os.environ.get("EVOPRUNE_OPERATOR_MODEL"):
        endpoints.append(("self-pruner (external)", os.environ["EVOPRUNE_OPERATOR_URL"],
                          os.environ["EVOPRUNE_OPERATOR_MODEL"]))
    results: dict[tuple, dict] = {}
    names: dict[tuple, str] = {}
    with start_local_server(lm.path) as srv:
        endpoints.insert(0, ("self-pruner", srv.url, srv.model))
        for beta in floats(args.sparsities):
            tag = f"{int(round(beta * 100))}"
            for m in ("uniform", "owl"):
                names[(m, beta)] = f"{m}_{tag}"
                results[(m, beta)] = run(names[(m, beta)], method=m, sparsity=beta)
            names[("evo", beta)] = f"evo_{tag}"
            results[("evo", beta)] = run(names[("evo", beta)], method="evo", sparsity=beta, **ga)
            for label, url, model in endpoints:
                key = (label, beta)
                names[key] = f"{label.replace(' ', '_').replace('(', '').replace(')', '')}_{tag}"
                results[key] = run(names[key], method="self-pruner", sparsity=beta, operator_url=url,
                                   operator_model=model, operator_max_tokens=args.operator_max_tokens,
                                   operator_retries=args.operator_retries, **ga)
        beta = args.ablation_sparsity
        for flag in ("llm_init", "llm_mutation", "llm_crossover"):
            label = f"self-pruner w/o {flag.split('_')[1]}"
            names[(label, beta)] = f"ablate_{flag}_{int(round(beta * 100))}"
            results[(label, beta)] = run(names[(label, beta)], method="self-pruner", sparsity=beta,
                                         operator_url=srv.url, operator_model=srv.model,
                                         operator_max_tokens=args.operator_max_tokens,
                                         operator_retries=args.operator_retries, **{flag: False}, **ga)

    # held-out perplexity, export, params, prefill latency
    from evoprune.data.sources import get_text
    from evoprune.evaluate.bench import bench
    from evoprune.evaluate.perplexity import perplexity, tokenize_text
    from evoprune.export import export_width
    from evoprune.models.slicing import width_masked
    from evoprune.runner.rundir import RunDir, width_plan

    ids = tokenize_text(lm.tokenizer, get_text("wikitext2", "eval"))

    def ppl(ctx=None):
        import contextlib

        with ctx or contextlib.nullcontext():
            return perplexity(lm.model, ids=ids, seqlen=args.heldout_seqlen, max_windows=args.heldout_windows,
                              progress=False).ppl

    dense_ppl = ppl()
    rows = []
    exports = work / "exports"
    for key, res in results.items():
        label, beta = key
        rd = RunDir(work / names[key])
        plan = width_plan(rd, lm)
        held = ppl(width_masked(lm.model, plan))
        out = exports / names[key]
        if out.exists():
            shutil.rmtree(out)
        rec = export_width(lm, plan, out)
        pruned = load_model(str(out), progress=False)
        b = bench({"dense": lm, "pruned": pruned}, seqlen=args.bench_seqlen, decode_tokens=4, repeats=args.repeats)
        dense_ms, pr_ms = (r["prefill_ms"] for r in b["rows"])
        llm = res.get("llm")
        llm_txt = (f"{llm['used']}/{llm['used'] + llm['fallback']} used ({llm['calls']} calls, "
                   f"{llm['valid'] + llm['repaired']} valid of {llm['proposals']} parsed)") if llm else "-"
        rows.append([label, f"{beta:.0%}", f"{res['calib_loss']:.3f}", f"{held:.2f}", f"{rec['params'] / 1e6:.2f}M",
                     f"{rec['params'] / rec['params_dense']:.3f}", f"{pr_ms:.0f} / {dense_ms:.0f}",
                     f"{dense_ms / pr_ms:.2f}x", res["evaluations"], llm_txt,
                     f"{min(res['rates']):.2f}-{max(res['rates']):.2f}"])
        print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
        del pruned
    (work / "summary.json").write_text(json.dumps({"dense_ppl": dense_ppl, "rows": rows}, indent=1))
    body = ("### Width pruning: uniform Wanda-sp, OWL, evo and Self-Pruner (SmolLM2-135M)\n\n"
            f"Calibration: {args.nsamples} random windows x {args.seqlen} tokens of wikitext2 valid (shared). "
            f"Searches: K={args.population}, M={args.mutations}, S={args.crossovers}, N={args.generations} "
            f"(K + N(M+S) = {args.population + args.generations * (args.mutations + args.crossovers)} evaluations). "
            f"Operator: SmolLM2-135M-Instruct via `transformers serve` (greedy; reply cap "
            f"{args.operator_max_tokens} tokens){' and ' + endpoints[1][2] if len(endpoints) > 1 else ''}. "
            f"Held-out: wikitext2 test, {args.heldout_windows} windows x {args.heldout_seqlen} tokens; dense "
            f"ppl {dense_ppl:.2f}. Params: whole exported model (embeddings and LM head are not pruned); "
            f"latency: prefill of 1 x {args.bench_seqlen} tokens, median of {args.repeats}, pruned / dense ms.\n\n"
            + md_table(["method", "sparsity", "calib loss", "wikitext2 ppl", "params", "vs dense", "prefill ms",
                        "speedup", "evals", "LLM proposals", "rate range"], rows))
    print(body)
    if args.write:
        write_section("width-pruning", body)


if __name__ == "__main__":
    main()
