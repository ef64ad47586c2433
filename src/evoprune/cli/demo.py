"""``evoprune demo``: the guided tour on the bundled SmolLM2-135M.

Owns the demo flow only; every step calls the same library functions as the
CLI commands: a CCDS-calibrated EvoP layer-drop search at 20% sparsity with a
small budget (a run directory under ``--out``), held-out WikiText-2 and C4
perplexity of dense vs pruned (bounded windows), and an export of the pruned
model that is reloaded with stock ``transformers`` and checked.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .common import add_model_options, load, progress, quiet_transformers


def cmd_demo(args) -> int:
    from ..data.sources import get_text
    from ..errors import user_input
    from ..evaluate.perplexity import perplexity, tokenize_text
    from ..export import export_dropped
    from ..report.tables import text_table
    from ..runner.config import SearchConfig
    from ..runner.loop import run_search

    quiet_transformers()
    t0 = time.time()
    out = Path(args.out)
    with user_input("--out directory", out):
        out.mkdir(parents=True, exist_ok=True)
    cfg = SearchConfig.build(method="evop", model=args.model, sparsity=0.2, calib="wikitext2", sampling="ccds",
                             clusters=5, samples_per_cluster=1, seqlen=args.calib_seqlen, population=args.population,
                             generations=args.generations, seed=0, device=args.device, dtype=args.dtype)
    print(f"[demo] EvoP search: drop 20% of the blocks of {args.model}; CCDS calibration "
          f"(5 clusters x 1 sample x {args.calib_seqlen} tokens of wikitext2 valid); population {args.population}, "
          f"{args.generations} generations -> {out / 'run'}", file=sys.stderr)
    res = run_search(cfg, out / "run", progress=progress())
    drop = res["dropped_layers"]
    print(f"[demo] held-out perplexity, dense vs pruned ({args.max_windows} windows x {args.seqlen} tokens)",
          file=sys.stderr)
    lm = load(args.model, args.device, args.dtype)
    rows, results = [], {}
    for ds in ("wikitext2", "c4"):
        ids = tokenize_text(lm.tokenizer, get_text(ds, "eval"))
        dense = perplexity(lm.model, ids=ids, seqlen=args.seqlen, max_windows=args.max_windows, desc=f"dense {ds}",
                           progress=progress())
        with lm.adapter.dropped(lm.model, drop):
            pruned = perplexity(lm.model, ids=ids, seqlen=args.seqlen, max_windows=args.max_windows,
                                desc=f"pruned {ds}", progress=progress())
        rows.append([ds, f"{dense.ppl:.2f}", f"{pruned.ppl:.2f}", f"{pruned.ppl / dense.ppl:.2f}x", str(dense.tokens)])
        results[ds] = {"dense": dense.to_dict(), "pruned": pruned.to_dict()}
    rec = export_dropped(lm, drop, out / "model", overwrite=True, extra={"run": str(out / "run")})
    n = res["n_layers"]
    print()
    print(f"EvoP on {args.model}: dropped {len(drop)} of {n} blocks {drop} "
          f"(calibration loss {res['calib_loss']:.3f}, {res['evaluations']} evaluations, "
          f"{res['token_layers']:.3g} token-layers, {res['wall_s']:.0f} s)")
    print(text_table(["held-out", "dense ppl", "pruned ppl", "ratio", "tokens"], rows))
    print(f"exported {rec['n_layers']}-layer model ({rec['params'] / 1e6:.1f} M params) to {out / 'model'}; "
          f"reloaded with AutoModelForCausalLM: max |logit diff| = {rec['max_abs_diff']:.1e}")
    summary = {"model": args.model, "search": res, "ppl": results, "export": rec, "wall_s": round(time.time() - t0, 1)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"demo": str(out / "demo.json"), "dropped_layers": drop, "wall_s": summary["wall_s"]}))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("demo", help="EvoP search, dense vs pruned perplexity and export on the bundled model")
    add_model_options(p)
    p.add_argument("--out", default="demo_out", help="where the demo writes (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="held-out window length (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=4, help="held-out windows per dataset (default: %(default)s)")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration sample (default: %(default)s)")
    p.add_argument("--population", type=int, default=12, help="EvoP population (default: %(default)s)")
    p.add_argument("--generations", type=int, default=4, help="EvoP generations (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
