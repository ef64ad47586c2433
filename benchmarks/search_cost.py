"""Search cost vs quality on SmolLM2-135M (issue 4): sleb, evop, evo, random at k = 6 and 9.

For every seed, all methods share the seed's calibration set (wikitext2 valid,
``--nsamples`` random windows x ``--seqlen`` tokens). Reports final
calibration loss, held-out wikitext2-test perplexity (``--heldout-windows``
windows x ``--heldout-seqlen`` tokens), ``token_layers``, evaluations and wall
seconds, plus, from one ``evo`` run, naive vs cached evaluation of the same
candidates (wall-time ratio, max relative loss difference, token-layer ratio).
SLEB runs once per seed to ``max(ks)``; the k < max result is its greedy prefix
(SLEB is prefix-stable), charged the token-layers spent up to that step.
``evo`` runs with ``--budget-token-layers`` = ``--evo-budget-frac`` x SLEB's
token-layers at the same k and seed (the target is <= 50%), so its generation
count only caps it. ``evop`` and ``random`` get the token-layers ``evo`` actually
spent (compute-matched); ``--baseline-seeds`` limits them to some seeds.

Every search is a real run directory under ``--work`` (re-running resumes /
reuses finished ones). Prints the markdown; ``--write`` also writes the
``search-cost`` section of docs/RESULTS.md.

    python benchmarks/search_cost.py --write
    python benchmarks/search_cost.py --seeds 0 --ks 2 --methods evo,sleb --nsamples 1 --seqlen 64  # smoke
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402
from _runs import HeldOut, search, sleb_prefixes  # noqa: E402

from evoprune.spaces import DropPattern  # noqa: E402
from evoprune.runner.rundir import RunDir  # noqa: E402
from evoprune.runner.config import SearchConfig  # noqa: E402
from evoprune.runner.problems.common import stage_slices, stage_tokens  # noqa: E402

METHODS = ("sleb", "evop", "evo", "random")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def naive_vs_cached(run: Path, lm, n: int, cache_mb: float) -> dict:
    """Evaluate the first ``n`` full-stage candidates of an evo run naively and with the caches; time both."""
    import torch

    from evoprune.data.calibration import CalibSet
    from evoprune.fitness import NLLEvaluator

    rd = RunDir(run)
    calib = CalibSet.load(rd.calib_path)
    rows = rd.read_history()
    last = max(r.get("stage", 0) for r in rows)
    pats = [DropPattern(lm.n_layers, tuple(r["dropped"])) for r in rows if r.get("stage", 0) == last][:n]
    out = {}
    with torch.no_grad():
        for name, kw in (("naive", dict(prefix_cache=False)), ("cached", dict(prefix_cache=True, cache_mb=cache_mb))):
            ev = NLLEvaluator(lm, calib, **kw)
            t = time.time()
            res = [ev.evaluate(p) for p in pats]
            out[name] = {"wall_s": time.time() - t, "losses": [r.loss for r in res],
                         "token_layers": ev.spent_token_layers}
    rel = max(abs(a - b) / abs(a) for a, b in zip(out["naive"]["losses"], out["cached"]["losses"]))
    return {"n": len(pats), "naive_s": out["naive"]["wall_s"], "cached_s": out["cached"]["wall_s"],
            "ratio": out["cached"]["wall_s"] / out["naive"]["wall_s"], "max_rel_diff": rel,
            "tl_ratio": out["cached"]["token_layers"] / out["naive"]["token_layers"]}


def per_eval_ratio(run: Path, n_layers: int, k: int) -> tuple[float, float]:
    """(sum of evaluation token-layers / sum of a naive forward of each candidate on its stage's slice,
    run total incl. setup / (evaluations x a naive forward on the whole set))."""
    rd = RunDir(run)
    rows, res = rd.read_history(), rd.read_result()
    cfg = SearchConfig.from_dict(rd.read_config())
    slices = stage_slices(stage_tokens(cfg.method_options), res["calib"]["samples"], res["calib"]["seqlen"])
    # a naive forward of each candidate runs all its kept blocks on its stage's slice (greedy-phase candidates
    # drop fewer than k blocks, so they keep more)
    naive = sum(slices[r.get("stage", -1)][0] * slices[r.get("stage", -1)][1] * (n_layers - len(r["dropped"]))
                for r in rows)
    full = slices[-1][0] * slices[-1][1] * (n_layers - k)
    return sum(r["eval_token_layers"] for r in rows) / naive, res["token_layers"] / (len(rows) * full)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/search_cost")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ks", default="6,9")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--evop-population", type=int, default=16)
    ap.add_argument("--evop-generations", type=int, default=40, help="cap; the matched budget ends evop first")
    ap.add_argument("--evo-generations", type=int, default=60, help="cap; the token-layer budget ends evo first")
    # the loop stops once the spent token-layers reach the budget, so the last evaluation can overshoot it
    # by up to one full-stage evaluation (~1% of SLEB's cost here): 0.48 keeps the total under 50%
    ap.add_argument("--evo-budget-frac", type=float, default=0.48, help="evo budget: this x SLEB's token-layers")
    ap.add_argument("--baseline-seeds", default=None, help="seeds for evop/random (default: all)")
    ap.add_argument("--baseline-ks", default=None, help="ks for evop/random (default: all)")
    ap.add_argument("--evo-offspring", type=int, default=16)
    ap.add_argument("--tokens-per-stage", default=None, help="evo stages (default: nsamples*seqlen/4 and the whole set)")
    ap.add_argument("--survivors-per-stage", default="4,2")
    ap.add_argument("--cache-mb", type=float, default=4096.0)
    ap.add_argument("--heldout-seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=16)
    ap.add_argument("--timing-candidates", type=int, default=20)
    ap.add_argument("--write", action="store_true", help="write the search-cost section of docs/RESULTS.md")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds, ks, methods = _ints(args.seeds), _ints(args.ks), args.methods.split(",")
    base_seeds = seeds if args.baseline_seeds is None else _ints(args.baseline_seeds)
    base_ks = ks if args.baseline_ks is None else _ints(args.baseline_ks)
    full = args.nsamples * args.seqlen
    tps = args.tokens_per_stage or f"{max(2, full // 4)},{full}"
    sps = args.survivors_per_stage if "," in tps else args.survivors_per_stage.split(",")[-1]
    common = dict(calib="wikitext2", sampling="random", nsamples=args.nsamples, seqlen=args.seqlen)
    results: dict[tuple, dict] = {}
    for seed in seeds:
        if "sleb" in methods:
            for k, r in sleb_prefixes(work, f"sleb_s{seed}", ks, seed=seed, **common).items():
                results[("sleb", k, seed)] = r
        for k in ks:
            sleb = results.get(("sleb", k, seed))
            if "evo" in methods:
                budget = int(args.evo_budget_frac * sleb["token_layers"]) if sleb else None
                results[("evo", k, seed)] = search(
                    work, f"evo_k{k}_s{seed}", method="evo", drop_count=k, seed=seed, generations=args.evo_generations,
                    offspring=args.evo_offspring, tokens_per_stage=tps, survivors_per_stage=sps,
                    cache_mb=args.cache_mb, budget_token_layers=budget, **common)
            if seed not in base_seeds or k not in base_ks:
                continue
            matched = results.get(("evo", k, seed), {}).get("token_layers")
            if "evop" in methods:
                results[("evop", k, seed)] = search(
                    work, f"evop_k{k}_s{seed}", method="evop", drop_count=k, seed=seed,
                    population=args.evop_population, generations=args.evop_generations,
                    budget_token_layers=matched, **common)
            if "random" in methods:
                results[("random", k, seed)] = search(work, f"random_k{k}_s{seed}", method="random", drop_count=k,
                                                      seed=seed, budget=100000, budget_token_layers=matched, **common)
    held = HeldOut(args.heldout_seqlen, args.heldout_windows)
    n_layers = held.lm.n_layers
    rows, checks = [], []
    for k in ks:
        for seed in seeds:
            sleb = results.get(("sleb", k, seed))
            for m in methods:
                r = results.get((m, k, seed))
                if r is None:
                    continue
                vs = f"{r['token_layers'] / sleb['token_layers']:.2f}" if sleb else "-"
                wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
                rows.append([m, k, seed, f"{r['calib_loss']:.4f}", f"{held(r['dropped_layers']):.2f}",
                             f"{r['token_layers']:.3g}", vs, r["evaluations"], wall,
                             ",".join(map(str, r["dropped_layers"]))])
            evo = results.get(("evo", k, seed))
            if evo and sleb:
                ok_loss = evo["calib_loss"] <= sleb["calib_loss"]
                ok_tl = evo["token_layers"] <= 0.5 * sleb["token_layers"]
                per, tot = per_eval_ratio(work / f"evo_k{k}_s{seed}", n_layers, k)
                checks.append([k, seed, "yes" if ok_loss else "**no**", "yes" if ok_tl else "**no**",
                               f"{per:.2f}", "yes" if per <= 0.6 else "**no**", f"{tot:.2f}"])
    body = ("### Search cost: evo vs baselines (SmolLM2-135M)\n\n"
            f"Calibration: {args.nsamples} random windows x {args.seqlen} tokens of wikitext2 valid (per seed). "
            f"Held-out: wikitext2 test, {args.heldout_windows} windows x {args.heldout_seqlen} tokens. evo: "
            f"budget {args.evo_budget_frac:g} x SLEB's token-layers at the same k and seed (at most "
            f"{args.evo_generations} generations) x {args.evo_offspring} offspring, tokens per stage {tps}, "
            f"survivors {sps}, LRU {args.cache_mb:g} MiB. evop (population {args.evop_population}, at most "
            f"{args.evop_generations} generations) and random: the token-layers evo spent (compute-matched), "
            f"seeds {','.join(map(str, base_seeds))} and k {','.join(map(str, base_ks))} only (CPU time).\n\n"
            + md_table(["method", "k", "seed", "calib loss", "wikitext2 ppl", "token-layers", "vs SLEB", "evals",
                        "wall s", "dropped"], rows))
    if checks:
        body += ("\n\nTargets (evo vs SLEB; per-eval = evaluation token-layers / a naive forward of the same "
                 "candidate on the same slice; run = all token-layers incl. setup / (evaluations x naive full "
                 "forward)):\n\n" + md_table(["k", "seed", "loss <= SLEB", "tl <= 50% SLEB", "per-eval tl ratio",
                                               "<= 0.6", "run tl ratio"], checks))
    if "evo" in methods:
        k0, s0 = ks[0], seeds[0]
        t = naive_vs_cached(work / f"evo_k{k0}_s{s0}", held.lm, args.timing_candidates, args.cache_mb)
        body += (f"\n\nNaive vs cached evaluation of the first {t['n']} full-stage candidates of evo k={k0} "
                 f"seed {s0}, in one process: naive {t['naive_s']:.1f} s, cached {t['cached_s']:.1f} s "
                 f"(ratio {t['ratio']:.2f}; token-layers ratio incl. the cache's dense forward {t['tl_ratio']:.2f}); "
                 f"max relative loss difference {t['max_rel_diff']:.1e}.\n")
    print(body)
    if args.write:
        write_section("search-cost", body)


if __name__ == "__main__":
    main()
