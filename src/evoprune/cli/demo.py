"""``evoprune demo``: the guided tour on the bundled SmolLM2-135M.

Owns the demo flow only; every step calls the same library functions as the CLI commands: the
default layer search (``evo`` with its default options: auto stages, racing, its derived budget)
dropping 20% of the blocks on random wikitext2 calibration windows (a run directory under
``--out``), ShortGPT's one-shot Block Influence pattern beside it as the baseline (``--no-baseline``
skips it), held-out WikiText-2 and C4 perplexity of dense vs pruned (bounded windows), and an export
of the evo-pruned model that is reloaded with stock ``transformers`` and checked.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import add_model_options, at_least, load, preflight, progress, quiet_transformers


def _config(args, method: str):
    from ..runner.config import SearchConfig

    return SearchConfig.build(method=method, model=args.model, sparsity=0.2, calib="wikitext2", sampling="random",
                              nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0, device=args.device,
                              dtype=args.dtype)


def _search(args, out: Path, method: str):
    from ..runner.loop import run_search

    return run_search(_config(args, method), out, progress=progress())


def cmd_demo(args) -> int:
    """Check every argument, then run the tour with ``--out`` locked (one demo per directory at a time)."""
    from ..locking import writer_lock

    at_least(args, 2, "seqlen", "calib_seqlen")
    at_least(args, 1, "max_windows", "nsamples")
    _config(args, "evo")  # --nsamples, --calib-seqlen, --model, --dtype as the search checks them
    preflight(args.model, args.device, {f"--seqlen {args.seqlen}": args.seqlen,
                                        f"--calib-seqlen {args.calib_seqlen}": args.calib_seqlen})
    with writer_lock(args.out, "--out directory"):
        return _demo(args)


def _demo(args) -> int:
    from ..data.sources import get_text
    from ..evaluate.perplexity import perplexity, tokenize_text
    from ..export import export_dropped
    from ..files import atomic_write_json
    from ..report.tables import text_table

    quiet_transformers()
    t0 = time.time()
    out = Path(args.out)
    print(f"[demo] evo (the default layer search, default options): drop 20% of the blocks of {args.model}; "
          f"calibration {args.nsamples} random windows x {args.calib_seqlen} tokens of wikitext2 valid -> "
          f"{out / 'run'}", file=sys.stderr)
    res = _search(args, out / "run", "evo")
    runs = {"evo": res}
    if args.baseline:
        print("[demo] baseline: ShortGPT (one-shot Block Influence) on the same calibration set", file=sys.stderr)
        runs["shortgpt"] = _search(args, out / "shortgpt", "shortgpt")
    print(f"[demo] held-out perplexity, dense vs pruned ({args.max_windows} windows x {args.seqlen} tokens)",
          file=sys.stderr)
    lm = load(args.model, args.device, args.dtype)
    rows, results = [], {}
    for ds in ("wikitext2", "c4"):
        ids = tokenize_text(lm.tokenizer, get_text(ds, "eval"))
        ppl = lambda desc: perplexity(lm.model, ids=ids, seqlen=args.seqlen, max_windows=args.max_windows,  # noqa: E731
                                      desc=desc, progress=progress())
        dense = ppl(f"dense {ds}")
        results[ds] = {"dense": dense.to_dict()}
        for name, r in runs.items():
            with lm.adapter.dropped(lm.model, r["dropped_layers"]):
                pruned = ppl(f"{name} {ds}")
            results[ds][name] = pruned.to_dict()
            rows.append([ds, name, f"{dense.ppl:.2f}", f"{pruned.ppl:.2f}", f"{pruned.ppl / dense.ppl:.2f}x",
                         str(dense.tokens)])
    drop = res["dropped_layers"]
    rec = export_dropped(lm, drop, out / "model", overwrite=True, extra={"run": str(out / "run")})
    print()
    for name, r in runs.items():
        print(f"{name} on {args.model}: dropped {len(r['dropped_layers'])} of {r['n_layers']} blocks "
              f"{r['dropped_layers']} (calibration loss {r['calib_loss']:.3f}, {r['evaluations']} evaluations, "
              f"{r['token_layers']:.3g} token-layers, {r['wall_s']:.0f} s)")
    print(text_table(["held-out", "method", "dense ppl", "pruned ppl", "ratio", "tokens"], rows))
    print(f"exported the evo model: {rec['n_layers']} layers ({rec['params'] / 1e6:.1f} M params) to {out / 'model'}; "
          f"reloaded with AutoModelForCausalLM: max |logit diff| = {rec['max_abs_diff']:.1e}")
    summary = {"model": args.model, "search": res, "baseline": runs.get("shortgpt"), "ppl": results, "export": rec,
               "wall_s": round(time.time() - t0, 1)}
    atomic_write_json(out / "demo.json", summary)
    print(json.dumps({"demo": str(out / "demo.json"), "dropped_layers": drop,
                      "wikitext2_ppl": {k: round(v["ppl"], 2) for k, v in results["wikitext2"].items()},
                      "wall_s": summary["wall_s"]}))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="the default search (evo), ShortGPT beside it, dense vs pruned perplexity and "
                                    "export on the bundled model")
    add_model_options(p)
    p.add_argument("--out", default="demo_out", help="where the demo writes (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="held-out window length (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=4, help="held-out windows per dataset (default: %(default)s)")
    p.add_argument("--nsamples", type=int, default=4, help="calibration windows (default: %(default)s)")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration window (default: %(default)s)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run ShortGPT's one-shot pattern (default: on)")
    p.set_defaults(func=cmd_demo)
