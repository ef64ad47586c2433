"""Does ``evo`` find the exhaustive optimum on real SmolLM2-135M landscapes? (issue 4, 20 seeds per k)

Reads finished ``exhaustive`` run directories (every pattern's calibration loss, e.g. the
``fig1-exhaustive-k2`` / ``-k3`` runs of ``benchmarks/evop_tables.py``), uses them as an exact
fitness table, and drives ``evo`` (single fidelity: the table has one) from 20 seeds with the
ShortGPT Block-Influence scores of the same calibration set as its one-shot seeds, exactly as
``run_search`` gives them. Reports hits and the most evaluations any seed used. No model
forward except one for the BI scores, so it runs in seconds.

    python benchmarks/evo_optimum.py bench_runs/evop/fig1-exhaustive-k2 bench_runs/evop/fig1-exhaustive-k3 --write
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402

from evoprune.spaces import DropPattern  # noqa: E402
from evoprune.runner.rundir import RunDir  # noqa: E402
from evoprune.search import make_strategy  # noqa: E402
from evoprune.spaces import LayerDropSpace  # noqa: E402


def drive(strategy, table):
    while not strategy.done:
        reqs = strategy.ask()
        if not reqs:
            break
        strategy.tell(reqs, [table[r.pattern.dropped] for r in reqs])
    return strategy.best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished exhaustive run directories")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument("--survivors", type=int, default=4)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import torch

    from evoprune.data.calibration import CalibSet
    from evoprune import load_model
    from evoprune.fitness import dense_states
    from evoprune.prune.block_influence import block_influence

    lm = load_model("smollm2-135m", progress=False)
    rows = []
    for path in args.runs:
        rd = RunDir(path)
        res = rd.read_result()
        table = {tuple(r["dropped"]): r["loss"] for r in rd.read_history()}
        space = LayerDropSpace(res["n_layers"], res["k"])
        assert len(table) == space.size(), f"{path}: not a complete exhaustive run"
        with torch.no_grad():
            bi = block_influence(b.states for b in dense_states(lm, CalibSet.load(rd.calib_path)))
        opt = min(table.values())
        hits, evals = 0, []
        for seed in range(args.seeds):
            s = make_strategy("evo", space, np.random.default_rng([seed, 2]), generations=args.generations,
                              offspring=args.offspring, survivors=(args.survivors,), scores=tuple(float(x) for x in bi))
            best = drive(s, table)
            hits += best[1] == opt
            evals.append(s.n_evaluations)
        opt_p = min(table, key=table.get)
        rows.append([res["k"], space.size(), f"{res['calib']['samples']} x {res['calib']['seqlen']}",
                     ",".join(map(str, opt_p)), f"{opt:.4f}", f"{hits}/{args.seeds}",
                     f"{max(evals)} ({max(evals) / space.size():.0%})", "yes" if hits >= 19 else "**no**"])
        print(rows[-1], file=sys.stderr)
    body = ("### evo vs the exhaustive optimum (SmolLM2-135M, exact fitness tables)\n\n"
            f"evo ({args.generations} generations x {args.offspring} offspring, {args.survivors} parents, "
            f"BI seeds, swap mutation with contiguity moves), single fidelity, {args.seeds} seeds per k; the fitness of "
            "every pattern comes from a finished `exhaustive` run (its calibration set).\n\n"
            + md_table(["k", "patterns", "calibration", "optimum", "loss", "evo hits", "max evaluations",
                        ">= 19/20"], rows))
    print(body)
    if args.write:
        write_section("evo-optimum", body)


if __name__ == "__main__":
    main()
