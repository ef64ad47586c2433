"""Issue-16 trial runs on SmolLM2-135M that RESULTS quotes but that are not defaults (run directories under
``--work``; re-running reuses finished ones). Prints one line per run.

- ``width-probe``: width ``evo`` at 30% with sensitivity probes (``--probe 0.3 --tokens-per-stage auto
  --promote 8 --generations 1``), 2 x 256 tokens of wikitext2 valid, seeds 0-2, against the old defaults'
  losses and token-layers (RESULTS, selection-cost).
- ``small-stage128``: layers ``evo`` at k = 6 on 2 x 128 tokens with a 128-token first stage
  (``--tokens-per-stage 128,256``), seeds 0 and 1, against SLEB's token-layers (RESULTS, search-cost-small).

    python benchmarks/issue16_trials.py width-probe
    python benchmarks/issue16_trials.py small-stage128
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import search  # noqa: E402

OLD_WIDTH = {0: 6.2575, 1: 7.3299, 2: 4.7449}  # old defaults' calib loss (selection-cost), 7.83e5 token-layers
OLD_WIDTH_TL = 7.83e5
SLEB_SMALL_TL = {0: 894720, 1: 676608}  # search-cost-small


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trial", choices=("width-probe", "small-stage128"))
    ap.add_argument("--work", default="bench_runs/issue16_trials")
    a = ap.parse_args()
    work = Path(a.work)
    if a.trial == "width-probe":
        for seed in (0, 1, 2):
            r = search(work, f"D1_s{seed}", space="width", method="evo", sparsity=0.3, calib="wikitext2",
                       sampling="random", nsamples=2, seqlen=256, seed=seed, cache_mb=0.0, probe=0.3,
                       tokens_per_stage="auto", promote=8, population=10, generations=1)
            print(f"width probe seed {seed}: loss {r['calib_loss']:.4f} (old {OLD_WIDTH[seed]}), token-layers "
                  f"{r['token_layers'] / OLD_WIDTH_TL:.3f}x the old defaults', {r['evaluations']} evaluations")
    else:
        for seed in (0, 1):
            r = search(work, f"C_s128_s{seed}", method="evo", drop_count=6, calib="wikitext2", sampling="random",
                       nsamples=2, seqlen=128, seed=seed, tokens_per_stage="128,256")
            print(f"small, 128-token first stage, seed {seed}: loss {r['calib_loss']:.4f}, "
                  f"{r['token_layers'] / SLEB_SMALL_TL[seed]:.3f}x SLEB's token-layers, drop {r['dropped_layers']}")


if __name__ == "__main__":
    main()
