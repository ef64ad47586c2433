"""``evoprune info``, ``ppl`` and ``export``: a model's shape, its held-out perplexity, a checked export.

Owns the three commands (``add_parsers``). A model spec is an alias, a run directory, a ``.gguf``
file, a local HF directory or a hub id; ``--drop`` removes blocks in memory first. ``info --env`` shows
the software stack instead (:func:`evoprune.environment.stack`; no model is loaded).
"""
from __future__ import annotations

import sys

from ..errors import UserError
from ..runner.sections import ModelOptions
from .common import add_model_options, at_least, drop_arg, emit, load, preflight, progress

__all__ = ["add_parsers"]


def cmd_info(args) -> int:
    from ..report.tables import text_table

    if args.env:
        if args.model is not None:
            raise UserError("--env shows the software stack, not a model's shape; give either --env or --model")
        from ..environment import stack

        info = stack()
        print(text_table(["", ""], [[k, _cell(v)] for k, v in info.items()], right=()))
        emit(info)
        return 0
    model = args.model if args.model is not None else ModelOptions.model  # the --model default
    lm = load(model, args.device, args.dtype)
    info = {"model": model, **lm.adapter.info(lm.model), "dropped_layers": list(lm.dropped)}
    print(text_table(["", ""], [[k, v] for k, v in info.items()], right=()))
    emit(info)
    return 0


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return "; ".join(map(str, v)) if v else "none"
    return str(v)


def cmd_ppl(args) -> int:
    from ..data.sources import check_source, get_text
    from ..evaluate.perplexity import perplexity, tokenize_text, windows

    drop = drop_arg(args.drop)
    at_least(args, 2, "seqlen")
    at_least(args, 1, "max_windows", "batch_size")
    check_source(args.dataset, what="--dataset")
    preflight(args.model, args.device, {f"--seqlen {args.seqlen}": args.seqlen}, drop=drop)
    text = get_text(args.dataset, "eval")  # data errors before the (slow) model load
    lm = load(args.model, args.device, args.dtype)
    if drop and lm.dropped:
        raise UserError(f"--drop cannot be combined with a run directory ({args.model} already drops {list(lm.dropped)})")
    pattern = lm.adapter.pattern(lm.model, drop)
    ids = tokenize_text(lm.tokenizer, text)
    windows(ids, args.seqlen, args.max_windows)  # validate before compute
    with lm.adapter.dropped(lm.model, pattern):
        res = perplexity(lm.model, ids=ids, seqlen=args.seqlen, max_windows=args.max_windows,
                         batch_size=args.batch_size, progress=progress(), desc=f"ppl {args.dataset}")
    print(f"{args.dataset}: ppl {res.ppl:.4f} over {res.tokens} predicted tokens ({res.windows} x {res.seqlen})",
          file=sys.stderr)
    emit({"model": args.model, "dataset": args.dataset, "ppl": res.ppl, "nll": res.nll, "tokens": res.tokens,
          "windows": res.windows, "seqlen": res.seqlen, "dropped_layers": list(lm.dropped or pattern.dropped)})
    return 0


def cmd_export(args) -> int:
    from ..export import check_out_dir
    from ..locking import writer_lock

    drop = drop_arg(args.drop)
    if args.run is not None:
        if not args.run.strip():
            raise UserError("the run to export must not be empty (a run directory, or leave it out for --model)")
    preflight(args.run or args.model, args.device, drop=drop)
    check_out_dir(args.out, args.overwrite)
    from ..data.sources import check_source

    check_source(args.check_data, what="--check-data")
    if args.format == "gguf":
        from ..evaluate.llamacpp import require_llama_cpp

        require_llama_cpp()
    with writer_lock(args.out, "--out directory"):
        return _export_gguf(args, drop) if args.format == "gguf" else _export(args, drop)


def _export_gguf(args, drop) -> int:
    """``--format gguf``: the pruned model as it loads (any space), written for llama.cpp and checked there."""
    from ..export.gguf import export_gguf
    from ..models.loading import gguf_file
    from ..runner.pruned import base_spec

    spec = args.run or args.model
    lm = load(spec, args.device, args.dtype)
    if drop:
        if lm.dropped:
            raise UserError(f"--drop cannot be combined with a run directory ({spec} already drops "
                            f"{list(lm.dropped)})")
        lm.dropped = tuple(lm.adapter.drop_inplace(lm.model, drop).dropped)
    extra = {"run": str(args.run)} if args.run else {}
    if lm.extra.get("run"):
        extra["pruning"] = lm.extra["run"]
    rec = export_gguf(lm, args.out, outtype=args.outtype, overwrite=args.overwrite, dataset=args.check_data,
                      gguf_source=gguf_file(base_spec(spec)), extra=extra)
    print(f"exported {rec['architecture']} GGUF ({rec['outtype']}, {rec['n_layers']} blocks, {rec['params']:,} "
          f"params) to {args.out}/{rec['file']}; llama.cpp reloaded it: ppl {rec['llama_cpp_ppl']:.3f} vs "
          f"evoprune's {rec['evoprune_ppl']:.3f} on {rec['check_tokens']} {args.check_data} tokens "
          f"(ratio {rec['ppl_ratio']:.4f}); run it with: llama-server -m {args.out}/{rec['file']}", file=sys.stderr)
    emit(rec)
    return 0


def _export(args, drop) -> int:
    from ..export import export_dropped, export_sublayers, export_width
    from ..runner.pruned import is_sublayer_result, is_width_result, run_base_model, run_result, width_plan
    from ..runner.rundir import RunDir, is_run_dir

    res = (run_result(RunDir(args.run)) or {}) if args.run and is_run_dir(args.run) else {}
    extra = {"run": str(args.run)} if args.run else {}
    if "unfinished" in res:  # the best candidate so far of a run in progress or interrupted
        extra["unfinished"] = {"status": res["unfinished"], "evaluations": res["evaluations"]}
    if is_sublayer_result(res):
        if drop:
            raise UserError("--drop does not apply to a sub-layer run")
        lm = load(run_base_model(RunDir(args.run)), args.device, args.dtype)  # the dense base
        rec = export_sublayers(lm, res["dropped_attention"], res["dropped_mlp"], args.out, overwrite=args.overwrite,
                               extra=extra)
        fmt = "plain HF" if "num_kv_groups" not in rec else "loads with trust_remote_code=True"
        print(f"exported sub-layer-pruned model ({rec['params']:,} params) to {args.out} (reload check: max "
              f"|dlogit| = {rec['max_abs_diff']:.2e}; {fmt})", file=sys.stderr)
    elif is_width_result(res):
        if drop:
            raise UserError("--drop does not apply to a width-pruning run")
        lm = load(run_base_model(RunDir(args.run)), args.device, args.dtype)  # the dense base: export slices it
        rec = export_width(lm, width_plan(args.run, lm), args.out, overwrite=args.overwrite, extra=extra)
        print(f"exported width-pruned model ({rec['params']:,} of {rec['params_dense']:,} params) to {args.out} "
              f"(reload check: max |dlogit| = {rec['max_abs_diff']:.2e}; loads with trust_remote_code=True)",
              file=sys.stderr)
    else:
        lm = load(args.run or args.model, args.device, args.dtype)
        lm.adapter.pattern(lm.model, drop)
        rec = export_dropped(lm, drop, args.out, overwrite=args.overwrite,
                             extra={k: v for k, v in extra.items() if k != "run"} or None)
        print(f"exported {rec['n_layers']}-layer model to {args.out} (reload check: max |dlogit| = "
              f"{rec['max_abs_diff']:.2e})", file=sys.stderr)
    emit(rec)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="show a model's shape (layers, heads, KV heads, hidden, intermediate, "
                       "params); --env: the software stack")
    add_model_options(p)
    p.add_argument("--env", action="store_true", help="show the software stack instead (Python, platform, "
                   "package versions, mismatches against constraints.txt); no model is loaded")
    p.set_defaults(func=cmd_info, model=None)  # None: not given (the help still names the default that applies)

    p = sub.add_parser("ppl", help="perplexity on a held-out text (non-overlapping windows)")
    add_model_options(p)
    p.add_argument("--dataset", default="wikitext2", help="wikitext2 | c4 | text:PATH | jsonl:PATH[:field] "
                   "(default: %(default)s)")
    p.add_argument("--drop", default=None, help="comma-separated block indices to drop, e.g. 3,13")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: %(default)s)")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("export", help="write a pruned model as a Hugging Face directory or a GGUF file for "
                       "llama.cpp / Ollama (reload-checked)")
    p.add_argument("run", nargs="?", default=None, help="a run directory (instead of --model)")
    add_model_options(p)
    p.add_argument("--drop", default=None, help="comma-separated block indices to drop")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--format", default="hf", choices=("hf", "gguf"), help="hf: a Hugging Face directory (plain, "
                   "or trust_remote_code for per-layer widths); gguf: model-OUTTYPE.gguf for llama.cpp, Ollama and "
                   "LM Studio, loaded and compared by llama.cpp (default: %(default)s)")
    p.add_argument("--outtype", default="f16", choices=("f32", "f16", "q8_0", "q4_k_m"),
                   help="GGUF tensor type, quantized by llama.cpp's own quantizer (default: %(default)s)")
    p.add_argument("--check-data", default="wikitext2", help="held-out text whose first 2 x 256 tokens llama.cpp "
                   "and evoprune both score in the GGUF check: wikitext2 | c4 | text:PATH | jsonl:PATH[:field] "
                   "(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_export)
