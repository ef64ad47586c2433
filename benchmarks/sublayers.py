"""Attention and MLP dropped separately vs whole blocks on SmolLM2-135M (issue 15).

At the parameter budgets of k = 6 and 9 whole blocks (20% and 30% of the blocks' attention + MLP
parameters), per seed (calibration: ``--nsamples`` random windows x ``--seqlen`` tokens of wikitext2 valid,
drawn with the seed and shared by every method of that seed):

- ``--space layers``: SLEB (one greedy run to max(k); the smaller k is its prefix) and ``evo``;
- ``--space sublayers``: ``evo`` and ``greedy`` (``--greedy-seeds``; screening every candidate on the first
  stage's slice and re-scoring the best ``--greedy-promote`` on the whole set, see
  :mod:`evoprune.search.sublayers.greedy`), plus the EvoPress convention (``--drop-count`` sub-layers) for
  one setting.

Both ``evo`` runs get the same token-layer budget, ``--evo-budget-frac`` x SLEB's token-layers at that k
and seed, the same stages (``--tokens-per-stage``, ``--survivors-per-stage``) and offspring; every search
but SLEB uses the same shared-prefix LRU (``--cache-mb``); SLEB runs as in ``benchmarks/search_cost.py``
(no LRU), in its work directory (``--sleb-work``), so the two benchmarks share those runs. Every result is scored on held-out wikitext2 test and c4,
and seed ``--bench-seed``'s results are timed against the dense model (prefill, decode, KV-cache bytes,
ideal speedup) with ``evoprune.evaluate.bench``. Finished run directories under ``--work`` are reused.

    python benchmarks/sublayers.py --write
    python benchmarks/sublayers.py --seeds 0 --ks 2 --nsamples 1 --seqlen 128 --greedy-seeds 0  # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402
from _runs import MODEL, search, sleb_prefixes  # noqa: E402


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


class Scorer:
    """Held-out perplexity of any result (layers or sub-layers), memoized; one model load."""

    def __init__(self, seqlen: int, windows: int):
        from evoprune import load_model
        from evoprune.data.sources import get_text
        from evoprune.evaluate.perplexity import tokenize_text

        self.lm = load_model(MODEL, progress=False)
        self.seqlen, self.windows = seqlen, windows
        self.ids = {ds: tokenize_text(self.lm.tokenizer, get_text(ds, "eval")) for ds in ("wikitext2", "c4")}
        self.memo: dict = {}

    def __call__(self, attention, mlp, ds: str) -> float:
        from evoprune.evaluate.perplexity import perplexity

        key = (tuple(attention), tuple(mlp), ds)
        if key not in self.memo:
            with self.lm.adapter.skipped(self.lm.model, attention, mlp):
                self.memo[key] = perplexity(self.lm.model, ids=self.ids[ds], seqlen=self.seqlen,
                                            max_windows=self.windows, progress=False).ppl
        return self.memo[key]


def _pattern(r: dict) -> tuple[list[int], list[int]]:
    if "dropped_attention" in r:
        return r["dropped_attention"], r["dropped_mlp"]
    return r["dropped_layers"], r["dropped_layers"]


def _speed(scorer: Scorer, pats: dict, seqlen: int, decode: int, repeats: int) -> dict:
    """Prefill / decode speedup, KV-cache ratio and ideal speedup of each pattern vs the dense model."""
    import copy

    from evoprune.evaluate.bench import bench, speedups
    from evoprune.runner.pruned import apply_sublayers_inplace

    out = {}
    for name, (a, m) in pats.items():
        pruned = copy.copy(scorer.lm)
        pruned.model = copy.deepcopy(scorer.lm.model)
        apply_sublayers_inplace(pruned, a, m)
        shape = dict(batch=1, seqlen=seqlen, decode_tokens=decode, prompt_tokens=16)
        res = bench({"dense": scorer.lm, "pruned": pruned}, **shape, repeats=repeats)
        out[name] = {**speedups(res, **shape), "kv_bytes": res["rows"][1]["kv_cache_bytes"],
                     "dense_kv_bytes": res["rows"][0]["kv_cache_bytes"]}
        del pruned
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/sublayers")
    ap.add_argument("--sleb-work", default="bench_runs/search_cost", help="where SLEB's runs live (shared with "
                    "benchmarks/search_cost.py)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ks", default="6,9", help="whole-block budgets; sub-layers get the same parameter share")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--evo-budget-frac", type=float, default=0.48)
    ap.add_argument("--evo-generations", type=int, default=60, help="cap; the token-layer budget ends evo first")
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument("--tokens-per-stage", default=None, help="default: nsamples*seqlen/4 and the whole set")
    ap.add_argument("--survivors-per-stage", default="4,2")
    ap.add_argument("--greedy-seeds", default="0")
    ap.add_argument("--greedy-ks", default="6")
    ap.add_argument("--greedy-promote", type=int, default=4)
    ap.add_argument("--evopress-count", type=int, default=12, help="EvoPress convention: sub-layers dropped")
    ap.add_argument("--cache-mb", type=float, default=2048.0)
    ap.add_argument("--heldout-seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=8)
    ap.add_argument("--bench-seed", type=int, default=0)
    ap.add_argument("--bench-seqlen", type=int, default=256)
    ap.add_argument("--bench-decode", type=int, default=16)
    ap.add_argument("--bench-repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="write the sublayers section of docs/RESULTS.md")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seeds, ks = _ints(args.seeds), _ints(args.ks)
    full = args.nsamples * args.seqlen
    tps = args.tokens_per_stage or f"{max(2, full // 4)},{full}"
    common = dict(calib="wikitext2", sampling="random", nsamples=args.nsamples, seqlen=args.seqlen,
                  cache_mb=args.cache_mb)
    staged = dict(tokens_per_stage=tps, survivors_per_stage=args.survivors_per_stage, offspring=args.offspring,
                  generations=args.evo_generations)
    res: dict[tuple, dict] = {}
    n = 30
    for seed in seeds:
        # SLEB as benchmarks/search_cost.py runs it (no LRU; the same run directories when --sleb-work is shared)
        nolru = {key: v for key, v in common.items() if key != "cache_mb"}
        for k, r in sleb_prefixes(Path(args.sleb_work), f"sleb_s{seed}", ks, seed=seed, **nolru).items():
            res[("layers SLEB", k, seed)] = r
        for k in ks:
            budget = int(args.evo_budget_frac * res[("layers SLEB", k, seed)]["token_layers"])
            res[("layers evo", k, seed)] = search(work, f"evo_k{k}_s{seed}", method="evo", drop_count=k, seed=seed,
                                                  budget_token_layers=budget, **staged, **common)
            res[("sublayers evo", k, seed)] = search(
                work, f"sub_evo_k{k}_s{seed}", space="sublayers", method="evo", sparsity=k / n, seed=seed,
                budget_token_layers=budget, **staged, **common)
            if seed in _ints(args.greedy_seeds) and k in _ints(args.greedy_ks):
                res[("sublayers greedy", k, seed)] = search(
                    work, f"sub_greedy_k{k}_s{seed}", space="sublayers", method="greedy", sparsity=k / n, seed=seed,
                    tokens_per_stage=tps, survivors_per_stage=f"{args.greedy_promote},1", **common)
        if seed == seeds[0] and args.evopress_count:
            k = ks[0]
            budget = int(args.evo_budget_frac * res[("layers SLEB", k, seed)]["token_layers"])
            res[(f"sublayers evo, {args.evopress_count} sub-layers", k, seed)] = search(
                work, f"sub_evo_count{args.evopress_count}_s{seed}", space="sublayers", method="evo",
                drop_count=args.evopress_count, seed=seed, budget_token_layers=budget, **staged, **common)

    scorer = Scorer(args.heldout_seqlen, args.heldout_windows)
    dense = {ds: scorer((), (), ds) for ds in ("wikitext2", "c4")}
    from evoprune.models.sublayers import sublayer_params

    attn_p, mlp_p = sublayer_params(scorer.lm.adapter, scorer.lm.model)
    total = sum(attn_p) + sum(mlp_p)
    bench_pats = {key: _pattern(r) for key, r in res.items() if key[2] == args.bench_seed}
    speed = _speed(scorer, bench_pats, args.bench_seqlen, args.bench_decode, args.bench_repeats)
    rows, summary = [], []
    for k in ks:
        for key in [x for x in res if x[1] == k]:
            method, _, seed = key
            r = res[key]
            a, m = _pattern(r)
            sleb = res[("layers SLEB", k, seed)]
            share = (sum(attn_p[i] for i in a) + sum(mlp_p[i] for i in m)) / total
            sp = speed.get(key)
            rows.append([method, k, seed, f"{r['calib_loss']:.4f}", f"{scorer(a, m, 'wikitext2'):.2f}",
                         f"{scorer(a, m, 'c4'):.2f}", f"{r['token_layers']:.3g}",
                         f"{r['token_layers'] / sleb['token_layers']:.2f}", r["evaluations"],
                         f"{share:.3f}",
                         f"attn {len(a) - len(set(a) & set(m))}, MLP {len(m) - len(set(a) & set(m))}, "
                         f"blocks {len(set(a) & set(m))}",
                         "-" if sp is None else f"{sp['speedup']['prefill']:.2f} / {sp['speedup']['decode']:.2f} "
                                                f"(ideal {sp['ideal_speedup']:.2f})",
                         "-" if sp is None else f"{sp['kv_cache_ratio']:.2f}"])
    for k in ks:
        for method in ("layers SLEB", "layers evo", "sublayers evo"):
            got = [res[(method, k, s)] for s in seeds if (method, k, s) in res]
            if got:
                wt = [scorer(*_pattern(r), "wikitext2") for r in got]
                c4 = [scorer(*_pattern(r), "c4") for r in got]
                summary.append([method, k, f"{sum(r['calib_loss'] for r in got) / len(got):.4f}",
                                f"{sum(wt) / len(wt):.2f}", f"{sum(c4) / len(c4):.2f}",
                                f"{sum(r['token_layers'] for r in got) / len(got):.3g}"])
    (work / "summary.json").write_text(json.dumps({"dense": dense, "results": {"|".join(map(str, k)): v for k, v in
                                                                                res.items()}, "speed": {
        "|".join(map(str, k)): v for k, v in speed.items()}}, indent=1, default=str))
    body = ("### Sub-layers vs whole blocks at equal parameters (SmolLM2-135M)\n\n"
            f"Calibration: {args.nsamples} random windows x {args.seqlen} tokens of wikitext2 valid per seed (seeds "
            f"{', '.join(map(str, seeds))}), shared by every method of a seed. Budgets: k whole blocks "
            f"(`--space layers --drop-count k`) or k/30 of the blocks' attention + MLP parameters (`--space sublayers "
            f"--sparsity k/30`; the same parameters up to the blocks' norms). Both evo: budget "
            f"{args.evo_budget_frac:g} x SLEB's token-layers at that k and seed, stages {tps}, survivors "
            f"{args.survivors_per_stage}, {args.offspring} offspring. greedy (seeds {args.greedy_seeds}, k "
            f"{args.greedy_ks}): every candidate screened on the first stage's slice, the best "
            f"{args.greedy_promote} re-scored on the whole set. Every search but SLEB (as in the search-cost table): "
            f"shared-prefix LRU {args.cache_mb:g} MiB; "
            f"token-layers count a sub-layer as its share of the block's matmul FLOPs (attention 0.25, MLP 0.75). "
            f"Held-out: wikitext2 test and c4, {args.heldout_windows} windows x {args.heldout_seqlen} tokens; dense "
            f"{dense['wikitext2']:.2f} / {dense['c4']:.2f}. Speed (seed {args.bench_seed}): the pruned model "
            f"(whole blocks removed, the rest sliced to zero attention groups / MLP channels) vs dense, prefill "
            f"1 x {args.bench_seqlen} tokens / decode {args.bench_decode} tokens, median of {args.bench_repeats}, "
            f"measured/ideal (decoder-block FLOPs); KV: cache bytes after the prefill, pruned / dense.\n\n"
            + md_table(["method", "k", "seed", "calib loss", "wikitext2 ppl", "c4 ppl", "token-layers", "vs SLEB",
                        "evals", "params removed", "what was dropped", "speedup prefill / decode", "KV"], rows)
            + "\n\nMeans over seeds:\n\n"
            + md_table(["method", "k", "calib loss", "wikitext2 ppl", "c4 ppl", "token-layers"], summary))
    print(body)
    if args.write:
        write_section("sublayers", body)


if __name__ == "__main__":
    main()
