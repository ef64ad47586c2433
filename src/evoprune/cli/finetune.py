"""``evoprune finetune``: recovery training of a pruned model, exported like any other.

Owns the command (``add_parsers``). Its training flags are generated from
:class:`~evoprune.finetune.options.LoRAConfig` (one default per option, on the field). The source is
anything :func:`evoprune.load_model` accepts — a layer-drop or width-pruning run directory, an exported
directory, a plain model (optionally with ``--drop``). ``--loss kd`` / ``kd+lm`` learn from the dense model
(``--teacher``, by default the source's base): live beside the student when both fit the free memory,
else its top-K targets cached before the student loads (:mod:`evoprune.finetune.distill`; ``finetune.json``
says which). After :func:`~evoprune.finetune.lora.finetune_lora`
the merged model is written by :func:`evoprune.export.save_pruned` in the format its pruning needs
(reload-checked, moved into place only then). ``DIR/pruning.json`` gains a ``finetune`` entry;
``DIR/finetune.json`` (written atomically after the export) holds the configuration, the training stats
(every step's loss), the source, the data spec and the export record. The last stdout line is the JSON
summary.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

from ..errors import Interrupted, UserError
from ..version import __version__
from .common import add_model_options, drop_arg, emit, load, preflight, progress
from .options import add_options

__all__ = ["add_parsers", "FINETUNE_FORMAT"]

FINETUNE_FORMAT = 1


def _lora_config(args):
    from ..finetune.options import LoRAConfig
    from ..options import options_of

    fields = {o.field for o in options_of(LoRAConfig)}
    return LoRAConfig(**{k: v for k, v in vars(args).items() if k in fields})


def cmd_finetune(args) -> int:
    """Validate, load, train, merge, export, record (the --out directory locked throughout)."""
    from ..export import check_out_dir
    from ..finetune.lora import check_targets
    from ..finetune.options import check_train_source
    from ..finetune.checkpoint import CHECKPOINT_FILE, TrainCheckpoint, holds_unfinished
    from ..locking import writer_lock

    cfg = _lora_config(args)  # argument errors first, then data, then the (slow) model load
    drop = drop_arg(args.drop)
    unfinished = bool(str(args.out).strip()) and holds_unfinished(Path(args.out).expanduser())
    out = check_out_dir(args.out, args.overwrite or unfinished)  # an unfinished fine-tune of OUT continues
    check_train_source(args.data)
    facts = preflight(args.model, args.device, {f"--seqlen {cfg.seqlen}": cfg.seqlen}, drop=drop)
    check_targets(facts.projections if facts else None, cfg.target)
    if cfg.loss == "lm" and args.teacher is not None:
        raise UserError("--teacher needs --loss kd, kd+lm or auto")
    teacher = None
    if cfg.loss in ("kd", "kd+lm"):
        teacher = _teacher_spec(args, drop)
    elif cfg.loss == "auto":
        try:
            teacher = _teacher_spec(args, drop)
        except UserError:
            print(f"note: no dense model is known for {args.model}: recovering with --loss lm (give --teacher SPEC to "
                  f"distil)", file=sys.stderr)
    if teacher is not None:
        preflight(teacher, args.device)
    if unfinished and not args.overwrite:  # another training's checkpoint is refused before any load
        TrainCheckpoint(out / CHECKPOINT_FILE, _identity(args, cfg, drop, teacher)).load()
    with writer_lock(out, "--out directory"):
        return _finetune(args, cfg, drop, out, teacher)


def _identity(args, cfg, drop, teacher_spec) -> dict:
    """What determines a fine-tune's result: a checkpoint of other values is not continued."""
    return {"model": str(args.model), "data": args.data, "drop": list(drop or ()), "teacher": teacher_spec,
            "dtype": args.dtype, "config": cfg.to_dict()}


def _teacher_spec(args, drop) -> str:
    """The dense model a distillation loss learns from: ``--teacher``, else the base of a run directory or an
    export (as ``bench`` finds it), else ``MODEL`` itself when ``--drop`` prunes it here."""
    from ..evaluate.bench import find_base

    if args.teacher is not None:
        if not args.teacher.strip():
            raise UserError("--teacher must not be empty")
        return args.teacher
    if drop:
        return args.model
    try:
        return find_base(args.model)[0]
    except UserError:
        raise UserError(f"--loss {args.loss} learns from the dense model, and {args.model} names none (not a run "
                        f"directory or an export with pruning.json): give --teacher SPEC, or --drop") from None


def _distiller(args, cfg, teacher_spec: str, docs):
    """``(windows, Teacher)`` of a distillation run: a live teacher when a second model fits the free memory (and
    no --kd-topk), else the teacher's top-K targets of every window, computed before the student loads."""
    from ..finetune.distill import CACHED_TOPK, Teacher, teacher_fits
    from ..finetune.lora import training_windows

    tl = load(teacher_spec, args.device, args.dtype)
    windows = training_windows(tl, docs, cfg.seqlen)
    size = sum(p.numel() * p.element_size() for p in tl.model.parameters())
    vocab = tl.model.config.get_text_config().vocab_size
    if cfg.kd_topk is None and teacher_fits(size, cfg.batch_size, cfg.seqlen, vocab, args.device):
        return windows, Teacher.live(tl.model)
    return windows, Teacher.cached(tl.model, windows, cfg.kd_topk or CACHED_TOPK)


def _finetune(args, cfg, drop, out, teacher_spec) -> int:
    from ..export import save_pruned
    from ..files import atomic_write_json
    from ..finetune.data import train_documents
    from ..finetune.checkpoint import CHECKPOINT_FILE, TrainCheckpoint
    from ..finetune.lora import finetune_lora
    from ..models.slicing import is_width_pruned

    docs = train_documents(args.data)
    teacher = None
    if teacher_spec is not None:
        docs, teacher = _distiller(args, cfg, teacher_spec, docs)  # the windows, packed by the teacher's tokenizer
    lm = load(args.model, args.device, args.dtype)
    if drop:
        if is_width_pruned(lm.model):
            raise UserError("--drop does not apply to a width-pruned model")
        if lm.dropped:
            raise UserError(f"--drop cannot be combined with a run directory ({args.model} already drops "
                            f"{list(lm.dropped)})")
        lm.dropped = tuple(lm.adapter.drop_inplace(lm.model, drop).dropped)
    ckpt = TrainCheckpoint(Path(out) / CHECKPOINT_FILE, _identity(args, cfg, drop, teacher_spec))
    ckpt.remove_partial()
    if args.overwrite:
        ckpt.remove()
    elif ckpt.path.exists():
        print(f"continuing the unfinished fine-tune in {out}", file=sys.stderr)
    try:
        stats = finetune_lora(lm, docs, cfg, progress=progress(), teacher=teacher, checkpoint=ckpt)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        raise Interrupted(signum, resume=f"the same evoprune finetune command (it continues {out} from its last "
                                         f"checkpoint)" if ckpt.path.exists() else None) from None
    summary = {k: v for k, v in stats.items() if k != "losses"}
    info = {"source": args.model, "data": args.data, "data_split": "calib", "config": cfg.to_dict(),
            **({"teacher_model": teacher_spec} if teacher_spec is not None else {})}
    rec = save_pruned(lm, out, overwrite=args.overwrite or ckpt.path.exists(),
                      extra={"finetune": {**info, "stats": summary}})
    ckpt.remove()  # gone with a replaced directory already; the export is complete
    atomic_write_json(Path(out) / "finetune.json", {"evoprune_finetune": FINETUNE_FORMAT, **info, "base_model": lm.base,
                                                    "dropped_layers": list(lm.dropped), "stats": stats, "export": rec,
                                                    "evoprune_version": __version__})
    how = f"{stats['loss']}" + (f" from {teacher_spec} ({stats['teacher']} teacher)" if teacher_spec is not None else "")
    print(f"finetuned {args.model} on {args.data}: {cfg.steps} steps ({cfg.mode}, {how}), {stats['tokens']:,} "
          f"tokens, train loss {stats['loss_first']:.4f} -> {stats['loss_last']:.4f} in {stats['wall_s']:.1f} s; "
          f"exported to {out} "
          f"(reload check: max |dlogit| = {rec['max_abs_diff']:.2e})", file=sys.stderr)
    emit({"out": str(out), "source": args.model, "data": args.data, **summary, "params": rec["params"],
          "dropped_layers": rec["dropped_layers"], "width_pruned": "num_kv_groups" in rec,
          "max_abs_diff": rec["max_abs_diff"]})
    return 0


def add_parsers(sub) -> None:
    from ..finetune.options import LoRAConfig

    p = sub.add_parser("finetune", help="recovery fine-tuning of a pruned model (LoRA or full; NLL or distillation "
                                        "from the dense model); exports it")
    p.add_argument("model", metavar="RUN_OR_MODEL",
                   help="run dir (layer-drop or width), exported dir, alias, .gguf, local HF dir or hub id")
    p.add_argument("--data", required=True, help="wikitext2 | c4 | alpaca:PATH | jsonl:PATH[:field] | text:PATH "
                   "(the calibration side: wikitext2 validation split, c4 documents 1000-1999)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--drop", default=None, help="plain model only: comma-separated blocks to drop before training")
    p.add_argument("--teacher", default=None, metavar="SPEC",
                   help="--loss kd / kd+lm: the dense model to learn from (default: the base of a run directory or "
                        "export, or MODEL itself with --drop)")
    add_options(p.add_argument_group("LoRA training"), LoRAConfig, required=("steps",), defaults=True)
    add_model_options(p, model=False)
    p.set_defaults(func=cmd_finetune)
