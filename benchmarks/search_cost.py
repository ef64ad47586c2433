"""Search cost vs quality on SmolLM2-135M (issues 4 and 16): sleb, evo (default options), evop, random.

For every seed, all methods share the seed's calibration set (wikitext2 valid,
``--nsamples`` random windows x ``--seqlen`` tokens). Reports final
calibration loss, held-out wikitext2-test perplexity (``--heldout-windows``
windows x ``--heldout-seqlen`` tokens), ``token_layers``, FLOPs with the LM head
(:mod:`_flops`), evaluations and wall seconds. SLEB runs once per seed to
``max(ks)``; the k < max result is its greedy prefix (SLEB is prefix-stable),
charged the token-layers and FLOPs spent up to that step. ``evo`` runs with its
default options (auto stages, racing, its derived token-layer budget) unless
``--evo-budget-frac`` (x SLEB's token-layers) or stage flags are given. ``evop``
and ``random`` get the token-layers ``evo`` actually spent (compute-matched);
``--baseline-seeds`` limits them to some seeds. ``--timing`` re-runs SLEB (to
the first k) and evo from scratch in this process, one after the other, for the
wall-clock ratio at the same thread count.

Every search is a real run directory under ``--work`` (re-running resumes /
reuses finished ones). Prints the markdown; ``--write`` also writes the
``--section`` section of docs/RESULTS.md.

    python benchmarks/search_cost.py --methods sleb,evo --timing --write
    python benchmarks/search_cost.py --ks 6 --seeds 0 --timing-only --write   # only the wall-clock ratio
    python benchmarks/search_cost.py --methods sleb,evo --ks 6 --seeds 0,1 --nsamples 2 --seqlen 128 \
        --section search-cost-small --work bench_runs/search_cost_small --write
    python benchmarks/search_cost.py --seeds 0 --ks 2 --methods evo,sleb --nsamples 1 --seqlen 64  # smoke
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _flops import per_token, run_flops  # noqa: E402
from _results import md_table, write_section  # noqa: E402
from _runs import HeldOut, search, sleb_prefixes  # noqa: E402

from evoprune.runner.config import SearchConfig  # noqa: E402
from evoprune.runner.problems.common import stage_slices, stage_tokens  # noqa: E402
from evoprune.runner.rundir import RunDir  # noqa: E402
from evoprune.runner.sections import AUTO_CACHE_MB  # noqa: E402

METHODS = ("sleb", "evop", "evo", "random")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def per_eval_ratio(run: Path, n_layers: int, k: int) -> tuple[float, float]:
    """(sum of evaluation token-layers / sum of a naive forward of each candidate on its stage's slice,
    run total incl. setup / (evaluations x a naive forward on the whole set))."""
    rd = RunDir(run)
    rows, res = rd.read_history(), rd.read_result()
    cfg = SearchConfig.from_dict(rd.read_config())
    slices = stage_slices(stage_tokens(cfg.method_options), res["calib"]["samples"], res["calib"]["seqlen"])
    # a naive forward of each candidate runs all its kept blocks on the tokens it scored (greedy-phase
    # candidates drop fewer than k blocks, so they keep more; a raced one scored fewer tokens)
    naive = 0
    for r in rows:
        m, t = slices[r.get("stage", -1)]
        naive += r["tokens"] * t / (t - 1) * (n_layers - len(r["dropped"]))
    full = slices[-1][0] * slices[-1][1] * (n_layers - k)
    return sum(r["eval_token_layers"] for r in rows) / naive, res["token_layers"] / (len(rows) * full)


def sleb_lru_token_layers(run: Path, k: int, lru_mb: float) -> int:
    """Token-layers SLEB's run in ``run`` (made with ``--cache-mb 0``) would have spent up to step ``k`` with a
    shared-prefix LRU of ``lru_mb`` MiB: its candidates replayed through the LRU's bookkeeping (the same
    :class:`PrefixLRU` calls the evaluator makes; SLEB's choices do not depend on its costs)."""
    import json

    from evoprune.fitness.prefix_lru import PrefixLRU

    rows = RunDir(run).read_history()
    entry = json.loads((run / "cache.json").read_text())["entry_bytes"][0]
    res = RunDir(run).read_result()
    n, N = res["calib"]["samples"] * res["calib"]["seqlen"], res["n_layers"]
    lru, tl = PrefixLRU(lru_mb * 2 ** 20, entry), rows[0]["token_layers"] - rows[0]["eval_token_layers"]  # setup
    for r in rows:
        if r["generation"] > k - 1:
            break
        d = tuple(r["dropped"])
        hit = lru.lookup(N, d)
        run_units = [u for u in range(hit[0][0] if hit is not None else d[0], N) if u not in d]
        lru.insert_run(run_units, d, None)
        tl += n * len(run_units)
    return tl


def timing(work: Path, k: int, seed: int, common: dict, evo_kw: dict) -> dict:
    """SLEB to ``k`` and evo, both from scratch in this process (same threads), one after the other."""
    out = {}
    for name, kw in (("sleb", dict(method="sleb", drop_count=k, cache_mb=0.0)), ("evo", dict(method="evo", drop_count=k, **evo_kw))):
        d = work / f"timing_{name}_k{k}_s{seed}"
        shutil.rmtree(d, ignore_errors=True)
        t = time.time()
        res = search(work, d.name, seed=seed, **kw, **common)
        out[name] = {"wall_s": time.time() - t, "token_layers": res["token_layers"], "loss": res["calib_loss"]}
    out["ratio"] = out["evo"]["wall_s"] / out["sleb"]["wall_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/search_cost")
    ap.add_argument("--section", default="search-cost")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ks", default="6,9")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--evop-population", type=int, default=16)
    ap.add_argument("--evop-generations", type=int, default=40, help="cap; the matched budget ends evop first")
    ap.add_argument("--evo-budget-frac", type=float, default=None,
                    help="evo budget: this x SLEB's token-layers (default: evo's own derived budget)")
    ap.add_argument("--target-frac", type=float, default=0.25, help="target: evo token-layers <= this x SLEB's")
    ap.add_argument("--baseline-seeds", default=None, help="seeds for evop/random (default: all)")
    ap.add_argument("--baseline-ks", default=None, help="ks for evop/random (default: all)")
    ap.add_argument("--tokens-per-stage", default=None, help="evo stages (default: evo's auto)")
    ap.add_argument("--survivors-per-stage", default=None)
    ap.add_argument("--cache-mb", type=float, default=None, help="evo's --cache-mb (default: the CLI's, auto)")
    ap.add_argument("--heldout-seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=16)
    ap.add_argument("--timing", action="store_true", help="same-process wall ratio of SLEB and evo (first k, seed)")
    ap.add_argument("--timing-only", action="store_true", help="only that timing (no table); its own section")
    ap.add_argument("--write", action="store_true", help="write the section of docs/RESULTS.md")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds, ks, methods = _ints(args.seeds), _ints(args.ks), args.methods.split(",")
    base_seeds = seeds if args.baseline_seeds is None else _ints(args.baseline_seeds)
    base_ks = ks if args.baseline_ks is None else _ints(args.baseline_ks)
    evo_kw = {} if args.cache_mb is None else {"cache_mb": args.cache_mb}
    lru_txt = "auto" if args.cache_mb is None else f"{args.cache_mb:g} MiB"
    if args.tokens_per_stage:
        evo_kw["tokens_per_stage"] = args.tokens_per_stage
    if args.survivors_per_stage:
        evo_kw["survivors_per_stage"] = args.survivors_per_stage
    common = dict(calib="wikitext2", sampling="random", nsamples=args.nsamples, seqlen=args.seqlen)
    if args.timing_only:
        t = timing(work, ks[0], seeds[0], common, evo_kw)
        body = (f"### Wall clock: default evo vs SLEB, same process (SmolLM2-135M)\n\n"
                f"Calibration: {args.nsamples} random windows x {args.seqlen} tokens of wikitext2 valid, k={ks[0]}, "
                f"seed {seeds[0]}; both searches from scratch, one after the other, in one process with the same "
                f"thread count, nothing else running. evo: default options, LRU {lru_txt}; SLEB: --cache-mb 0 (the dense prefix cache only, as issue 4 ran it).\n\n"
                + md_table(["method", "wall s", "token-layers", "calib loss"],
                           [[m, f"{t[m]['wall_s']:.0f}", f"{t[m]['token_layers']:.3g}", f"{t[m]['loss']:.4f}"]
                            for m in ("sleb", "evo")])
                + f"\n\nWall ratio evo / SLEB: {t['ratio']:.2f} (token-layer ratio "
                  f"{t['evo']['token_layers'] / t['sleb']['token_layers']:.2f}).")
        print(body)
        if args.write:
            write_section("search-cost-timing" if args.section == "search-cost" else args.section, body)
        return
    results: dict[tuple, dict] = {}
    for seed in seeds:
        if "sleb" in methods:
            for k, r in sleb_prefixes(work, f"sleb_s{seed}", ks, seed=seed, cache_mb=0.0, **common).items():
                results[("sleb", k, seed)] = r
        for k in ks:
            sleb = results.get(("sleb", k, seed))
            if "evo" in methods:
                kw = dict(evo_kw)
                if args.evo_budget_frac is not None and sleb:
                    kw["budget_token_layers"] = int(args.evo_budget_frac * sleb["token_layers"])
                results[("evo", k, seed)] = search(work, f"evo_k{k}_s{seed}", method="evo", drop_count=k, seed=seed,
                                                   **kw, **common)
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
    fl = per_token(held.lm)
    rows, checks = [], []
    for k in ks:
        for seed in seeds:
            sleb = results.get(("sleb", k, seed))
            sleb_fl = run_flops(work / f"sleb_s{seed}", fl, n_layers, upto_generation=k - 1) if sleb else None
            for m in methods:
                r = results.get((m, k, seed))
                if r is None:
                    continue
                f = sleb_fl if m == "sleb" else run_flops(work / f"{m}_k{k}_s{seed}", fl, n_layers)
                r["flops"], r["heldout"] = f, held(r["dropped_layers"])
                vs = f"{r['token_layers'] / sleb['token_layers']:.2f}" if sleb else "-"
                fvs = f"{f['total'] / sleb_fl['total']:.2f}" if sleb else "-"
                wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f}"
                rows.append([m, k, seed, f"{r['calib_loss']:.4f}", f"{r['heldout']:.2f}", f"{r['token_layers']:.3g}",
                             vs, f"{f['total']:.3g}", fvs, f"{f['head'] / f['total']:.0%}", r["evaluations"], wall,
                             ",".join(map(str, r["dropped_layers"]))])
            evo = results.get(("evo", k, seed))
            if evo and sleb:
                per, tot = per_eval_ratio(work / f"evo_k{k}_s{seed}", n_layers, k)
                tl = evo["token_layers"] / sleb["token_layers"]
                tl_lru = evo["token_layers"] / sleb_lru_token_layers(work / f"sleb_s{seed}", k, AUTO_CACHE_MB)
                checks.append([k, seed, "yes" if evo["calib_loss"] <= sleb["calib_loss"] else "**no**",
                               f"{tl:.3f}", "yes" if tl <= args.target_frac else "**no**", f"{tl_lru:.3f}",
                               f"{evo['flops']['total'] / sleb_fl['total']:.3f}",
                               "yes" if evo["heldout"] <= sleb["heldout"] else "**no**", f"{per:.2f}", f"{tot:.2f}",
                               "yes" if evo["dropped_layers"] == sleb["dropped_layers"] else "no"])
    budget = ("its default budget" if args.evo_budget_frac is None
              else f"a budget of {args.evo_budget_frac:g} x SLEB's token-layers")
    body = (f"### Search cost: evo (default options) vs baselines (SmolLM2-135M)\n\n"
            f"Calibration: {args.nsamples} random windows x {args.seqlen} tokens of wikitext2 valid (per seed). "
            f"Held-out: wikitext2 test, {args.heldout_windows} windows x {args.heldout_seqlen} tokens. evo: "
            f"{budget}, stages {args.tokens_per_stage or 'auto'}, survivors {args.survivors_per_stage or 'default'}, "
            f"LRU {lru_txt}. SLEB: --cache-mb 0 (the dense prefix cache only, as issue 4 ran it: the reference). FLOPs include the LM head (head = its share). SLEB's rows at k < "
            f"{max(ks)} are the prefixes of one greedy run, charged what it spent up to that step.\n\n"
            + md_table(["method", "k", "seed", "calib loss", "wikitext2 ppl", "token-layers", "vs SLEB", "FLOPs",
                        "FLOPs vs SLEB", "head", "evals", "wall s", "dropped"], rows))
    if checks:
        body += ("\n\nTargets (evo vs SLEB; per-eval = evaluation token-layers / a naive forward of the same "
                 "candidate on the tokens it scored; run = all token-layers incl. setup / (evaluations x naive "
                 "full forward); vs SLEB + LRU: SLEB's token-layers had it run with the default LRU, replayed from its "
                 "history):\n\n"
                 + md_table(["k", "seed", "loss <= SLEB", "tl ratio", f"<= {args.target_frac:g}",
                             f"tl ratio vs SLEB + {AUTO_CACHE_MB:g} MiB LRU", "FLOPs ratio",
                             "held-out <= SLEB", "per-eval tl ratio", "run tl ratio", "= SLEB's pattern"], checks))
    if args.timing and "evo" in methods:
        t = timing(work, ks[0], seeds[0], common, evo_kw)
        body += (f"\n\nWall clock, same process, same thread count, both from scratch (k={ks[0]}, seed "
                 f"{seeds[0]}): SLEB {t['sleb']['wall_s']:.0f} s ({t['sleb']['token_layers']:.3g} token-layers), "
                 f"evo {t['evo']['wall_s']:.0f} s ({t['evo']['token_layers']:.3g}); ratio {t['ratio']:.2f} "
                 f"(token-layers ratio {t['evo']['token_layers'] / t['sleb']['token_layers']:.2f}).\n")
    print(body)
    if args.write:
        write_section(args.section, body)


if __name__ == "__main__":
    main()
