"""``evoprune finetune``: LoRA recovery of a pruned model, exported like any other.

Owns :func:`add_finetune_parser`, :func:`cmd_finetune` and :func:`save_finetuned`.
The source is anything :func:`~evoprune.models.load_model` accepts — a
layer-drop or width-pruning run directory, an exported directory, a plain model
(optionally with ``--drop``). After :func:`~evoprune.finetune.lora.finetune_lora`
the merged model is written with the export that fits it, both reload-checked
(logits within 1e-5 of the in-memory model) and moved into place only then:

- width-pruned (``config.evoprune_width``: a width run or export):
  :func:`~evoprune.export_width.save_width_model`, the ``trust_remote_code``
  format of ``evoprune export`` for width runs;
- otherwise :func:`~evoprune.export.export_dropped` with no further drops
  (a run's dropped blocks are already gone; ``pruning.json`` records them).

``DIR/pruning.json`` gains a ``finetune`` entry; ``DIR/finetune.json``
(written atomically after the export) holds the configuration, the training
stats (every step's loss), the source, the data spec and the export record.
The last stdout line is the JSON summary.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import __version__
from ..errors import UserError

__all__ = ["add_finetune_parser", "cmd_finetune", "save_finetuned", "FINETUNE_FORMAT"]

FINETUNE_FORMAT = 1


def save_finetuned(lm, out, *, overwrite: bool = False, extra: dict | None = None) -> dict:
    """Export ``lm`` (fine-tuned in memory) to ``out`` in the format its pruning needs; the export record."""
    from ..export import export_dropped
    from ..models.width import WIDTH_KEY

    if getattr(lm.model.config, WIDTH_KEY, None):
        from ..export_width import save_width_model

        return save_width_model(lm, out, overwrite=overwrite, extra=extra)
    return export_dropped(lm, [], out, overwrite=overwrite, extra=extra)


def _lora_config(args):
    from .lora import LoRAConfig

    target = None
    if args.target:
        target = tuple(t for t in (s.strip() for s in args.target.split(",")) if t)
        if not target:
            raise UserError(f"--target {args.target!r} names no module")
    return LoRAConfig(steps=args.steps, rank=args.rank, alpha=args.alpha, dropout=args.dropout, lr=args.lr,
                      seqlen=args.seqlen, batch_size=args.batch_size, warmup_steps=args.warmup_steps,
                      schedule=args.schedule, target=target, seed=args.seed)


def cmd_finetune(args) -> int:
    """``evoprune finetune``: validate, load, train, merge, export, record."""
    from ..atomic import atomic_open
    from ..cli import _drop_arg, _emit, _load, _progress
    from ..export import check_out_dir
    from ..models.width import WIDTH_KEY
    from .data import train_documents
    from .lora import finetune_lora

    cfg = _lora_config(args)  # argument errors first, then data, then the (slow) model load
    drop = _drop_arg(args.drop)
    out = check_out_dir(args.out, args.overwrite)
    docs = train_documents(args.data)
    lm = _load(args)
    if drop:
        if getattr(lm.model.config, WIDTH_KEY, None):
            raise UserError("--drop does not apply to a width-pruned model")
        if lm.dropped:
            raise UserError(f"--drop cannot be combined with a run directory ({args.model} already drops "
                            f"{list(lm.dropped)})")
        lm.dropped = tuple(lm.adapter.drop_inplace(lm.model, drop).dropped)
    stats = finetune_lora(lm, docs, cfg, progress=_progress())
    summary = {k: v for k, v in stats.items() if k != "losses"}
    info = {"source": args.model, "data": args.data, "data_split": "calib", "config": cfg.to_dict()}
    rec = save_finetuned(lm, out, overwrite=args.overwrite, extra={"finetune": {**info, "stats": summary}})
    with atomic_open(Path(out) / "finetune.json") as f:
        json.dump({"evoprune_finetune": FINETUNE_FORMAT, **info, "base_model": lm.base,
                   "dropped_layers": list(lm.dropped), "stats": stats, "export": rec,
                   "evoprune_version": __version__}, f, indent=1)
        f.write("\n")
    print(f"finetuned {args.model} on {args.data}: {cfg.steps} steps, {stats['tokens']:,} tokens, train loss "
          f"{stats['loss_first']:.4f} -> {stats['loss_last']:.4f} in {stats['wall_s']:.1f} s; exported to {out} "
          f"(reload check: max |dlogit| = {rec['max_abs_diff']:.2e})", file=sys.stderr)
    _emit({"out": str(out), "source": args.model, "data": args.data, **summary, "params": rec["params"],
           "dropped_layers": rec["dropped_layers"], "width_pruned": "num_kv_groups" in rec,
           "max_abs_diff": rec["max_abs_diff"]})
    return 0


def add_finetune_parser(sub) -> None:
    """Register ``evoprune finetune`` on the CLI's subparsers."""
    p = sub.add_parser("finetune", help="LoRA recovery fine-tuning of a pruned model; merges and exports it")
    p.add_argument("model", metavar="RUN_OR_MODEL",
                   help="run dir (layer-drop or width), exported dir, alias, .gguf, local HF dir or hub id")
    p.add_argument("--data", required=True, help="wikitext2 | c4 | alpaca:PATH | jsonl:PATH[:field] | text:PATH "
                   "(the calibration side: wikitext2 validation split, c4 documents 1000-1999)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--drop", default=None, help="plain model only: comma-separated blocks to drop before training")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha / r (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default: %(default)s)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate, AdamW (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per training window (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per step (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps (default: %(default)s)")
    p.add_argument("--schedule", default="linear", help="after warm-up: linear (decay) | constant "
                   "(default: %(default)s)")
    p.add_argument("--target", default=None, help="comma-separated projection names to adapt (default: the "
                   "attention and MLP projections, q/k/v/o/gate/up/down or OPT's q/k/v/out/fc1/fc2)")
    p.add_argument("--seed", type=int, default=0, help="LoRA init, dropout and window order (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device; training runs there (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (CPU training needs float32)")
    p.set_defaults(func=cmd_finetune)
