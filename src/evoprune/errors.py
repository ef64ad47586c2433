"""User-facing errors: the one exception type the CLI turns into one line, and the one way to raise it.

Owns :class:`UserError` (the CLI prints ``evoprune: error: ...`` on stderr and exits with code 2, no
traceback) and :func:`user_input`, the single mechanism that turns a failure to read or write
something the user named (a model file or directory, a run directory, an ``--out`` target, a data
file) into a :class:`UserError`: wrap the access in ``with user_input("model file", path):`` and any
``OSError`` (missing, not a directory, a directory where a file was expected, permission) or format
error of the file's contents (a truncated GGUF's ``struct.error``, bad JSON, a corrupt tensor file)
comes out as one line naming the thing and the path. Anything else that escapes is a bug and keeps
its traceback.

Two more ways a command ends without a traceback: :class:`Interrupted` (SIGINT or SIGTERM; the CLI exits
with 128 + the signal's number) and :class:`WriteFailed` (a full disk or another failed write while a run
was being written; exit 1). Both may carry ``resume``: the command that continues the run.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import struct
import zlib
from contextlib import contextmanager
from typing import Iterator

__all__ = ["UserError", "Interrupted", "WriteFailed", "user_input", "describe_os_error", "is_write_failure"]


class UserError(Exception):
    """Bad input from the user: a missing path, an unsupported model, an invalid value."""


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (SIGINT: Ctrl-C; SIGTERM: what Slurm, Kubernetes and systemd send first).
    A ``KeyboardInterrupt``, so every ``finally`` and ``except KeyboardInterrupt`` treats both signals alike.
    ``resume``: the command that continues what was stopped (``None``: nothing to continue)."""

    def __init__(self, signum: int = signal.SIGINT, resume: str | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.resume = int(signum), resume

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class WriteFailed(Exception):
    """A write that a run needed failed (a full disk, a quota, a read-only or failing device); what was written
    before stays consistent, so ``resume`` (the command that continues the run) works once the cause is gone."""

    def __init__(self, message: str, resume: str | None = None) -> None:
        super().__init__(message)
        self.resume = resume


# errnos that mean "the machine could not store this", not "the user named a wrong path"
_WRITE_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EIO")
                          if hasattr(errno, n))


def is_write_failure(e: BaseException) -> bool:
    """Whether ``e`` is a failed write of the kind a full disk causes (ENOSPC, EDQUOT, EFBIG, EROFS, EIO)."""
    return isinstance(e, OSError) and e.errno in _WRITE_ERRNOS


# errors that mean "the file's contents are not what they should be" (not a bug in evoprune)
_FORMAT_ERRORS = (ValueError, struct.error, EOFError, UnicodeDecodeError, json.JSONDecodeError, zlib.error,
                  KeyError, IndexError)


def describe_os_error(e: OSError) -> str:
    """``"<reason>: <path>"`` for an ``OSError`` (e.g. ``"Not a directory: runs/x"``)."""
    reason = e.strerror or type(e).__name__
    name = e.filename if e.filename is not None else ""
    return f"{reason}: {os.fsdecode(name)}" if name != "" else reason


@contextmanager
def user_input(what: str, path: str | os.PathLike, *, formats: bool = True) -> Iterator[None]:
    """Turn a failure to access ``path`` (``what`` it is, e.g. ``"--out directory"``) into a :class:`UserError`.

    ``formats``: also the format errors of the file's contents (``ValueError``, ``struct.error``,
    bad JSON, ...); pass ``False`` where the block computes more than it reads.
    """
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        raise UserError(f"cannot use {what} {os.fspath(path)}: {describe_os_error(e)}") from None
    except _FORMAT_ERRORS as e:
        if not formats:
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        raise UserError(f"cannot read {what} {os.fspath(path)}: {kind}"
                        + (f": {detail[:200]}" if detail else "") + " (truncated or not that kind of file?)") from None
