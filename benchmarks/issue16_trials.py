"""Issue-16 trial runs on SmolLM2-135M that RESULTS quotes but that are not defaults (run directories under
``--work``; re-running reuses finished ones). Prints one line per run.

- ``small-stage128``: layers ``evo`` at k = 6 on 2 x 128 tokens with a 128-token first stage
  (``--tokens-per-stage 128,256``), seeds 0 and 1, against SLEB's token-layers (RESULTS, search-cost-small).

    python benchmarks/issue16_trials.py small-stage128

The ``width-probe`` trial RESULTS quotes (one probe vector per layer, 0.3 below the target, seeding the
initial population) ran code that sensitivity rounds replaced; it runs from commit 9a3292c
(``git checkout 9a3292c && python benchmarks/issue16_trials.py width-probe``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import search  # noqa: E402

SLEB_SMALL_TL = {0: 894720, 1: 676608}  # search-cost-small


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trial", choices=("small-stage128",))
    ap.add_argument("--work", default="bench_runs/issue16_trials")
    a = ap.parse_args()
    work = Path(a.work)
    if a.trial == "small-stage128":
        for seed in (0, 1):
            r = search(work, f"C_s128_s{seed}", method="evo", drop_count=6, calib="wikitext2", sampling="random",
                       nsamples=2, seqlen=128, seed=seed, tokens_per_stage="128,256")
            print(f"small, 128-token first stage, seed {seed}: loss {r['calib_loss']:.4f}, "
                  f"{r['token_layers'] / SLEB_SMALL_TL[seed]:.3f}x SLEB's token-layers, drop {r['dropped_layers']}")


if __name__ == "__main__":
    main()
