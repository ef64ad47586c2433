"""``evoprune eval`` (zero-shot accuracy, lm-eval) and ``evoprune bench`` (speed and memory, dense vs pruned).

Owns both commands (``add_parsers``) and their terminal tables (:func:`evoprune.report.tables.text_table`).
"""
from __future__ import annotations

import copy
import os
import sys

from ..errors import UserError
from .common import add_model_options, at_least, check_out_file, drop_arg, emit, load, preflight

__all__ = ["add_parsers", "zeroshot_table", "bench_table"]


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def zeroshot_table(res: dict) -> str:
    """acc and acc_norm in % per task, the mean last."""
    rows = [[name, v["n"] or "-", _pct(v["acc"]), _pct(v["acc_norm"])] for name, v in res["tasks"].items()]
    rows.append(["mean", "", _pct(res["mean_acc"]), _pct(res.get("mean_acc_norm_or_acc")) + " *"])
    from ..report.tables import text_table

    return text_table(["task", "n", "acc", "acc_norm"], rows,
                      footer=["* mean of acc_norm, or acc where the task has no acc_norm"])


def cmd_eval(args) -> int:
    from ..evaluate.zeroshot import build_tasks, zeroshot

    drop = drop_arg(args.drop)
    if not os.environ.get("EVOPRUNE_VERBOSE"):
        import datasets

        datasets.disable_progress_bars()
    at_least(args, 1, "limit", "batch_size")
    at_least(args, 0, "num_fewshot")
    check_out_file(args.out)
    preflight(args.model, args.device, drop=drop)
    built = build_tasks(args.tasks, stock=args.stock_tasks, num_fewshot=args.num_fewshot)  # data errors first
    lm = load(args.model, args.device, args.dtype)
    dropped = list(lm.dropped)
    if drop:
        if dropped:
            raise UserError(f"--drop cannot be combined with a run directory ({args.model} already drops {dropped})")
        dropped = list(lm.adapter.drop_inplace(lm.model, drop).dropped)
    res = zeroshot(lm.model, lm.tokenizer, list(built[0]), limit=args.limit, num_fewshot=args.num_fewshot,
                   batch_size=args.batch_size, stock=args.stock_tasks, built=built)
    res = {"model": args.model, "dropped_layers": dropped, "n_layers": lm.adapter.n_layers(lm.model), **res}
    print(zeroshot_table(res))
    print(f"({res['task_source']} tasks, limit {args.limit or 'none'}, {res['seconds']:.1f} s)", file=sys.stderr)
    emit(res, args.out)
    return 0


def bench_table(res: dict) -> str:
    """One line per model, then the speedups and the measurement conditions."""
    from ..report.tables import text_table

    mb = lambda x: f"{x / 2**20:.1f}"  # noqa: E731
    rows = [[r["name"], r["layers"], f"{r['params'] / 1e6:.2f}M", f"{r['prefill_ms']:.1f}", f"{r['prefill_tok_s']:.0f}",
             f"{r['decode_tok_s']:.1f}", mb(r["weight_bytes"]), mb(r["peak_mem_bytes"]), mb(r["kv_cache_bytes"])]
            for r in res["rows"]]
    s, i, o, ih = res["speedup"], res["ideal_speedup"], res["speedup_over_ideal"], res["ideal_speedup_with_head"]
    footer = [f"speedup dense/pruned: prefill {s['prefill']:.3f}x, decode {s['decode']:.3f}x; "
              f"ideal (block FLOPs) {i:.3f}x -> {100 * o['prefill']:.1f}% / {100 * o['decode']:.1f}% of ideal",
              f"ideal incl. LM head: prefill {ih['prefill']:.3f}x, decode {ih['decode']:.3f}x; "
              f"params x{res['params_ratio']:.3f}, peak memory x{res['peak_mem_ratio']:.3f}, KV cache "
              f"x{res['kv_cache_ratio']:.3f} (after the prefill)",
              f"batch {res['batch']}, seqlen {res['seqlen']}, {res['decode_tokens']} decode tokens after a "
              f"{res['prompt_tokens']}-token prompt, median of {res['repeats']} after 1 warm-up, {res['device']}, "
              f"{res['threads']} threads; memory: {res['mem_method_text']}"]
    return text_table(["model", "layers", "params", "prefill ms", "prefill tok/s", "decode tok/s", "weights MiB",
                       "peak MiB", "KV MiB"], rows, footer=footer)


def engine_table(res: dict) -> str:
    """``bench --engine llama.cpp``: one line per model, then the speedups and conditions."""
    from ..report.tables import text_table

    rows = [[r["name"], r["layers"], f"{r['params'] / 1e6:.2f}M", f"{r['file_bytes'] / 2**20:.1f}",
             f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}"] for r in res["rows"]]
    s, i = res["speedup"], res["ideal_speedup"]
    footer = [f"speedup pruned/dense in llama.cpp ({res['outtype']}): prefill {s['prefill']:.3f}x, decode "
              f"{s['decode']:.3f}x; ideal (block FLOPs) {i:.3f}x; params x{res['params_ratio']:.3f}, file "
              f"x{res['file_ratio']:.3f}",
              f"prefill {res['seqlen']} tokens, {res['decode_tokens']} decode tokens after a "
              f"{res['prompt_tokens']}-token prompt, median of {res['repeats']} after 1 warm-up, {res['threads']} threads, CPU"]
    return text_table(["model", "layers", "params", "GGUF MiB", "prefill tok/s", "decode tok/s"], rows,
                      footer=footer)


def _bench_models(args, drop):
    """The dense base and the pruned model of ``bench``'s arguments, and how the base was found."""
    from ..evaluate.bench import find_base

    if drop:
        if args.base:
            raise UserError("--drop prunes MODEL itself in memory; it cannot be combined with --base")
        base, dropped, how = args.model, list(drop), "--drop"
    else:
        base, dropped, how = find_base(args.model, args.base)
    dense = load(base, args.device, args.dtype)
    if drop:
        if dense.dropped:
            raise UserError(f"--drop cannot be combined with a run directory ({args.model} already drops "
                            f"{list(dense.dropped)})")
        pruned = copy.copy(dense)
        pruned.model = copy.deepcopy(dense.model)
        pruned.adapter.drop_inplace(pruned.model, drop)
        pruned.name, pruned.dropped = f"{args.model} --drop {args.drop}", tuple(drop)
    else:
        pruned = load(args.model, args.device, args.dtype)
        if dropped is None:
            dropped = list(pruned.dropped) or None
    dense.name = base
    return dense, pruned, base, dropped, how


def cmd_bench(args) -> int:
    """Load the dense base and the pruned model, measure both, print a table and JSON."""
    import torch

    from ..evaluate.bench import bench, speedups

    from ..evaluate.engine_bench import check_engine_args

    drop = drop_arg(args.drop)
    at_least(args, 1, "batch", "seqlen", "decode_tokens", "prompt_tokens", "repeats", "threads")
    check_engine_args(args.engine, args.batch)
    check_out_file(args.out)
    if args.base is not None:
        if not args.base.strip():
            raise UserError("--base must not be empty")
        preflight(args.base, args.device)
    generated = args.prompt_tokens + args.decode_tokens
    preflight(args.model, args.device, {f"--seqlen {args.seqlen}": args.seqlen,
                                        f"--prompt-tokens + --decode-tokens ({generated})": generated}, drop=drop)
    if args.engine == "llama.cpp":
        from ..evaluate.llamacpp import require_llama_cpp

        require_llama_cpp()
    dense, pruned, base, dropped, how = _bench_models(args, drop)
    if args.engine == "llama.cpp":
        return _bench_llama_cpp(args, dense, pruned, base, dropped, how)
    shape = dict(batch=args.batch, seqlen=args.seqlen, decode_tokens=args.decode_tokens,
                 prompt_tokens=args.prompt_tokens)
    res = bench({"dense": dense, "pruned": pruned}, **shape, repeats=args.repeats, device=args.device)
    res = {"model": args.model, "base": base, "base_from": how, "dropped_layers": dropped, "device": args.device,
           "dtype": args.dtype, "threads": torch.get_num_threads(), **shape, "repeats": args.repeats, "warmup": 1,
           "torch_version": torch.__version__, **res}
    res.update(speedups(res, **shape))
    if res["device"].startswith("cuda"):
        res["device_name"] = torch.cuda.get_device_name(torch.device(args.device))
    print(bench_table(res))
    emit(res, args.out)
    return 0


def _bench_llama_cpp(args, dense, pruned, base, dropped, how) -> int:
    from ..evaluate.engine_bench import bench_llama_cpp
    from ..models.loading import gguf_file

    res = bench_llama_cpp({"dense": dense, "pruned": pruned}, outtype=args.outtype, seqlen=args.seqlen,
                          decode_tokens=args.decode_tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                          threads=args.threads, gguf_source=gguf_file(base))
    res = {"model": args.model, "base": base, "base_from": how, "dropped_layers": dropped, **res}
    print(engine_table(res))
    emit(res, args.out)
    return 0


def add_parsers(sub) -> None:
    from ..evaluate.zeroshot import DEFAULT_TASKS

    p = sub.add_parser("eval", help="zero-shot accuracy with lm-evaluation-harness (offline task copies by default)")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="alias (smollm2-135m), run dir, .gguf file, local HF dir or hub id (default: %(default)s)")
    add_model_options(p, model=False)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated tasks (default: all seven)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples (offline tasks: 0 only)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass (default: %(default)s)")
    p.add_argument("--drop", default=None, help="comma-separated block indices to drop before scoring")
    p.add_argument("--stock-tasks", action="store_true", help="use lm-eval's own task definitions (needs the hub)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="prefill latency, decode tokens/s, peak memory and params: dense vs pruned")
    p.add_argument("model", help="pruned model: run directory, exported directory (pruning.json), or any model "
                                 "spec with --base / --drop")
    add_model_options(p, model=False)
    p.add_argument("--base", default=None, help="dense base model spec (default: from the run config or pruning.json)")
    p.add_argument("--drop", default=None, help="compare MODEL with MODEL minus these blocks (pruned in memory)")
    p.add_argument("--batch", type=int, default=1, help="sequences per forward (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="prefill tokens per sequence (default: %(default)s)")
    p.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens generated (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length before decoding (default: %(default)s)")
    p.add_argument("--engine", default="transformers", choices=("transformers", "llama.cpp"),
                   help="transformers: the models as evoprune runs them; llama.cpp: both written as GGUF files "
                   "(--outtype) and timed in llama.cpp, where they are served (default: %(default)s)")
    p.add_argument("--outtype", default="f16", choices=("f32", "f16", "q8_0", "q4_k_m"),
                   help="--engine llama.cpp: the GGUF tensor type of both models (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="--engine llama.cpp: CPU threads (default: one per "
                   "core)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed repeats after 1 warm-up; medians reported (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=cmd_bench)
