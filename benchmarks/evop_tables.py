"""EvoP paper analogues on the bundled SmolLM2-135M (issue 3): Fig. 1(a), Tables 2/3, Table 4.

Every search is a real ``run_search`` run directory under ``--work``; held-out
perplexity is computed once per (pattern, dataset). Writes its sections of
docs/RESULTS.md.

    python benchmarks/evop_tables.py --parts fig1,tables,ablation
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402

from _runs import HeldOut, search, sleb_prefixes  # noqa: E402


def fig1(args, work: Path) -> str:
    common = dict(calib="wikitext2", sampling="random", nsamples=args.fig1_samples, seqlen=args.fig1_seqlen, seed=0)
    big = dict(population=args.fig1_big_population, generations=args.fig1_big_generations)
    rows = []

    def cell(r: dict) -> str:
        return f"{r['calib_loss']:.4f} {r['dropped_layers']} ({r['evaluations']} ev)"

    for k in (1, 2, 3):
        ex = search(work, f"fig1-exhaustive-k{k}", method="exhaustive", drop_count=k, force=True, **common)
        sl = search(work, f"fig1-sleb-k{k}", method="sleb", drop_count=k, **common)
        ev = search(work, f"fig1-evop-k{k}", method="evop", drop_count=k, population=args.population,
                    generations=args.generations, calib_from=str(work / f"fig1-exhaustive-k{k}"), **common)
        evb = search(work, f"fig1-evop-big-k{k}", method="evop", drop_count=k, **big,
                     calib_from=str(work / f"fig1-exhaustive-k{k}"), **common)
        opt = ex["calib_loss"]
        rows.append([k, cell(sl), cell(ev), cell(evb), cell(ex),
                     " / ".join("yes" if abs(r["calib_loss"] - opt) < 1e-9 else "no" for r in (sl, ev, evb))])
    body = (f"### Fig. 1(a) analogue: calibration loss vs k (SLEB, EvoP, exhaustive optimum)\n\n"
            f"Calibration: {args.fig1_samples} random window(s) x {args.fig1_seqlen} tokens of wikitext2 valid "
            f"(seed 0), the same set for every method (small so that C(30,3) = 4060 patterns are affordable). "
            f"EvoP at two budgets: population {args.population} x {args.generations} generations (the budget "
            f"used in the tables below) and {big['population']} x {big['generations']}. Each cell: calibration loss "
            f"[dropped blocks] (evaluations).\n\n"
            + md_table(["k", "SLEB", f"EvoP S={args.population} G={args.generations}",
                        f"EvoP S={big['population']} G={big['generations']}", "exhaustive optimum",
                        "optimal? SLEB / EvoP / EvoP-big"], rows))
    return body


def tables(args, work: Path, held: HeldOut, ks=(3, 6, 9)) -> str:
    rows = []
    evop_kw = dict(population=args.population, generations=args.generations)
    for calib in ("wikitext2", "c4"):
        ccds_kw = dict(calib=calib, sampling="ccds", clusters=5, samples_per_cluster=1, seqlen=args.calib_seqlen, seed=0)
        rand_kw = dict(calib=calib, sampling="random", nsamples=5, seqlen=args.calib_seqlen, seed=0)
        sleb = sleb_prefixes(work, f"t2-{calib}-sleb", list(ks), **rand_kw)
        rows.append([calib, "dense", 0, "-", "-", f"{held([], 'wikitext2'):.2f}", f"{held([], 'c4'):.2f}"])
        for k in ks:
            sg = search(work, f"t2-{calib}-shortgpt-k{k}", method="shortgpt", drop_count=k, **rand_kw)
            ev = search(work, f"t2-{calib}-evop-k{k}", method="evop", drop_count=k, **evop_kw, **ccds_kw)
            for name, r in (("SLEB", sleb[k]), ("ShortGPT", sg), ("EvoP (CCDS+EPPS)", ev)):
                d = r["dropped_layers"]
                rows.append([calib, name, k, f"{r['calib_loss']:.4f}", ",".join(map(str, d)),
                             f"{held(d, 'wikitext2'):.2f}", f"{held(d, 'c4'):.2f}"])
    body = (f"### Tables 2/3 analogue: held-out perplexity after dropping k of 30 blocks\n\n"
            f"Calibration: 5 samples x {args.calib_seqlen} tokens (SLEB and ShortGPT: random windows as in SLEB; "
            f"EvoP: CCDS, 5 clusters x 1 sample, all-MiniLM-L6-v2). EvoP: population {args.population}, "
            f"{args.generations} generations, mutation 0.05, elite 0.3, seed 0. SLEB's k=3 and k=6 patterns are the "
            f"first steps of its greedy k=9 run (identical to separate runs). Calibration loss is on each method's own "
            f"calibration set, so compare it only within a method. Held-out: first {held.windows} windows x "
            f"{held.seqlen} tokens of wikitext2 test and of c4 eval docs 0-999.\n\n"
            + md_table(["calib", "method", "k", "calib loss", "dropped", "wikitext2 ppl", "c4 ppl"], rows))
    return body


def ablation(args, work: Path, held: HeldOut, ks=(3, 6, 9)) -> str:
    rows = []
    calib = "wikitext2"
    ccds_kw = dict(calib=calib, sampling="ccds", clusters=5, samples_per_cluster=1, seqlen=args.calib_seqlen, seed=0)
    rand_kw = dict(calib=calib, sampling="random", nsamples=5, seqlen=args.calib_seqlen, seed=0)
    sleb_ccds = sleb_prefixes(work, "t4-sleb-ccds", list(ks), calib_from=str(work / f"t2-{calib}-evop-k3"), **ccds_kw)
    for k in ks:
        full = search(work, f"t2-{calib}-evop-k{k}", method="evop", drop_count=k, population=args.population,
                      generations=args.generations, **ccds_kw)
        noccds = search(work, f"t4-evop-random-k{k}", method="evop", drop_count=k, population=args.population,
                        generations=args.generations, **rand_kw)
        for name, r in (("EvoP (CCDS + EPPS)", full), ("w/o CCDS (random sampling + EPPS)", noccds),
                        ("w/o EPPS (CCDS + SLEB search)", sleb_ccds[k])):
            d = r["dropped_layers"]
            rows.append([name, k, ",".join(map(str, d)), f"{held(d, 'wikitext2'):.2f}", f"{held(d, 'c4'):.2f}"])
    return (f"### Table 4 analogue: ablation (wikitext2 calibration)\n\nSame settings as Tables 2/3.\n\n"
            + md_table(["variant", "k", "dropped", "wikitext2 ppl", "c4 ppl"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--parts", default="fig1,tables,ablation")
    ap.add_argument("--work", default="bench_runs/evop")
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--fig1-samples", type=int, default=1)
    ap.add_argument("--fig1-seqlen", type=int, default=128)
    ap.add_argument("--fig1-big-population", type=int, default=20)
    ap.add_argument("--fig1-big-generations", type=int, default=10)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--heldout-seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=8)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    if "fig1" in parts:
        write_section("evop-fig1", fig1(args, work))
    if "tables" in parts or "ablation" in parts:
        held = HeldOut(args.heldout_seqlen, args.heldout_windows, ("wikitext2", "c4"))
        if "tables" in parts:
            write_section("evop-tables", tables(args, work, held))
        if "ablation" in parts:
            write_section("evop-ablation", ablation(args, work, held))


if __name__ == "__main__":
    main()
