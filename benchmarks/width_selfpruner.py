"""Self-Pruner and its baselines on SmolLM2-135M (issue 14): width pruning at 30% and 50%, 3 seeds.

Per sparsity and seed, on one calibration set (wikitext2 valid, ``--nsamples`` x ``--seqlen`` tokens,
sampled with the seed):

- one-shot baselines: ``uniform`` Wanda-sp (the published, FLAP-style metric), LLM-Pruner (``uniform``
  with ``--importance taylor``: uniform rates, no recovery) and ``owl`` (lambda 0.08, M 5);
- searches with equal evaluation counts (K + N(M+S)): ``evo`` (no LLM), ``self-pruner`` against llama.cpp's
  server on the bundled SmolLM2-135M-Instruct GGUF with the JSON schema on (``--operator-structured on``),
  ``self-pruner`` with the schema off (the plain-text prompt), and the three ablations of the schema-on
  run (no LLM initialization / mutation / crossover). ``EVOPRUNE_OPERATOR_URL`` and
  ``EVOPRUNE_OPERATOR_MODEL`` add an external endpoint (e.g. vLLM; key from ``OPENAI_API_KEY``).

Every result is scored on held-out wikitext2 test and c4 (``--heldout-windows`` x ``--heldout-seqlen``
each). The LLM's contribution comes from each run's ``result.json`` (``llm``). Finished run directories
under ``--work`` are reused, so an interrupted benchmark continues.

    python benchmarks/width_selfpruner.py --write
    python benchmarks/width_selfpruner.py --sparsities 0.3 --seeds 0 --generations 1 --population 4  # smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import floats, md_table, write_section  # noqa: E402
from _runs import MODEL  # noqa: E402

from evoprune.runner.config import SearchConfig  # noqa: E402
from evoprune.runner.loop import run_search  # noqa: E402

ONE_SHOT = [("uniform Wanda-sp", dict(method="uniform")), ("LLM-Pruner", dict(method="uniform", importance="taylor")),
            ("OWL", dict(method="owl"))]
LLM_VARIANTS = [("self-pruner", {}), ("self-pruner, schema off", dict(operator_structured="off")),
                ("self-pruner w/o LLM init", dict(llm_init=False)),
                ("self-pruner w/o LLM mutation", dict(llm_mutation=False)),
                ("self-pruner w/o LLM crossover", dict(llm_crossover=False))]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/width14")
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--mutations", type=int, default=4)
    ap.add_argument("--crossovers", type=int, default=4)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--operator-retries", type=int, default=1)
    ap.add_argument("--llama-threads", type=int, default=2)
    ap.add_argument("--heldout-seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=4)
    ap.add_argument("--write", action="store_true", help="write the width-pruning section of docs/RESULTS.md")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # the paper's loop as measured (issue 13): every candidate on the whole set, no sensitivity rounds (width
    # evo's defaults since issue 16 add both; self-pruner keeps them off)
    ga = dict(population=args.population, mutations=args.mutations, crossovers=args.crossovers,
              generations=args.generations, tokens_per_stage="none", probe=0.0)
    n_evals = args.population + args.generations * (args.mutations + args.crossovers)

    from evoprune import load_model
    from evoprune.models.loading import gguf_file
    from evoprune.search.llm.server import start_llama_cpp_server

    lm = load_model(MODEL, progress=False)
    results: dict[tuple, dict] = {}  # (label, beta, seed) -> result.json
    dirs: dict[tuple, Path] = {}
    t_start = time.time()
    with start_llama_cpp_server(gguf_file(MODEL), threads=args.llama_threads, log_path=work / "llama_server.log") as srv:
        server = f"llama-cpp-python {srv.version} ({srv.backend}), model {srv.model}"
        endpoints = [("", srv.url, srv.model)]
        if os.environ.get("EVOPRUNE_OPERATOR_URL") and os.environ.get("EVOPRUNE_OPERATOR_MODEL"):
            endpoints.append((" (" + os.environ["EVOPRUNE_OPERATOR_MODEL"] + ")", os.environ["EVOPRUNE_OPERATOR_URL"],
                              os.environ["EVOPRUNE_OPERATOR_MODEL"]))
        for beta in floats(args.sparsities):
            for seed in [int(s) for s in args.seeds.split(",")]:
                # the published methods: kept columns unchanged (the leaderboard measures them with reconstruction)
                common = dict(model=MODEL, space="width", calib="wikitext2", sampling="random",
                              nsamples=args.nsamples, seqlen=args.seqlen, seed=seed, sparsity=beta, reconstruct="none")
                todo = [(label, kw) for label, kw in ONE_SHOT] + [("evo", dict(method="evo", **ga))]
                for suffix, url, model in endpoints:
                    for label, kw in LLM_VARIANTS if not suffix else LLM_VARIANTS[:1]:
                        todo.append((label + suffix, {**dict(method="self-pruner", operator_url=url,
                                                             operator_model=model, operator_structured="on",
                                                             operator_retries=args.operator_retries), **ga, **kw}))
                for label, kw in todo:
                    key = (label, beta, seed)
                    dirs[key] = work / f"{_slug(label)}_{int(round(beta * 100))}_s{seed}"
                    t = time.time()
                    res = run_search(SearchConfig.build(**common, **kw), dirs[key], progress=False)
                    results[key] = res
                    llm = res.get("llm") or {}
                    print(f"  {dirs[key].name}: loss {res['calib_loss']:.4f} evals {res['evaluations']}"
                          + (f" llm used {llm.get('used')}/{llm.get('used', 0) + llm.get('fallback', 0)}"
                             f" usable {llm.get('usable_share')}" if llm else "")
                          + f" ({time.time() - t:.0f} s, total {time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)

    # held-out perplexity of every result
    from evoprune.data.sources import get_text
    from evoprune.evaluate.perplexity import perplexity, tokenize_text
    from evoprune.models.slicing import width_masked
    from evoprune.runner.pruned import width_plan
    from evoprune.runner.rundir import RunDir

    ids = {ds: tokenize_text(lm.tokenizer, get_text(ds, "eval")) for ds in ("wikitext2", "c4")}

    def ppl(ds, ctx=None):
        import contextlib

        with ctx or contextlib.nullcontext():
            return perplexity(lm.model, ids=ids[ds], seqlen=args.heldout_seqlen, max_windows=args.heldout_windows,
                              progress=False).ppl

    dense = {ds: ppl(ds) for ds in ids}
    cache = work / "heldout.json"
    held = json.loads(cache.read_text()) if cache.exists() else {}
    for key, d in dirs.items():
        name = d.name
        want = f"{name}:{results[key]['calib_loss']:.6f}"
        if held.get(name, {}).get("id") != want:
            plan = width_plan(RunDir(d), lm)
            held[name] = {"id": want, **{ds: ppl(ds, width_masked(lm.model, plan)) for ds in ids}}
            cache.write_text(json.dumps(held, indent=1))
        print(f"  {name}: wikitext2 {held[name]['wikitext2']:.2f} c4 {held[name]['c4']:.2f}", file=sys.stderr, flush=True)

    # the prior a small operator's replies carry (a low first value, then 1.0s: projected, block 0 is spared),
    # handed to no search: one vector, block 0 at rate 0 and the others uniform
    from evoprune.data.calibration import CalibSet
    from evoprune.fitness.whole_model import WidthEvaluator
    from evoprune.prune.importance import WidthImportance

    prior = "uniform, block 0 kept"
    for beta in sorted({k[1] for k in results}):
        for seed in sorted({k[2] for k in results}):
            src = dirs.get(("uniform Wanda-sp", beta, seed))
            if src is None:
                continue
            n = lm.n_layers
            rates = [0.0] + [beta * n / (n - 1)] * (n - 1)
            ev = WidthEvaluator(lm, CalibSet.load(src / "calib.pt"), WidthImportance.load(src / "importance.pt"))
            plan = ev.plan(rates)
            name = f"prior_{int(round(beta * 100))}_s{seed}"
            key = (prior, beta, seed)
            results[key] = {"calib_loss": ev.evaluate(rates).loss, "evaluations": 1, "param_sparsity": plan.sparsity}
            dirs[key] = work / name
            if held.get(name, {}).get("id") != f"{name}:{results[key]['calib_loss']:.6f}":
                held[name] = {"id": f"{name}:{results[key]['calib_loss']:.6f}",
                              **{ds: ppl(ds, width_masked(lm.model, plan)) for ds in ids}}
                cache.write_text(json.dumps(held, indent=1))

    labels = list(dict.fromkeys(k[0] for k in results))
    betas = sorted({k[1] for k in results})
    seeds = sorted({k[2] for k in results})

    def per_seed(label, beta, f):
        return [f(results[(label, beta, s)], held[dirs[(label, beta, s)].name]) for s in seeds
                if (label, beta, s) in results]

    def cell(vals, spec):
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        if not vals:
            return "-"
        m = statistics.fmean(vals)
        return f"{m:{spec}}" + (f" ({' / '.join(f'{v:{spec}}' for v in vals)})" if len(vals) > 1 else "")

    rows, llm_rows, raw = [], [], []
    for beta in betas:
        for label in labels:
            if (label, beta, seeds[0]) not in results:
                continue
            loss = per_seed(label, beta, lambda r, h: r["calib_loss"])
            wt = per_seed(label, beta, lambda r, h: h["wikitext2"])
            c4 = per_seed(label, beta, lambda r, h: h["c4"])
            llms = per_seed(label, beta, lambda r, h: r.get("llm"))
            res0 = results[(label, beta, seeds[0])]
            acc = "-"
            if llms and llms[0]:
                tot = {k: sum(x[k] for x in llms) for k in ("proposals", "valid", "repaired", "projected", "invalid",
                                                              "used", "fallback", "evaluated", "top_k", "best_so_far")}
                usable = tot["valid"] + tot["repaired"] + tot["projected"]
                acc = (f"{usable}/{tot['proposals']} usable ({tot['valid']}+{tot['repaired']}+{tot['projected']}); "
                       f"{tot['used']}/{tot['used'] + tot['fallback']} children; "
                       f"top-K {tot['top_k']}, best-so-far {tot['best_so_far']}")
                for kind in ("init", "mutation", "crossover"):
                    k_tot = {k: sum(x["by_kind"][kind][k] for x in llms)
                             for k in ("calls", "replies", "refused", "proposals", "valid", "repaired", "projected",
                                       "invalid", "duplicates", "used", "fallback", "evaluated", "top_k", "best_so_far")}
                    if k_tot["calls"]:
                        miss = sum(x["by_kind"][kind]["miss_sum"] for x in llms)
                        llm_rows.append([label, f"{beta:.0%}", kind, *[str(k_tot[k]) for k in k_tot],
                                         f"{miss / k_tot['projected']:.3f}" if k_tot["projected"] else "-"])
            rows.append([label, f"{beta:.0%}", str(res0["evaluations"]), cell(loss, ".3f"), cell(wt, ".1f"),
                         cell(c4, ".1f"), f"{res0['param_sparsity']:.3f}", acc])
            raw.append({"method": label, "sparsity": beta, "calib_loss": loss, "wikitext2": wt, "c4": c4,
                        "llm": llms, "evaluations": res0["evaluations"]})
    (work / "summary.json").write_text(json.dumps({"dense": dense, "rows": raw, "server": server}, indent=1))
    body = ("### Width pruning: one-shot baselines, evo and Self-Pruner with a schema-enforcing LLM (SmolLM2-135M)\n\n"
            f"Calibration: {args.nsamples} random windows x {args.seqlen} tokens of wikitext2 valid, drawn per seed "
            f"(seeds {', '.join(map(str, seeds))}; every method of a seed shares it). Importance: the published "
            f"Wanda-sp (o_proj / down_proj input columns) except LLM-Pruner (first-order Taylor, vector-wise). "
            f"Searches: K={args.population}, M={args.mutations}, S={args.crossovers}, N={args.generations} "
            f"({n_evals} evaluations each). Operator: {server}, served by `start_llama_cpp_server` "
            f"({args.llama_threads} threads), the paper's prompts, `--operator-structured on` (JSON schema as "
            f"`json_object` + `schema`; rates an enum of 0.00..1.00) unless \"schema off\", temperature 0.7, "
            f"seeded requests, {args.operator_retries} retry. Held-out: wikitext2 test and c4, "
            f"{args.heldout_windows} windows x {args.heldout_seqlen} tokens each; dense ppl "
            f"{dense['wikitext2']:.2f} / {dense['c4']:.2f}. Cells: mean over seeds (per seed). \"pruned\": share of "
            f"the prunable (attention + MLP) parameters removed, seed {seeds[0]}. LLM acceptance summed over seeds: "
            f"usable proposals (valid + repaired + projected) of those parsed; LLM children among the children "
            f"asked of the LLM; LLM children in the final top K and those that were the best so far when evaluated.\n\n"
            + md_table(["method", "sparsity", "evals", "calib loss", "wikitext2 ppl", "c4 ppl", "pruned",
                        "LLM acceptance"], rows)
            + "\n\nThe LLM operator per kind of call (summed over seeds):\n\n"
            + md_table(["method", "sparsity", "kind", "calls", "replies", "refused", "proposals", "valid", "repaired",
                        "projected", "invalid", "duplicates", "used", "fallback", "evaluated", "top K", "best so far",
                        "mean miss of projected"], llm_rows))
    print(body)
    if args.write:
        write_section("width-pruning", body)


if __name__ == "__main__":
    main()
