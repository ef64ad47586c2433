"""The ``evoprune`` command line: a thin layer over the library.

Owns argument parsing and the error contract: a :class:`~evoprune.errors.UserError`
(or a bad argument) prints one ``evoprune: error: ...`` line on stderr and exits
with code 2, without a traceback and without writing anything. Commands whose
result is data print it as JSON on their last stdout line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError

__all__ = ["main", "build_parser"]


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), run dir, .gguf file, local HF dir or hub id (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")


def _add_workers(p: argparse.ArgumentParser, resume: bool = False) -> None:
    keep = " (default: as the run was started)" if resume else ""
    g = p.add_argument_group("Ray workers (same result as one process; see README)")
    g.add_argument("--workers", type=int,
                   help="evaluate candidates on N Ray actors, one model each" + (keep or " (default 1: no Ray)"))
    g.add_argument("--ray-address", help="run the workers on an existing Ray cluster (e.g. auto, ray://head:10001)"
                   + (keep + "; none: drop it (a local cluster, or no Ray with --workers 1)" if resume else ""))
    g.add_argument("--gpus-per-worker", type=float,
                   help="with --device cuda: GPUs per actor (default 1; a fraction shares a GPU)" + keep)
    g.add_argument("--device-map", help="load the model with from_pretrained(device_map=...), e.g. auto: split it "
                   "over the visible GPUs (default: auto when --gpus-per-worker > 1, else one --device)" + keep)


def _progress() -> bool:
    return not os.environ.get("EVOPRUNE_NO_PROGRESS")


def _load(args):
    import torch
    from transformers.utils import logging as hf_logging

    # per-tensor loading bars would precede (and clutter) one-line error messages
    hf_logging.disable_progress_bar()
    if not os.environ.get("EVOPRUNE_VERBOSE"):
        hf_logging.set_verbosity_error()

    from .models import load_model

    return load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device, progress=_progress())


def _emit(obj: dict, out: str | None = None) -> None:
    """Print ``obj`` as the JSON last line of stdout; also save it to ``out`` when given."""
    if out:
        from pathlib import Path

        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2) + "\n")
    print(json.dumps(obj), flush=True)


def cmd_info(args) -> int:
    lm = _load(args)
    info = {"model": args.model, **lm.adapter.info(lm.model), "dropped_layers": list(lm.dropped)}
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    _emit(info)
    return 0


def _drop_arg(text: str | None):
    from .genome import GenomeError, parse_layer_list

    try:
        return parse_layer_list(text)
    except GenomeError as e:
        raise UserError(str(e)) from None


def cmd_ppl(args) -> int:
    from .data.sources import get_text
    from .evaluate.perplexity import perplexity, tokenize_text, windows

    drop = _drop_arg(args.drop)
    text = get_text(args.dataset, "eval")  # data errors before the (slow) model load
    lm = _load(args)
    pattern = lm.adapter.pattern(lm.model, drop)
    ids = tokenize_text(lm.tokenizer, text)
    windows(ids, args.seqlen, args.max_windows)  # validate before compute
    with lm.adapter.dropped(lm.model, pattern):
        res = perplexity(lm.model, ids=ids, seqlen=args.seqlen, max_windows=args.max_windows,
                         batch_size=args.batch_size, progress=_progress(), desc=f"ppl {args.dataset}")
    print(f"{args.dataset}: ppl {res.ppl:.4f} over {res.tokens} predicted tokens ({res.windows} x {res.seqlen})",
          file=sys.stderr)
    _emit({"model": args.model, "dataset": args.dataset, "ppl": res.ppl, "nll": res.nll, "tokens": res.tokens,
           "windows": res.windows, "seqlen": res.seqlen, "dropped_layers": list(pattern.dropped)})
    return 0


def cmd_export(args) -> int:
    from .export import check_out_dir, export_dropped

    drop = _drop_arg(args.drop)
    check_out_dir(args.out, args.overwrite)
    if args.run and _is_width_run(args.run):
        if drop:
            raise UserError("--drop does not apply to a width-pruning run")
        return _export_width_run(args)
    model_spec = args.run or args.model
    args.model = model_spec
    lm = _load(args)
    lm.adapter.pattern(lm.model, drop)
    rec = export_dropped(lm, drop, args.out, overwrite=args.overwrite)
    print(f"exported {rec['n_layers']}-layer model to {args.out} (reload check: max |dlogit| = {rec['max_abs_diff']:.2e})",
          file=sys.stderr)
    _emit(rec)
    return 0


def _is_width_run(path) -> bool:
    from .record import WIDTH_SPACES, RunDir, is_run_dir

    return is_run_dir(path) and RunDir(path).read_config().get("space") in WIDTH_SPACES


def _export_width_run(args) -> int:
    from .export_width import export_width
    from .models import load_model
    from .record import RunDir, width_plan

    run = RunDir(args.run)
    lm = load_model(run.read_config()["model"], progress=_progress())
    plan = width_plan(run, lm)
    rec = export_width(lm, plan, args.out, overwrite=args.overwrite, extra={"run": str(args.run)})
    print(f"exported width-pruned model ({rec['params']:,} of {rec['params_dense']:,} params) to {args.out} "
          f"(reload check: max |dlogit| = {rec['max_abs_diff']:.2e}; loads with trust_remote_code=True)",
          file=sys.stderr)
    _emit(rec)
    return 0


def _search_config(args):
    from .config import SearchConfig

    fields = {f for f in SearchConfig.__dataclass_fields__}
    kw = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "training_aware" in kw:
        kw["training_aware"] = kw["training_aware"] == "on"
    return SearchConfig(**kw)


def cmd_search(args) -> int:
    from .run import run_search

    if args.budget_from:
        from .record import RunDir

        res = RunDir(args.budget_from).read_result()
        if res is None:
            raise UserError(f"--budget-from {args.budget_from}: run has no result.json")
        args.budget = int(res["evaluations"])
    cfg = _search_config(args)
    res = run_search(cfg, args.out, progress=_progress())
    _emit(res)
    return 0


def cmd_resume(args) -> int:
    import dataclasses

    from .record import RunDir
    from .run import EXECUTION_OPTIONS, SearchConfig, run_search

    run = RunDir(args.run)
    cfg = SearchConfig.from_dict(run.read_config())
    overrides = {k: getattr(args, k) for k in EXECUTION_OPTIONS if getattr(args, k, None) is not None}
    if str(overrides.get("ray_address", "")).lower() == "none":
        overrides["ray_address"] = None
    if overrides:  # how to run the rest (e.g. another worker count); the result is the same
        cfg = dataclasses.replace(cfg, **overrides)
    res = run_search(cfg, args.run, resume=True, progress=_progress())
    _emit(res)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="evoprune", description="Search-based pruning of Hugging Face causal LMs.")
    ap.add_argument("--version", action="version", version=f"evoprune {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="show a model's shape (layers, heads, KV heads, hidden, intermediate, params)")
    _add_model(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("ppl", help="perplexity on a held-out text (non-overlapping windows)")
    _add_model(p)
    p.add_argument("--dataset", default="wikitext2", help="wikitext2 | c4 | text:PATH | jsonl:PATH[:field]")
    p.add_argument("--drop", default=None, help="comma-separated block indices to drop, e.g. 3,13")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("export", help="write a pruned model as a plain Hugging Face directory")
    p.add_argument("run", nargs="?", default=None, help="a run directory (instead of --model)")
    _add_model(p)
    p.add_argument("--drop", default=None, help="comma-separated block indices to drop")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("search", help="search for a pruning pattern (writes a resumable run directory)")
    _add_model(p)
    p.add_argument("--method", default="evop", help="layers: evop | evo | sleb | shortgpt | exhaustive | random; "
                   "width: uniform | owl | evo | self-pruner; levels: darwinlm | uniform (default: %(default)s)")
    p.add_argument("--space", default="layers", help="layers (drop whole blocks) | width (per-layer head/channel "
                   "pruning rates) | levels (per-block attention and MLP compression levels from a level database, "
                   "DarwinLM) (default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sparsity", type=float, help="layers: fraction of blocks to drop, k = round(s*N), halves up; "
                   "width: mean pruning rate of the decoder layers")
    g.add_argument("--drop-count", type=int, help="number of blocks to drop (k)")
    p.add_argument("--calib", default="wikitext2", help="calibration source: wikitext2 | c4 | text:PATH | jsonl:PATH")
    p.add_argument("--sampling", default="ccds", help="ccds | random (default: %(default)s)")
    p.add_argument("--nsamples", type=int, help="random sampling: number of windows (default 5)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration sample (default 2048)")
    p.add_argument("--clusters", type=int, help="ccds: KMeans clusters (default 5)")
    p.add_argument("--samples-per-cluster", type=int, help="ccds: samples per cluster (default 1)")
    p.add_argument("--chunk-sentences", type=int, help="ccds: sentences per chunk (default 60)")
    p.add_argument("--embedder", help="ccds: sentence encoder id/path (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--calib-from", help="reuse the calibration set of another run directory")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--batch-size", type=int, help="calibration samples per forward (default 1)")
    p.add_argument("--population", type=int, help="evop: population size S (default 20)")
    p.add_argument("--generations", type=int, help="evop/evo: generations G (default 10)")
    p.add_argument("--mutation-rate", type=float, help="evop: bit-flip probability per block (default 0.05)")
    p.add_argument("--elite-fraction", type=float, help="evop: fraction kept per generation (default 0.3)")
    p.add_argument("--crossover", help="evop: uniform | one_point (default uniform)")
    p.add_argument("--protect-ends", action="store_true", default=None, help="sleb: never drop the first/last block")
    p.add_argument("--budget", type=int, help="random: number of evaluations (default 100)")
    p.add_argument("--budget-from", help="random: use the evaluation count of this finished run")
    p.add_argument("--force", action="store_true", default=None, help="exhaustive: run even above the size limit")
    p.add_argument("--offspring", type=int, help="evo: candidates per generation (default 16)")
    p.add_argument("--tokens-per-stage", "--fitness-tokens-per-stage", dest="tokens_per_stage",
                   help="evo/darwinlm: fitness tokens per selection stage, e.g. 512,2048 "
                   "(the last = the whole calibration set)")
    p.add_argument("--survivors-per-stage", help="evo: candidates promoted past each stage, e.g. 4,1 "
                   "(the last = parents kept; default 4)")
    p.add_argument("--fitness", help="nll (mean NLL, default) | kl (KL to the dense model's next-token distribution)")
    p.add_argument("--kl-topk", type=int, help="--fitness kl: keep only the dense model's top-K log-probs per token")
    p.add_argument("--budget-token-layers", type=int, help="stop once the spent token-layers reach this")
    p.add_argument("--cache-mb", type=float, help="MiB for the shared-prefix hidden-state LRU (default 0: off)")
    w = p.add_argument_group("--space width (Self-Pruner, OWL, uniform Wanda-sp)")
    w.add_argument("--importance", help="wanda_sp (default) | magnitude: ranks heads and channels inside a layer")
    w.add_argument("--min-rate", type=float, help="lowest per-layer rate (default 0)")
    w.add_argument("--max-rate", type=float, help="highest per-layer rate (default 1: a layer may lose all its width)")
    w.add_argument("--mutations", type=int, help="evo/self-pruner: mutants per generation M (default 4)")
    w.add_argument("--crossovers", type=int, help="evo/self-pruner: crossover children per generation S (default 4)")
    w.add_argument("--step", type=float, help="evo: largest rate moved between two layers per mutation (default 0.05)")
    w.add_argument("--owl-lambda", type=float, help="owl: rate spread lambda (default 0.08)")
    w.add_argument("--owl-m", type=float, help="owl: outlier threshold M x layer mean (default 5)")
    w.add_argument("--no-llm-init", dest="llm_init", action="store_false", default=None,
                   help="self-pruner ablation: random initial population instead of the LLM's")
    w.add_argument("--no-llm-mutation", dest="llm_mutation", action="store_false", default=None,
                   help="self-pruner ablation: non-LLM mutation")
    w.add_argument("--no-llm-crossover", dest="llm_crossover", action="store_false", default=None,
                   help="self-pruner ablation: non-LLM crossover")
    w.add_argument("--operator-url", help="self-pruner: OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 "
                   "(API key from $OPENAI_API_KEY)")
    w.add_argument("--operator-model", help="self-pruner: model name the endpoint serves")
    w.add_argument("--operator-timeout-s", type=float, help="self-pruner: seconds per LLM request (default 120)")
    w.add_argument("--operator-retries", type=int, help="self-pruner: retries per LLM call (default 3)")
    w.add_argument("--operator-call-budget", type=int, help="self-pruner: most LLM requests per run (default 200)")
    w.add_argument("--operator-temperature", type=float, help="self-pruner: sampling temperature (default 0.7)")
    w.add_argument("--operator-max-tokens", type=int, help="self-pruner: reply token cap (default: sized to the request)")
    v = p.add_argument_group("--space levels (DarwinLM: level database, training-aware selection)")
    v.add_argument("--database", help="obs (ZipLM-style structured OBS with weight updates, default) | wanda_sp "
                   "(Wanda-sp order, weights unchanged)")
    v.add_argument("--levels-db", help="level database directory (default: $EVOPRUNE_CACHE/levels/<fingerprint>; "
                   "built on first use, reused by every run with the same model, calibration set and ladder)")
    v.add_argument("--attn-levels", type=int, help="attention ladder steps (default min(groups, 8))")
    v.add_argument("--mlp-levels", type=int, help="MLP ladder steps (default: one MLP step ~ one attention step "
                   "in parameters)")
    v.add_argument("--obs-damp", type=float, help="OBS Hessian dampening, fraction of its mean diagonal (default 0.01)")
    v.add_argument("--hessian-mb", type=float, help="MiB of float64 Hessians per database pass (default 2048)")
    v.add_argument("--separate-budgets", action="store_true", default=None,
                   help="attention and MLP each lose --sparsity of their parameters (default: one joint budget)")
    v.add_argument("--max-flips", type=int, help="darwinlm: most level switches per mutation (default 3)")
    v.add_argument("--no-elitism", dest="elitism", action="store_false", default=None,
                   help="darwinlm: parents do not compete with their offspring")
    v.add_argument("--training-aware", choices=("on", "off"), help="darwinlm: fine-tune each candidate briefly "
                   "before scoring it (default on); off = one-shot DarwinLM at the same search budget")
    v.add_argument("--train-tokens-per-stage", help="darwinlm: training tokens per selection stage, e.g. 1024,4096 "
                   "(default: the stage's fitness tokens)")
    v.add_argument("--train-mode", help="darwinlm: lora (default) | full (AdamW on the block projections)")
    v.add_argument("--train-lr", type=float, help="darwinlm: brief-training lr (default 5e-4 lora, 5e-5 full)")
    v.add_argument("--train-rank", type=int, help="darwinlm: LoRA rank of the brief training (default 8)")
    v.add_argument("--train-data", help="darwinlm: training text (default: the --calib source; windows that share "
                   "a 16-token sequence with the calibration set are left out)")
    _add_workers(p)
    p.add_argument("--out", required=True, help="run directory (resumed if it holds the same search)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("resume", help="continue a killed search from its run directory")
    p.add_argument("run", help="run directory")
    _add_workers(p, resume=True)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("demo", help="EvoP search, dense vs pruned perplexity and export on the bundled model")
    _add_model(p)
    p.add_argument("--out", default="demo_out", help="where the demo writes (default: %(default)s)")
    p.add_argument("--seqlen", type=int, default=512, help="held-out window length (default: %(default)s)")
    p.add_argument("--max-windows", type=int, default=4, help="held-out windows per dataset (default: %(default)s)")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration sample (default: %(default)s)")
    p.add_argument("--population", type=int, default=12, help="EvoP population (default: %(default)s)")
    p.add_argument("--generations", type=int, default=4, help="EvoP generations (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    from .evaluate.zeroshot import add_eval_parser

    add_eval_parser(sub)

    from .evaluate.bench import add_bench_parser
    from .report import add_report_parsers

    add_bench_parser(sub)
    add_report_parsers(sub)

    from .finetune.command import add_finetune_parser

    add_finetune_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"evoprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evoprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
