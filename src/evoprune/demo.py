"""``evoprune demo``: the guided tour on the bundled SmolLM2-135M.

Owns the demo flow only; every step calls the same library functions as the
CLI commands. Shows dense vs layer-dropped held-out perplexity on WikiText-2
and C4 (bounded windows), then exports the pruned model, reloads it with stock
``transformers`` and checks the logits.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths]), *(fmt.format(*r) for r in rows)])


def run_demo(args) -> int:
    from transformers.utils import logging as hf_logging

    from .data.sources import get_text
    from .evaluate.perplexity import perplexity, tokenize_text
    from .export import export_dropped
    from .models import load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] loading {args.model} ...", file=sys.stderr)
    lm = load_model(args.model, device=args.device)
    info = lm.adapter.info(lm.model)
    print(f"[demo] {info['layers']} blocks, {info['params'] / 1e6:.1f} M params", file=sys.stderr)
    drop = (3, 13) if info["layers"] > 13 else (1,)
    rows, results = [], {}
    for ds in ("wikitext2", "c4"):
        ids = tokenize_text(lm.tokenizer, get_text(ds, "eval"))
        dense = perplexity(lm.model, ids=ids, seqlen=args.seqlen, max_windows=args.max_windows, desc=f"dense {ds}")
        with lm.adapter.dropped(lm.model, drop):
            pruned = perplexity(lm.model, ids=ids, seqlen=args.seqlen, max_windows=args.max_windows,
                                desc=f"drop {ds}")
        rows.append([ds, f"{dense.ppl:.2f}", f"{pruned.ppl:.2f}", f"{pruned.ppl / dense.ppl:.3f}", str(dense.tokens)])
        results[ds] = {"dense": dense.to_dict(), "pruned": pruned.to_dict()}
    exp_dir = out / "model"
    rec = export_dropped(lm, drop, exp_dir, overwrite=True)
    print()
    print(f"Dense vs blocks {','.join(map(str, drop))} dropped ({args.model}, seqlen {args.seqlen}, "
          f"first {args.max_windows} held-out windows)")
    print(_table(rows, ["dataset", "dense ppl", "pruned ppl", "ratio", "tokens"]))
    print(f"\nexported {rec['n_layers']}-layer model to {exp_dir} ({rec['params'] / 1e6:.1f} M params); "
          f"reloaded with AutoModelForCausalLM: max |logit diff| = {rec['max_abs_diff']:.1e}")
    summary = {"model": args.model, "dropped_layers": list(drop), "ppl": results, "export": rec,
               "wall_s": round(time.time() - t0, 1)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"demo": str(out / "demo.json"), "wall_s": summary["wall_s"]}))
    return 0
