"""One generation on Ray workers vs one process (issue 8): SmolLM2-135M, same candidates, CPU.

Draws ``--candidates`` random patterns dropping ``--k`` of the 30 blocks (seed
``--seed``) and scores them on one calibration set (wikitext2 valid,
``--nsamples`` random windows x ``--seqlen`` tokens) three ways:

- ``process``: one process, no Ray, torch's default threads (what ``--workers 1`` runs);
- ``ray x1``: a :class:`~evoprune.runner.distributed.WorkerPool` with 1 actor (all CPUs);
- ``ray x2``: 2 actors, CPUs split between them (``--workers 2``).

Only the generation is timed, ``--repeats`` times (the fastest counts): model
loading and the dense prefix caches are built before the clock starts, and
each way first scores ``--warmup`` patterns outside the timed set. Every way
must give bit-identical losses (checked). Prints a markdown table, the ratios
``process / ray x2`` and ``ray x1 / ray x2``, and a JSON last line; ``--write``
also writes the ``ray-workers`` section of docs/RESULTS.md. Run it on an
otherwise idle machine without ``OMP_NUM_THREADS`` (which caps every way's
torch threads).

    python benchmarks/ray_workers.py                          # 16 candidates, 4 x 512 tokens
    python benchmarks/ray_workers.py --candidates 4 --nsamples 1 --seqlen 32 --warmup 1 --repeats 1   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402

from evoprune.spaces import DropPattern  # noqa: E402
from evoprune.runner.config import SearchConfig  # noqa: E402

MODEL = "smollm2-135m"


def patterns(n_layers: int, k: int, count: int, seed: int) -> list[DropPattern]:
    """``count`` distinct random patterns dropping ``k`` of ``n_layers`` blocks."""
    rng = np.random.default_rng(seed)
    out: dict[str, DropPattern] = {}
    while len(out) < count:
        p = DropPattern(n_layers, tuple(sorted(int(i) for i in rng.choice(n_layers, size=k, replace=False))))
        out.setdefault(p.key, p)
    return list(out.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=16, help="patterns in the generation (default: %(default)s)")
    ap.add_argument("--k", type=int, default=6, help="blocks dropped per pattern (default: %(default)s)")
    ap.add_argument("--nsamples", type=int, default=4, help="calibration windows (default: %(default)s)")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=2, help="untimed patterns per way first (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per way, fastest kept (default: %(default)s)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument("--write", action="store_true", help="write the ray-workers section of docs/RESULTS.md")
    args = ap.parse_args()

    import ray
    import torch

    from evoprune.data.calibration import random_windows
    from evoprune.data.sources import get_text
    from evoprune.runner.distributed import WorkerPool
    from evoprune.fitness import NLLEvaluator
    from evoprune import load_model

    work = Path(args.work or tempfile.mkdtemp(prefix="evoprune-raybench-"))
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model(MODEL, progress=False)
    calib = random_windows(get_text("wikitext2", "calib"), lm.tokenizer, args.nsamples, args.seqlen,
                           np.random.default_rng([args.seed, 1]), source="wikitext2")
    calib.save(work / "calib.pt")
    pats = patterns(lm.n_layers, args.k, args.warmup + args.candidates, args.seed)
    warm, timed = pats[: args.warmup], pats[args.warmup:]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows, losses = [], {}

    ev = NLLEvaluator(lm, calib)
    ev.prepare()
    for p in warm:
        ev.evaluate(p)
    best = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        losses["process"] = [ev.evaluate(p).loss for p in timed]
        best = min(best, time.perf_counter() - t)
    rows.append(("process", 1, torch.get_num_threads(), best))
    del ev, lm

    tmp = tempfile.mkdtemp(prefix="evoprune-ray-", dir="/tmp")
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    try:
        for workers in (1, 2):
            cfg = SearchConfig.build(method="evop", model=MODEL, drop_count=args.k, calib="wikitext2",
                                     sampling="random", nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                     workers=workers)
            events = []
            pool = WorkerPool(cfg, work, log=events.append)
            try:
                list(pool.imap([(p, None) for p in warm for _ in range(workers)]))
                best = float("inf")
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    losses[f"ray x{workers}"] = [r[0] for r in pool.imap([(p, None) for p in timed])]
                    best = min(best, time.perf_counter() - t)
                rows.append((f"ray x{workers}", workers, events[0]["threads"], best))
            finally:
                pool.close()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    same = all(v == losses["process"] for v in losses.values())
    secs = {name: s for name, _, _, s in rows}
    ratio = {"process / ray x2": secs["process"] / secs["ray x2"], "ray x1 / ray x2": secs["ray x1"] / secs["ray x2"]}
    body = (f"### One generation on Ray workers vs one process (SmolLM2-135M, CPU)\n\n"
            f"{len(timed)} candidates dropping {args.k} of 30 blocks, {args.nsamples} x {args.seqlen} calibration "
            f"tokens, {cpus} CPUs; fastest of {args.repeats} passes, after {args.warmup} warm-up candidates; model "
            f"loading and the dense prefix caches are not timed.\n\n"
            + md_table(["way", "workers", "torch threads / worker", "generation s", "s / candidate"],
                       [[n, w, th, f"{s:.2f}", f"{s / len(timed):.3f}"] for n, w, th, s in rows])
            + "\n\n" + "; ".join(f"{k}: {v:.2f}x" for k, v in ratio.items()) + f"; identical losses: {same}\n")
    print(body)
    if args.write:
        write_section("ray-workers", body)
    print(json.dumps({"candidates": len(timed), "k": args.k, "nsamples": args.nsamples, "seqlen": args.seqlen,
                      "repeats": args.repeats, "cpus": cpus, "seconds": secs, "ratios": ratio, "identical_losses": same}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
