"""The ``evoprune`` command line: a thin layer over the library (which never imports it).

Owns :func:`main`, :func:`build_parser` and the error contract: a :class:`~evoprune.errors.UserError`,
a bad argument, or an ``OSError`` naming a file (anything the user named that cannot be read or
written) prints one ``evoprune: error: ...`` line on stderr and exits with code 2, without a traceback
and without writing anything. A failed write of the machine's making (a full disk, a quota) is one line and
exit 1; SIGINT and SIGTERM alike stop a command with ``evoprune: interrupted (SIGTERM)`` and exit 128 + the
signal's number. Where a run directory was being written, both lines end with the command that continues
it (``evoprune resume RUN``). Commands whose result is data print it as JSON on their last stdout
line. One module per command group: :mod:`.models` (info, ppl, export), :mod:`.search` (search,
resume), :mod:`.evaluate` (eval, bench), :mod:`.report` (report, compare), :mod:`.finetune`,
:mod:`.plan`, :mod:`.demo`, :mod:`.serve` (operator-server); shared argument helpers in :mod:`.common` and :mod:`.options`.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from ..errors import Interrupted, UserError, WriteFailed, describe_os_error, is_write_failure
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad argument (one line printed), --help, --version: the code, also in-process
        return int(e.code or 0)
    with _signals_interrupt():
        try:
            return int(args.func(args) or 0)
        except UserError as e:
            print(f"evoprune: error: {e}", file=sys.stderr)
            return 2
        except WriteFailed as e:
            then = (f"; the run directory is consistent: once that is fixed (e.g. space is back), continue with: "
                    f"{e.resume}" if e.resume else "")
            print(f"evoprune: error: {e}{then}", file=sys.stderr)
            return 1
        except OSError as e:
            if is_write_failure(e):  # outside a run: the outputs are written atomically, so nothing was
                print(f"evoprune: error: cannot write {describe_os_error(e)} (nothing was written)", file=sys.stderr)
                return 1
            if e.filename is None:  # not about a path the user named: a bug or the machine, keep the traceback
                raise
            print(f"evoprune: error: {describe_os_error(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            stop = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
            then = f"; continue with: {stop.resume}" if stop.resume else ""
            print(f"evoprune: interrupted ({signal.Signals(stop.signum).name}){then}", file=sys.stderr)
            return stop.exit_code


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (what schedulers and service managers send first) stops a command as Ctrl-C does: an
    :class:`Interrupted` raised where Python is, so every ``finally`` runs. Main thread only (Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}  # an ignored signal (nohup, `cmd &`) stays ignored
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
