"""``evoprune plan``: what a search will cost (memory, token-layers, FLOPs, GPU time, workers) before it runs.

Owns the command. It takes every option of ``search`` (the same generated flags, or ``--config RECIPE``)
plus ``--model-config NAME|PATH|HUB_ID`` (plan for a model without its weights: a shipped reference
config, a ``config.json`` or its directory, a hub id), ``--tflops``, ``--gpus``, ``--gpu-memory`` and
``--mfu``; prints a table and, as its last stdout line, the plan as JSON (:func:`evoprune.plan.make_plan`).
Offline and in seconds: the model is built on the ``meta`` device.
"""
from __future__ import annotations

import argparse
import math

from ..errors import UserError

from .common import emit, quiet_transformers, read_recipe
from .options import add_search_options, given

__all__ = ["add_parsers"]

_PLAN_ONLY = ("func", "command", "config", "model_config", "tflops", "gpus", "gpu_memory", "mfu")


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2 ** 30:,.2f} GiB"


def _table(p: dict) -> str:
    from ..report.tables import text_table

    place, run = p["placement"], p["token_layers"]["run"]
    rows = [[f"memory: {k}", _gib(v)] for k, v in place["memory"].items()]
    rows += [["memory per worker", _gib(place["per_worker_bytes"])],
             ["GPUs per worker / Ray workers", f"{place['gpus_per_worker']} / {place['workers']}" if place["fits"]
              else "does not fit"],
             ["--cache-every", str(place["cache_every"] if place["cache_every"] is not None else "-")]]
    rows += [[f"token-layers: setup ({k})", f"{v:,}"] for k, v in run["setup"].items()]
    rows += [[f"token-layers / FLOPs per candidate, stage {s} (max)", f"{v:,} / {p['flops_per_candidate_max'][s]:.3g}"]
             for s, v in p["token_layers"]["per_candidate_max"].items()]
    if run.get("simulated"):
        rows += [["evaluations (dry run)", f"{run['evaluations']:,}"],
                 ["token-layers per run (dry run)", f"{run['token_layers']:,}"],
                 ["FLOPs per run (LM head included)", f"{run['flops']:.3g}"],
                 [f"GPU wall time at {p['time']['tflops']:g} TFLOP/s x {p['time']['mfu']:.0%}",
                  f"{p['time']['run_s'] / 3600:.2f} h"]]
    else:
        rows.append(["per run", run["note"]])
    if "sleb" in p:
        s = p["sleb"]
        rows += [["SLEB: evaluations / token-layers", f"{s['evaluations']:,} / {s['token_layers']:,}"],
                 ["SLEB: FLOPs / GPU wall time", f"{s['flops']:.3g} / {p['time']['sleb_s'] / 3600:.2f} h"],
                 ["token-layers vs SLEB", f"{run['token_layers'] / s['token_layers']:.3f}x"
                  if run.get("simulated") else "-"]]
    m = p["model"]
    title = (f"plan: {p['search']['method']} (--space {p['search']['space']}) on {m['params'] / 1e9:.2f}B params, "
             f"{m['n_layers']} blocks, {m['dtype']}, calibration {p['search']['calibration'][0]} x "
             f"{p['search']['calibration'][1]}")
    return text_table(["", ""], rows, title=title)


def _check_machine(args) -> None:
    """The machine flags, before anything is built: finite, positive, --mfu a fraction."""
    for name in ("tflops", "gpu_memory"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"--{name.replace('_', '-')} must be a number > 0, got {v}")
    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.model_config is not None and not args.model_config.strip():
        raise UserError("--model-config must not be empty")


def cmd_plan(args) -> int:
    from ..models.preflight import check_window, config_facts
    from ..plan import make_plan, meta_model, resolve_config
    from ..runner.config import SearchConfig

    quiet_transformers()
    _check_machine(args)
    recipe = read_recipe(args.config) if getattr(args, "config", None) is not None else {}
    flags = given(args, skip=_PLAN_ONLY)
    cfg = SearchConfig.from_dict(recipe, overrides=flags)
    config, source = resolve_config(args.model_config or cfg.model.model)
    seqlen = cfg.calibration.seqlen
    check_window(config_facts(config), seqlen, f"--seqlen {seqlen}", args.model_config or cfg.model.model)
    lm = meta_model(config, cfg.model.dtype, name=args.model_config or cfg.model.model)
    p = make_plan(cfg, lm, tflops=args.tflops, gpus=args.gpus, gpu_memory_gib=args.gpu_memory, mfu=args.mfu)
    p["model"]["config"] = source
    print(_table(p))
    emit(p)
    return 0


def add_parsers(sub) -> None:
    from ..plan.planner import MFU
    from .search import method_help, search_methods, search_sections

    p = sub.add_parser("plan", help="predict a search's memory, token-layers, FLOPs, GPU time and workers (offline)",
                       description="Plan a search before running it: the same options as `search`, the model "
                                   "built on the meta device (no weights).")
    p.add_argument("--model-config", default=None, metavar="NAME|PATH|HUB_ID",
                   help="plan for this model's config instead of --model's: a shipped config (llama-3.1-8b, "
                        "llama-3.1-70b, mistral-7b, qwen2.5-14b, smollm2-135m), a config.json or its directory, "
                        "or a hub id")
    p.add_argument("--tflops", type=float, default=400.0, help="peak dense TFLOP/s of one GPU in --dtype (default: 400)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs available (default: 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory of one GPU (default: 80)")
    p.add_argument("--mfu", type=float, default=MFU, help=f"utilisation assumed for wall time (default: {MFU})")
    p.add_argument("--space", default=argparse.SUPPRESS, help="layers | sublayers | width | levels (default: layers)")
    p.add_argument("--method", default=argparse.SUPPRESS, help=method_help())
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="random seed (default: 0)")
    p.add_argument("--config", default=None, metavar="RECIPE", help="a recipe file, as for search")
    add_search_options(p, sections=search_sections(), methods=search_methods())
    p.set_defaults(func=cmd_plan)
