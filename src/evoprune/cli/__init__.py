"""The ``evoprune`` command line: a thin layer over the library (which never imports it).

Owns :func:`main`, :func:`build_parser` and the error contract: a :class:`~evoprune.errors.UserError`,
a bad argument, or an ``OSError`` naming a file (anything the user named that cannot be read or
written) prints one ``evoprune: error: ...`` line on stderr and exits with code 2, without a traceback
and without writing anything. Commands whose result is data print it as JSON on their last stdout
line. One module per command group: :mod:`.models` (info, ppl, export), :mod:`.search` (search,
resume), :mod:`.evaluate` (eval, bench), :mod:`.report` (report, compare), :mod:`.finetune`,
:mod:`.plan`, :mod:`.demo`, :mod:`.serve` (operator-server); shared argument helpers in :mod:`.common` and :mod:`.options`.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import UserError, describe_os_error
from ..version import __version__

__all__ = ["main", "build_parser", "Parser"]


class Parser(argparse.ArgumentParser):
    """argparse with the error contract: a bad argument is one ``evoprune: error:`` line and exit 2 (``--help``
    still prints the usage)."""

    def error(self, message: str):
        self.exit(2, f"evoprune: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import demo, evaluate, finetune, models, plan, report, search, serve

    ap = Parser(prog="evoprune", description="Search-based pruning of Hugging Face causal LMs.")
    ap.add_argument("--version", action="version", version=f"evoprune {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for group in (models, search, plan, demo, evaluate, report, finetune, serve):
        group.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"evoprune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user named: a bug or the machine, keep the traceback
            raise
        print(f"evoprune: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evoprune: interrupted", file=sys.stderr)
        return 130
