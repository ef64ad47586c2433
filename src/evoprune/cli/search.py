"""``evoprune search`` and ``evoprune resume``: the flags generated from the configuration, recipe files.

Owns both commands (``add_parsers``). ``search`` takes every option of every space and method (each
flag generated once, from the config dataclass that owns it; see :mod:`evoprune.cli.options`), or a
recipe file (``--config recipe.yaml``: the sections of a run's ``config.json``, or flat option names;
flags given beside it win). ``resume RUN`` continues a run from its ``config.json`` with, optionally,
other execution options.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from .common import emit, progress, quiet_transformers, read_recipe
from .options import add_options, add_search_options, given

__all__ = ["add_parsers", "search_config", "search_sections", "search_methods", "method_help"]

_CLI_ONLY = ("func", "command", "config", "out", "budget_from")


def search_sections() -> dict[str, type]:
    """Every non-method section of every space and method (group title -> config class), in record order."""
    from ..runner.config import section_classes
    from ..search import SPACE_KINDS, methods

    titles = {"operator": "operator (methods that ask an LLM: self-pruner)",
              "training": "training (methods that train candidates: darwinlm)",
              "execution": "execution (Ray workers; may change on resume)"}
    out: dict[str, type] = {}
    for space in SPACE_KINDS:
        for m in methods(space):
            for name, cls in section_classes(space, m).items():
                if name == "method_options":
                    continue
                title = f"--space {space}" if name == "space_options" else titles.get(name, name)
                shared = next((t for t, c in out.items() if c is cls and t != title), None)
                if shared is not None and name == "space_options":  # spaces sharing one options class: one group
                    if space not in shared:
                        out = {(f"{t} / {space}" if t == shared else t): c for t, c in out.items()}
                    continue
                out.setdefault(title, cls)
    execution = out.pop(titles["execution"])
    return {**out, titles["execution"]: execution}


def search_methods() -> dict[tuple, type]:
    from ..search import SPACE_KINDS, get_strategy, methods

    return {(space, m): get_strategy(m, space) for space in SPACE_KINDS for m in methods(space)}


def method_help() -> str:
    from ..search import SPACE_KINDS, default_method, methods

    return "; ".join(f"{s}: {' | '.join(methods(s))} (default {default_method(s)})" for s in SPACE_KINDS)


def search_config(args: argparse.Namespace):
    """The :class:`~evoprune.runner.config.SearchConfig` of a ``search`` command line (recipe + flags)."""
    from ..runner.config import SearchConfig
    from ..runner.rundir import RunDir

    flags = given(args, skip=_CLI_ONLY)
    if getattr(args, "budget_from", None) is not None:
        if not args.budget_from.strip():
            raise UserError("--budget-from must not be empty")
        res = RunDir(args.budget_from).read_result()
        if res is None:
            raise UserError(f"--budget-from {args.budget_from}: run has no result.json")
        flags["budget"] = int(res["evaluations"])
    recipe = read_recipe(args.config) if getattr(args, "config", None) is not None else {}
    return SearchConfig.from_dict(recipe, overrides=flags)


def cmd_search(args) -> int:
    from ..runner.loop import run_search

    if not args.out.strip():
        raise UserError("--out must not be empty")
    quiet_transformers()
    emit(_noted(run_search(search_config(args), args.out, progress=progress())))
    return 0


def _noted(result: dict) -> dict:
    """``result``, after saying on stderr what the user must know of it (the LLM operator fell back)."""
    note = (result.get("llm") or {}).get("note")
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return result


def cmd_resume(args) -> int:
    from ..runner.config import SearchConfig
    from ..runner.loop import run_search
    from ..runner.rundir import RunDir

    quiet_transformers()
    run = RunDir(args.run)
    cfg = SearchConfig.from_dict(run.read_config())
    overrides = given(args, skip=("func", "command", "run"))
    if str(overrides.get("ray_address", "")).lower() == "none":
        overrides["ray_address"] = None
    if overrides:  # how to run the rest (e.g. another worker count); the result is the same
        cfg = cfg.replace_execution(**overrides)
    emit(_noted(run_search(cfg, args.run, resume=True, progress=progress())))
    return 0


# what a user sets, shown by ``search --help``; every other option is an expert knob: parsed as a flag and read
# from recipe files as always, listed by ``--help-all`` and in docs/cli.md
USER_OPTIONS = frozenset({
    "space", "method", "seed", "config", "out", "model", "device", "dtype", "calib", "sampling", "nsamples", "seqlen",
    "calib_from", "sparsity", "drop_count", "budget_token_layers", "fitness", "cache_mb", "protect_ends",
    "importance", "reconstruct", "operator_url", "operator_model", "training_aware", "train_data", "start_from",
    "generations", "population", "budget", "workers", "ray_address", "device_map", "report_to"})


def add_parsers(sub) -> None:
    from .options import HelpAll, UserHelpFormatter, mark_expert

    p = sub.add_parser("search", help="search for a pruning pattern (writes a resumable run directory)",
                       formatter_class=UserHelpFormatter,
                       description="Search for what to prune. Every option has one default, owned by the config "
                                   "class it belongs to; method options apply to the methods their help names. "
                                   "This help shows what a user sets; --help-all adds the expert knobs, which "
                                   "recipe files (--config) take as well.")
    p.add_argument("--help-all", action=HelpAll)
    p.add_argument("--space", default=argparse.SUPPRESS, help="layers (drop whole blocks) | width (per-layer head/"
                   "channel rates, Self-Pruner) | levels (attention and MLP compression levels, DarwinLM) "
                   "(default: layers)")
    p.add_argument("--method", default=argparse.SUPPRESS, help=method_help())
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="random seed (default: 0)")
    p.add_argument("--config", default=None, metavar="RECIPE",
                   help="a recipe file (YAML or JSON): the sections of a run's config.json, or flat option names; "
                        "flags given beside it win")
    p.add_argument("--budget-from", default=None, metavar="RUN",
                   help="random: use the evaluation count of this finished run as --budget")
    p.add_argument("--out", required=True, help="run directory (resumed if it holds the same search)")
    add_search_options(p, sections=search_sections(), methods=search_methods())
    mark_expert(p, USER_OPTIONS)
    p.set_defaults(func=cmd_search)

    from ..runner.sections import ExecutionOptions

    p = sub.add_parser("resume", help="continue a killed search from its run directory")
    p.add_argument("run", help="run directory")
    g = p.add_argument_group("execution options (default: as the run was started; --ray-address none drops it)")
    add_options(g, ExecutionOptions)
    p.set_defaults(func=cmd_resume)
