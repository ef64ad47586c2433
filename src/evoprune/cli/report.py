"""``evoprune report RUN`` and ``evoprune compare RUN...``: the commands over :mod:`evoprune.report`.

Owns both commands (``add_parsers``). Neither loads a model nor imports torch.
"""
from __future__ import annotations

import sys

from .common import emit

__all__ = ["add_parsers"]


def cmd_report(args) -> int:
    from ..report import write_report
    from ..report.tables import fmt

    res = write_report(args.run, args.out)
    rates = res.get("rates")
    best = f"rates {min(rates):.2f}-{max(rates):.2f}" if rates else f"drop {res['dropped_layers']}"
    if res.get("dropped_attention") is not None:
        best = f"drop attention {res['dropped_attention']}, MLP {res['dropped_mlp']}"
    print(f"wrote {res['report']} and {len(res['plots'])} plots "
          f"(best: {best}, calib loss {fmt(res['calib_loss'], '.4f')})", file=sys.stderr)
    emit(res)
    return 0


def cmd_compare(args) -> int:
    from ..locking import writer_lock
    from ..report import compare_runs
    from ..runner.rundir import RunDir

    for run in args.runs:  # every run readable before --out is touched
        RunDir(run).read_config()
    with writer_lock(args.out, "--out directory"):
        res = compare_runs(args.runs, args.out, args.ppl_json)
    print(res.pop("table_markdown"))
    print(f"wrote {res['figure']}, {res['front_figure']} and {res['table']}", file=sys.stderr)
    emit(res)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("report", help="write RUN/report.md with fitness and pattern plots")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", default=None, help="write the report here instead of into RUN")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="rank runs of any spaces: held-out ppl / accuracy / speed vs size, Pareto fronts, best run per budget")
    p.add_argument("runs", nargs="+", help="finished run directories")
    p.add_argument("--out", default="compare", help="output directory (default: %(default)s)")
    p.add_argument("--ppl-json", default=None,
                   help='JSON file mapping run -> {"wikitext2": ppl, ...} (a "dense" entry is drawn at sparsity 0)')
    p.set_defaults(func=cmd_compare)
