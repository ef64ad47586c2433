"""Recovery of pruned SmolLM2-135M models: next-token NLL (``--loss lm``) vs distillation from the dense model
(``kd``, ``kd+lm``), at equal training tokens.

The pruned models are search runs of the width-reconstruction protocol (calibration 4 x 512 wikitext2 valid, seed
0): ``width`` = ``--space width --sparsity 0.3`` at its defaults, ``layers`` = ``--drop-count 6`` (20% of the
blocks) at its defaults. Each is recovered by ``evoprune finetune RUN --data wikitext2`` (the validation side;
LoRA at its defaults, ``--steps`` x ``--seqlen`` tokens, seed 0) with each loss, and scored on held-out wikitext2
test and c4 (``--heldout-windows`` x 512 tokens each) by ``evoprune ppl``. Finished runs and recoveries under
``--work`` are reused.

    python benchmarks/recovery_kd.py --write
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402

LOSSES = ("lm", "kd", "kd+lm")
MODELS = {
    "width 30% (evo, --reconstruct ls)": ["--space", "width", "--sparsity", "0.3"],
    "layers 20% (evo, k = 6)": ["--drop-count", "6"],
}
CALIB = ["--calib", "wikitext2", "--sampling", "random", "--nsamples", "4", "--seqlen", "512", "--seed", "0"]


def evoprune(*args) -> dict:
    r = subprocess.run([sys.executable, "-m", "evoprune.cli", *map(str, args)], capture_output=True, text=True,
                       env={**__import__("os").environ, "EVOPRUNE_NO_PROGRESS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"evoprune {' '.join(map(str, args))} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def heldout(model, windows: int) -> dict:
    return {ds: evoprune("ppl", "--model", model, "--dataset", ds, "--seqlen", 512, "--max-windows", windows)["ppl"]
            for ds in ("wikitext2", "c4")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench_runs/recovery_kd")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--heldout-windows", type=int, default=8)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    memo_path = work / "results.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    rows = []
    dense = memo.get("dense") or heldout("smollm2-135m", args.heldout_windows)
    memo["dense"] = dense
    rows.append(["dense", "-", "-", "-", f"{dense['wikitext2']:.2f}", f"{dense['c4']:.2f}", "-"])
    for label, space in MODELS.items():
        run = work / ("run_" + label.split()[0])
        if not (run / "result.json").exists():
            evoprune("search", *space, *CALIB, "--out", run)
        key = f"{run.name}:pruned"
        if key not in memo:
            memo[key] = heldout(run, args.heldout_windows)
            memo_path.write_text(json.dumps(memo, indent=1))
        p = memo[key]
        rows.append([label, "none", "-", "-", f"{p['wikitext2']:.2f}", f"{p['c4']:.2f}", "-"])
        for loss in LOSSES:
            out = work / f"{run.name}_{loss.replace('+', '_')}_{args.steps}x{args.seqlen}"
            key = out.name
            if key not in memo:
                t = time.time()
                if not (out / "finetune.json").exists():
                    evoprune("finetune", run, "--data", "wikitext2", "--steps", args.steps, "--seqlen", args.seqlen,
                             "--loss", loss, "--out", out, "--overwrite")
                rec = json.loads((out / "finetune.json").read_text())
                memo[key] = {**heldout(out, args.heldout_windows), "teacher": rec["stats"].get("teacher", "-"),
                             "wall_s": rec["stats"]["wall_s"], "tokens": rec["stats"]["tokens"]}
                memo_path.write_text(json.dumps(memo, indent=1))
                print(f"  {key}: {memo[key]} ({time.time() - t:.0f} s)", file=sys.stderr, flush=True)
            m = memo[key]
            rows.append([label, loss, m["teacher"], f"{m['tokens']:,}", f"{m['wikitext2']:.2f}", f"{m['c4']:.2f}",
                         f"{m['wall_s']:.0f}"])
    body = (f"Recovery at equal tokens ({args.steps} steps x {args.seqlen} tokens, LoRA defaults, wikitext2 "
            f"validation text, seed 0); held-out ppl, {args.heldout_windows} x 512 tokens each; training wall seconds "
            "on this machine, one run at a time:\n\n"
            + md_table(["pruned model", "recovery loss", "teacher", "tokens", "wikitext2 ppl", "c4 ppl",
                        "train s"], rows))
    print(body)
    if args.write:
        write_section("recovery-kd", body)


if __name__ == "__main__":
    main()
