"""Width reconstruction on SmolLM2-135M: what updating the kept output-projection columns buys, one-shot and in search.

One protocol: calibration 4 x 512 tokens of wikitext2 valid (random windows, the search's seed-0 stream), held-out
wikitext2 test and c4, 8 x 512 tokens each; 30% of the blocks' attention + MLP parameters removed.

- ``--part variants``: uniform Wanda-sp (every layer at 30%) with the kept columns unchanged (``none``), with
  FLAP's bias compensation (each pruned projection's output gains ``W_removed @ mean(x_removed)`` over the
  calibration tokens; measured here with a forward hook, evoprune does not ship it) and with the least-squares
  reconstruction (``ls``, :class:`~evoprune.prune.reconstruct.Reconstruction`) at several dampings, on the 4 x 512
  set and on a small 2 x 128 one (where dampening matters most);
- ``--part searches``: ``evoprune search --space width`` at its defaults (``evo``; ``--reconstruct ls``), with
  ``--reconstruct none`` and ``--space levels --method uniform`` (structured OBS), per seed. Held-out perplexity of
  each run's model as ``evoprune ppl RUN`` loads it (reconstructed weights included).

Finished run directories under ``--work`` are reused.

    python benchmarks/width_reconstruct.py --part variants --write
    python benchmarks/width_reconstruct.py --part searches --seeds 0,1,2 --write
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import md_table, write_section  # noqa: E402
from _runs import MODEL, Heldout  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evoprune import load_model  # noqa: E402
from evoprune.data.calibration import random_windows  # noqa: E402
from evoprune.data.sources import get_text  # noqa: E402

SPARSITY = 0.3
DAMPS = (0.01, 0.1, 0.3, 0.5, 1.0, 3.0)


@contextlib.contextmanager
def flap_bias(lm, calib, plan):
    """Masked ``plan`` plus FLAP's bias compensation: each pruned output projection adds the removed columns'
    mean contribution ``W[:, Q] @ mean(x[Q])`` over the calibration tokens (a forward hook; weights masked)."""
    from evoprune.models.hooks import hooked
    from evoprune.models.slicing import output_columns, width_linears, width_masked, width_spec

    spec = width_spec(lm.model, lm.adapter)
    blocks = lm.adapter.get_blocks(lm.model)
    sums, hooks = {}, []

    def mean_hook(key):
        def fn(module, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + x.sum(0)
        return fn

    for i, b in enumerate(blocks):
        lin = width_linears(lm.adapter, b)
        hooks += [(lin[role], mean_hook((i, role))) for role in ("o", "mlp_out")]
    with hooked(hooks), torch.no_grad():
        for s in range(calib.n_samples):
            lm.model(input_ids=calib.input_ids[s:s + 1], use_cache=False)
    bias = []
    for i, b in enumerate(blocks):
        lin = width_linears(lm.adapter, b)
        for role, (_, removed) in output_columns(spec, plan, i).items():
            if len(removed):
                w, mean = lin[role].weight.double(), sums[(i, role)] / calib.n_tokens
                vec = (w[:, removed] @ mean[removed]).to(lin[role].weight.dtype)
                bias.append((lin[role], lambda m, a, o, v=vec: o + v))
    with width_masked(lm.model, plan, lm.adapter), hooked(bias):
        yield


def variants(args, lm, heldout) -> str:
    from evoprune.models.slicing import width_masked
    from evoprune.prune.importance import compute_importance
    from evoprune.prune.reconstruct import Reconstruction
    from evoprune.prune.width_plan import plan_widths

    text = get_text("wikitext2", "calib")
    rows = []
    dense = heldout(lm.model)
    rows.append(["dense", "-", "-", f"{dense['wikitext2']:.2f}", f"{dense['c4']:.2f}"])
    for ns, sl in ((4, 512), (2, 128)):
        calib = random_windows(text, lm.tokenizer, ns, sl, np.random.default_rng([0, 1]))
        imp, _ = compute_importance(lm, calib)
        plan = plan_widths(lm, imp, [SPARSITY] * lm.n_layers)
        runs = [("none", "-", width_masked(lm.model, plan, lm.adapter)), ("FLAP bias", "-", flap_bias(lm, calib, plan))]
        for d in DAMPS:
            recon = Reconstruction(lm, calib, damp=d)
            runs.append(("ls", f"{d:g}", recon.applied(lm.model, plan)))
        for name, damp, ctx in runs:
            t = time.time()
            with ctx:
                p = heldout(lm.model)
            print(f"  {ns}x{sl} {name} {damp}: wikitext2 {p['wikitext2']:.2f} c4 {p['c4']:.2f} ({time.time() - t:.0f} s)",
                  file=sys.stderr, flush=True)
            rows.append([f"{ns} x {sl}", name, damp, f"{p['wikitext2']:.2f}", f"{p['c4']:.2f}"])
    return ("Uniform Wanda-sp, every layer at 30%, held-out ppl (" f"{heldout.windows} x {heldout.seqlen} tokens each):\n\n"
            + md_table(["calibration", "kept columns", "damp", "wikitext2", "c4"], rows))


def searches(args, heldout) -> str:
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = dict(model=MODEL, calib="wikitext2", sampling="random", nsamples=4, seqlen=512, sparsity=SPARSITY)
    cases = [("width evo, --reconstruct ls (default)", "width_ls", dict(space="width")),
             ("width evo, --reconstruct none", "width_none", dict(space="width", reconstruct="none"))]
    cases += [(f"width evo, probe_gain {g}", f"width_ls_pg{g}", dict(space="width", probe_gain=float(g)))
              for g in filter(None, args.probe_gains.split(","))]
    memo_path = work / "heldout.json"
    memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    out: dict = {}
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [(label, f"{stem}_s{s}", kw, s) for label, stem, kw in cases for s in seeds]
    todo += [("levels uniform (structured OBS)", f"levels_uniform_s{s}", dict(space="levels", method="uniform"), s)
             for s in seeds]
    for label, name, kw, seed in todo:
        t = time.time()
        res = run_search(SearchConfig.build(**common, **kw, seed=seed), work / name, progress=False)
        key = f"{name}:{res['calib_loss']:.6f}"
        if memo.get(name, {}).get("id") != key:
            lm = load_model(str(work / name), progress=False)
            memo[name] = {"id": key, **heldout(lm.model)}
            memo_path.write_text(json.dumps(memo, indent=1))
            del lm
        h = memo[name]
        print(f"  {name}: loss {res['calib_loss']:.4f} wikitext2 {h['wikitext2']:.2f} c4 {h['c4']:.2f} "
              f"evals {res['evaluations']} tl {res['token_layers']:.3g} ({time.time() - t:.0f} s)", file=sys.stderr,
              flush=True)
        out.setdefault(label, []).append((seed, res, h))
    rows = []
    for label, got in out.items():
        def cell(f, spec):
            vals = [f(r, h) for _, r, h in got]
            return f"{statistics.fmean(vals):{spec}}" + (f" ({' / '.join(f'{v:{spec}}' for v in vals)})"
                                                         if len(vals) > 1 else "")
        rows.append([label, ", ".join(str(s) for s, _, _ in got), cell(lambda r, h: r["calib_loss"], ".4f"),
                     cell(lambda r, h: h["wikitext2"], ".2f"), cell(lambda r, h: h["c4"], ".2f"),
                     cell(lambda r, h: r["evaluations"], ".0f"), cell(lambda r, h: r["token_layers"], ".3g"),
                     cell(lambda r, h: r["wall_s"], ".0f")])
    return ("Searches at their defaults, 30%, mean (per seed); held-out "
            f"{heldout.windows} x {heldout.seqlen} tokens each; wall seconds on this machine, one run at a time:\n\n"
            + md_table(["search", "seeds", "calib loss", "wikitext2 ppl", "c4 ppl", "evaluations", "token-layers",
                        "wall s"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("variants", "searches"), required=True)
    ap.add_argument("--work", default="bench_runs/width_reconstruct")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--probe-gains", default="", help="searches: also width evo (ls) with these probe_gain values")
    ap.add_argument("--heldout-windows", type=int, default=8)
    ap.add_argument("--heldout-seqlen", type=int, default=512)
    ap.add_argument("--write", action="store_true", help="write the section into docs/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    lm = load_model(MODEL, progress=False)
    heldout = Heldout(args.heldout_windows, args.heldout_seqlen, tokenizer=lm.tokenizer)
    body = variants(args, lm, heldout) if args.part == "variants" else searches(args, heldout)
    print(body)
    if args.write:
        write_section(f"width-reconstruct-{args.part}", body)


if __name__ == "__main__":
    main()
