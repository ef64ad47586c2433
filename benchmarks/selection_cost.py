"""Width and level searches before and after issue 16's racing and staged selection (SmolLM2-135M).

Per seed, on one calibration set (wikitext2 valid, ``--nsamples`` random windows x ``--seqlen``
tokens, drawn with the seed), at ``--sparsity``:

- width ``evo``: the issue-13 defaults (K=10, M=4, S=4, N=5, every child scored on the whole set,
  ``--race-margin 0``) vs today's defaults (the same schedule, children raced against the population)
  vs ``--tokens-per-stage auto`` (children screened on 1/8 of the tokens, the best 2 on the whole set);
- levels ``darwinlm`` one-shot (``--training-aware off``): the issue-7 defaults (one stage, survivors 1,
  no racing) vs ``--tokens-per-stage auto`` (survivors 2,1, last stage raced against the parent).
  Neither staged variant became a default (higher losses, see RESULTS).

Reports calibration loss, token-layers, evaluations (raced ones among them) and wall seconds, and
whether today's defaults reach the same or a lower loss at <= ``--target-frac`` of the old
token-layers. Run directories under ``--work`` are reused.

    python benchmarks/selection_cost.py --write
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402
from _runs import search  # noqa: E402

CASES = [  # (search, defaults, run directory stem, options)
    ("width evo", "old", "width_old", dict(space="width", method="evo", race_margin=0.0, tokens_per_stage="none")),
    ("width evo", "racing", "width_new", dict(space="width", method="evo")),
    ("width evo", "staged", "width_staged", dict(space="width", method="evo", tokens_per_stage="auto")),
    ("levels darwinlm one-shot", "old", "levels_old", dict(space="levels", method="darwinlm", training_aware=False,
                                                           tokens_per_stage=None, survivors_per_stage="1",
                                                           race_margin=0.0)),
    ("levels darwinlm one-shot", "staged", "levels_new", dict(space="levels", method="darwinlm", training_aware=False,
                                                           tokens_per_stage="auto")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/selection_cost")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--spaces", default="width,levels")
    ap.add_argument("--target-frac", type=float, default=0.5)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    seeds = [int(s) for s in args.seeds.split(",")]
    common = dict(sparsity=args.sparsity, calib="wikitext2", sampling="random", nsamples=args.nsamples,
                  seqlen=args.seqlen)
    res, rows, checks = {}, [], []
    for seed in seeds:
        for label, which, stem, kw in CASES:
            if kw["space"] not in args.spaces.split(","):
                continue
            name = f"{stem}_s{seed}"
            r = search(work, name, seed=seed, **kw, **common)
            hist = [json.loads(x) for x in (work / name / "history.jsonl").read_text().splitlines()]
            r["raced"] = sum(1 for h in hist if h.get("raced"))
            res[(label, which, seed)] = r
            rows.append([label, which, seed, f"{r['calib_loss']:.4f}", f"{r['token_layers']:.3g}", r["evaluations"],
                         r["raced"], f"{r['wall_s']:.0f}"])
        for label, which, _, _ in CASES:
            old, new = res.get((label, "old", seed)), res.get((label, which, seed))
            if which != "old" and old and new:
                ratio = new["token_layers"] / old["token_layers"]
                checks.append([label, which, seed, f"{old['calib_loss']:.4f}", f"{new['calib_loss']:.4f}",
                               "yes" if new["calib_loss"] <= old["calib_loss"] else "**no**", f"{ratio:.2f}",
                               "yes" if ratio <= args.target_frac else "**no**"])
    body = (f"### Width and level selection: old defaults vs racing / staged selection (SmolLM2-135M, "
            f"{args.sparsity:.0%})\n\nCalibration: {args.nsamples} random windows x {args.seqlen} tokens of "
            f"wikitext2 valid, per seed. old = the defaults before issue 16 (width evo: every child on the whole "
            f"set, no racing; darwinlm: one stage, one survivor, no racing); racing = width evo's defaults today "
            f"(children raced against the population); staged = --tokens-per-stage auto (a first slice of 1/8 of "
            f"the tokens; width: 2 of the 8 children promoted to the whole set; darwinlm: survivors 2,1) with "
            f"racing. Staged selection is an option, not a default, in both spaces.\n\n"
            + md_table(["search", "options", "seed", "calib loss", "token-layers", "evals", "raced", "wall s"], rows)
            + "\n\nTargets (vs old):\n\n"
            + md_table(["search", "options", "seed", "old loss", "loss", "<= old", "token-layer ratio",
                        f"<= {args.target_frac:g}"], checks))
    print(body)
    if args.write:
        write_section("selection-cost", body)


if __name__ == "__main__":
    main()
