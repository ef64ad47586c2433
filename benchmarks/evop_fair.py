"""EvoP at a fair budget (issue 16, deliver 4) on the bundled SmolLM2-135M.

The EvoP tables in RESULTS ran EPPS with 40-44 evaluations against SLEB's 87-234 and on CCDS samples of
128 tokens. Here, wikitext2 calibration, seed 0, for each k of ``--ks``:

- SLEB and ShortGPT on random 5 x 512 windows (and ``evo``, our default, on the same set, for reference);
- EvoP = CCDS calibration (5 clusters x 1 sample x 512 tokens, all-MiniLM-L6-v2) + EPPS (``--method evop``,
  its published population and operators), stopped at ``m x`` SLEB's token-layers for each ``m`` of
  ``--mults`` (``--budget-token-layers``; its generation cap is raised so the budget binds);
- held-out perplexity on wikitext2 test and c4 validation (``--heldout-windows`` x ``--heldout-seqlen``).

Every search is a real run directory under ``--work`` (re-running reuses finished ones).

    python benchmarks/evop_fair.py --ks 6,9 --mults 1,2 --write
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402

from _runs import HeldOut, search  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/evop_fair")
    ap.add_argument("--ks", default="6,9")
    ap.add_argument("--mults", default="1,2")
    ap.add_argument("--heldout-seqlen", type=int, default=512)
    ap.add_argument("--heldout-windows", type=int, default=16)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    ks = [int(k) for k in a.ks.split(",")]
    mults = [float(m) for m in a.mults.split(",")]
    rnd = dict(calib="wikitext2", sampling="random", nsamples=5, seqlen=512, seed=0)
    ccds = dict(calib="wikitext2", sampling="ccds", clusters=5, samples_per_cluster=1, seqlen=512, seed=0)
    held = HeldOut(a.heldout_seqlen, a.heldout_windows, ("wikitext2", "c4"))
    rows = []

    def row(name: str, k: int, res: dict, calib: str, sleb_tl: int) -> None:
        drop = res["dropped_layers"]
        rows.append([name, k, calib, f"{res['calib_loss']:.4f}", f"{held(drop, 'wikitext2'):.2f}",
                     f"{held(drop, 'c4'):.2f}", f"{res['token_layers']:.3g}", f"{res['token_layers'] / sleb_tl:.2f}",
                     res["evaluations"], str(drop)])

    for k in ks:
        sleb = search(work, f"sleb_k{k}", method="sleb", drop_count=k, **rnd)
        tl = int(sleb["token_layers"])
        row("SLEB", k, sleb, "random 5 x 512", tl)
        row("ShortGPT", k, search(work, f"shortgpt_k{k}", method="shortgpt", drop_count=k, **rnd), "random 5 x 512", tl)
        row("evo (default)", k, search(work, f"evo_k{k}", method="evo", drop_count=k, **rnd), "random 5 x 512", tl)
        for m in mults:
            res = search(work, f"evop_k{k}_x{m:g}", method="evop", drop_count=k, budget_token_layers=int(m * tl),
                         generations=100_000, **ccds)
            row(f"EvoP (CCDS + EPPS), {m:g}x SLEB", k, res, "CCDS 5 x 512", tl)
    body = ("### EvoP at a fair budget (issue 16): EPPS with SLEB's token-layers, CCDS 5 x 512\n\n"
            f"SmolLM2-135M, wikitext2 calibration, seed 0; held-out: {a.heldout_windows} windows x "
            f"{a.heldout_seqlen} tokens of wikitext2 test and c4 validation. EPPS runs until its token-layers "
            "reach the given multiple of the same-k SLEB run's (`--budget-token-layers`). EvoP's calibration loss is on "
            "its CCDS set, the others' on the random set: compare the held-out columns.\n\n"
            + md_table(["method", "k", "calibration", "calib loss", "wikitext2 ppl", "c4 ppl", "token-layers",
                        "vs SLEB", "evals", "dropped"], rows))
    if ks == [6]:
        body += ("\n\nNot run: k = 9 (about 2 h of CPU at 5 x 512).")
    print(body)
    if a.write:
        write_section("evop-fair", body)


if __name__ == "__main__":
    main()
