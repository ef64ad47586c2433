"""Finer spaces at the cost of the coarser one: sub-layer and level search at their defaults vs block search.

SmolLM2-135M; calibration 4 x 512 tokens of wikitext2 valid (random windows, seed 0); 20%, 30% and 50% of the
blocks' attention + MLP parameters (blocks: k = 6, 9, 15). ``--space sublayers`` (``evo``) and ``--space levels``
(``darwinlm``, one-shot) at their defaults: each runs the block search (``--space layers``, ``evo``) at the same
budget first, in ``RUN/blocks``, and searches around its answer with a default budget of twice its token-layers.
So every row pair is measured inside one run: the block search's answer and cost come from ``RUN/blocks``. The
level database (built once per calibration set, reused from the cache) is charged to the level run whether or
not that run built it. Held-out wikitext2 test and c4, ``--heldout-windows`` x 512 tokens each, of each model as
``evoprune ppl RUN`` loads it. Finished run directories under ``--work`` are reused.

    python benchmarks/finer_spaces.py --write
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import floats, md_table, write_section  # noqa: E402
from _runs import MODEL, Heldout, charged_token_layers  # noqa: E402

import torch  # noqa: E402

from evoprune.runner.config import SearchConfig  # noqa: E402
from evoprune.runner.loop import run_search  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/finer_spaces")
    ap.add_argument("--sparsities", default="0.2,0.3,0.5")
    ap.add_argument("--spaces", default="sublayers,levels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-windows", type=int, default=8)
    ap.add_argument("--write", action="store_true", help="write the section into docs/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    heldout = Heldout(args.heldout_windows, memo_path=work / "heldout.json")
    common = dict(model=MODEL, calib="wikitext2", sampling="random", nsamples=4, seqlen=512, seed=args.seed)
    rows, checks = [], []
    for s in floats(args.sparsities):
        for space in args.spaces.split(","):
            kw = dict(space=space, **({"training_aware": False} if space == "levels" else {}))
            name = f"{space}_{round(100 * s)}_s{args.seed}"
            t = time.time()
            res = run_search(SearchConfig.build(**common, **kw, sparsity=s), work / name, progress=False)
            blocks = json.loads((work / name / "blocks" / "result.json").read_text())
            tl = res["token_layers"]  # as the run counts it: a level database only when this run built it
            extra = charged_token_layers(res) - tl
            hb, hf = (heldout.of(run, f"{run.relative_to(work)}:{r['calib_loss']:.6f}")
                      for run, r in ((work / name / "blocks", blocks), (work / name, res)))
            print(f"  {name}: blocks {blocks['calib_loss']:.4f} -> {res['calib_loss']:.4f}, tl {blocks['token_layers']:.3g}"
                  f" -> {tl:.3g} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
            # the budget is checked before each evaluation: the last one may overshoot it by its own cost
            last = max(json.loads(x)["eval_token_layers"] for x in (work / name / "history.jsonl").open())
            ok = res["calib_loss"] <= blocks["calib_loss"] + 1e-6 and tl <= 2 * blocks["token_layers"] + last
            checks.append(ok)
            row = [f"{round(100 * s)}%", f"layers evo (k = {blocks['k']})", f"{blocks['calib_loss']:.4f}",
                   f"{hb['wikitext2']:.2f}", f"{hb['c4']:.2f}", f"{blocks['token_layers']:.3g}", "1.00",
                   str(blocks["evaluations"]), ""]
            if row not in rows:  # each finer run ran the same block search (same seed and set): one row
                rows.append(row)
            label = "sublayers evo" if space == "sublayers" else "levels darwinlm (one-shot)"
            rows.append([f"{round(100 * s)}%", label, f"{res['calib_loss']:.4f}", f"{hf['wikitext2']:.2f}",
                         f"{hf['c4']:.2f}", f"{tl:.3g}", f"{tl / blocks['token_layers']:.2f}"
                         + (f" ({(tl + extra) / blocks['token_layers']:.2f})" if extra else ""),
                         str(res["evaluations"]), "yes" if ok else "**no**"])
    body = (f"Calibration 4 x 512 wikitext2 valid (seed {args.seed}); held-out wikitext2 test / c4, "
            f"{args.heldout_windows} x 512 tokens each; token-layers of the finer run, as it counts them, include the "
            "block search it ran first; x blocks: token-layers / the block search's (in brackets: with the level "
            "database charged, which this run reused from the cache: built once per calibration set, 6.14e4 "
            "token-layers); target: calib loss <= the block search's at <= 2x its token-layers (plus the last "
            "evaluation, which may overshoot the budget by its own cost).\n\n"
            + md_table(["budget", "search (defaults)", "calib loss", "wikitext2 ppl", "c4 ppl", "token-layers",
                        "x blocks", "evaluations", "target met"], rows)
            + f"\n\nTarget met in {sum(checks)} of {len(checks)} cases.")
    print(body)
    if args.write:
        write_section("finer-spaces", body)


if __name__ == "__main__":
    main()
