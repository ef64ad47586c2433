"""Width and level searches: the defaults before issue 16 vs today's (SmolLM2-135M).

Per seed, on one calibration set (wikitext2 valid, ``--nsamples`` random windows x ``--seqlen``
tokens, drawn with the seed), at ``--sparsity``:

- width ``evo``: the issue-13 defaults (K=10, M=4, S=4, N=5, every candidate on the whole set, no
  racing, no block-prefix cache) vs today's defaults (sensitivity rounds from the uniform vector, then
  K=4, M=8, S=0, N=5 with children screened on 1/8 of the tokens, the best 2 on the whole set, raced;
  the block-prefix cache reusing the blocks a candidate shares with earlier ones);
- levels ``darwinlm`` one-shot (``--training-aware off``): the issue-7 defaults (one whole-set stage,
  10 generations, no racing, no cache) vs today's (stages auto with survivors 2,1, racing, the
  block-prefix cache, a default budget of 35 whole-set evaluations). Each levels run builds its own
  level database (under its run directory), which counts in its token-layers.

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
from _flops import per_token  # noqa: E402
from _runs import search  # noqa: E402

from evoprune.plan import meta_model, resolve_config  # noqa: E402
from evoprune.plan.flops import block_flops  # noqa: E402
from evoprune.runner.config import SearchConfig  # noqa: E402
from evoprune.runner.problems.common import stage_slices, stage_tokens  # noqa: E402

CASES = [  # (search, defaults, run directory stem, options)
    ("width evo", "old", "width_old", dict(space="width", method="evo", population=10, mutations=4, crossovers=4,
                                           generations=5, probe=0.0, tokens_per_stage="none", race_margin=0.0,
                                           cache_mb=0.0, reconstruct="none")),
    ("width evo", "today", "width_new", dict(space="width", method="evo")),
    ("levels darwinlm one-shot", "old", "levels_old", dict(space="levels", method="darwinlm", training_aware=False,
                                                           tokens_per_stage="none", survivors_per_stage="1",
                                                           generations=10, budget_evals=0.0, race_margin=0.0,
                                                           cache_mb=0.0)),
    ("levels darwinlm one-shot", "today", "levels_new", dict(space="levels", method="darwinlm",
                                                             training_aware=False)),
]


def flops(run: Path, res: dict, f: dict, n_layers: int) -> float:
    """FLOPs of a width / levels run, LM head included: each row's blocks (its token-layers at its slice's
    window length) and the head on its input tokens; setup (importance, level database) as block forwards."""
    cfg = SearchConfig.from_dict(json.loads((run / "config.json").read_text()))
    rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    slices = stage_slices(stage_tokens(cfg.method_options), res["calib"]["samples"], res["calib"]["seqlen"])
    setup = res["token_layers"] - sum(r["eval_token_layers"] for r in rows)
    total = setup * block_flops(f, slices[-1][1])
    for r in rows:
        t = slices[r.get("stage", -1)][1]
        total += r["eval_token_layers"] * block_flops(f, t) + r["tokens"] * t / (t - 1) * f["head"]
    return total


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
    f = per_token(meta_model(resolve_config("smollm2-135m")[0], "float32"))
    for seed in seeds:
        for label, which, stem, kw in CASES:
            if kw["space"] not in args.spaces.split(","):
                continue
            name = f"{stem}_s{seed}"
            own = {"levels_db": str((work / name / "db").resolve())} if kw["space"] == "levels" else {}
            r = search(work, name, seed=seed, **kw, **own, **common)
            hist = [json.loads(x) for x in (work / name / "history.jsonl").read_text().splitlines()]
            r["raced"] = sum(1 for h in hist if h.get("raced"))
            r["flops"] = flops(work / name, r, f, 30)
            res[(label, which, seed)] = r
            rows.append([label, which, seed, f"{r['calib_loss']:.4f}", f"{r['token_layers']:.3g}", f"{r['flops']:.3g}",
                         r["evaluations"],
                         r["raced"], f"{r['wall_s']:.0f}"])
        for label, which, _, _ in CASES:
            old, new = res.get((label, "old", seed)), res.get((label, which, seed))
            if which != "old" and old and new:
                ratio = new["token_layers"] / old["token_layers"]
                checks.append([label, which, seed, f"{old['calib_loss']:.4f}", f"{new['calib_loss']:.4f}",
                               "yes" if new["calib_loss"] <= old["calib_loss"] else "**no**", f"{ratio:.2f}",
                               "yes" if ratio <= args.target_frac else "**no**", f"{new['flops'] / old['flops']:.2f}",
                               f"{new['wall_s'] / old['wall_s']:.2f}"])
    body = (f"### Width and level selection: old defaults vs today's (SmolLM2-135M, {args.sparsity:.0%})\n\n"
            f"Calibration: {args.nsamples} random windows x {args.seqlen} tokens of wikitext2 valid, per seed. "
            f"old = the defaults before issue 16 (width evo: K=10, M=4, S=4, N=5, every candidate on the whole set; "
            f"darwinlm one-shot: one whole-set stage, 10 generations of 8; neither raced nor cached); today = the "
            f"defaults now (width evo: sensitivity rounds, then K=4, M=8, S=0, N=5, children screened on 1/8 of the "
            f"tokens, 2 promoted, raced; darwinlm one-shot: stages auto, survivors 2,1, raced, a default budget of "
            f"35 whole-set evaluations; both with the block-prefix cache, --cache-mb auto). Token-layers include "
            f"setup (width: Wanda-sp importance; levels: building the level database, each run its own). FLOPs: "
            f"blocks and LM head (which costs about 8 blocks per token on SmolLM2), setup counted as block "
            f"forwards; wall seconds on the 2-core machine, one run at a time.\n\n"
            + md_table(["search", "options", "seed", "calib loss", "token-layers", "FLOPs", "evals", "raced", "wall s"],
                       rows)
            + "\n\nTargets (vs old):\n\n"
            + md_table(["search", "options", "seed", "old loss", "loss", "<= old", "token-layer ratio",
                        f"<= {args.target_frac:g}", "FLOPs ratio", "wall ratio"], checks))
    print(body)
    if args.write:
        write_section("selection-cost", body)


if __name__ == "__main__":
    main()
