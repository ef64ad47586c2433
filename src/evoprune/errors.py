"""User-facing errors: the one exception type the CLI turns into one line, and the one way to raise it.

Owns :class:`UserError` (the CLI prints ``evoprune: error: ...`` on stderr and exits with code 2, no
traceback) and :func:`user_input`, the single mechanism that turns a failure to read or write
something the user named (a model file or directory, a run directory, an ``--out`` target, a data
file) into a :class:`UserError`: wrap the access in ``with user_input("model file", path):`` and any
``OSError`` (missing, not a directory, a directory where a file was expected, permission) or format
error of the file's contents (a truncated GGUF's ``struct.error``, bad JSON, a corrupt tensor file)
comes out as one line naming the thing and the path. Anything else that escapes is a bug and keeps
its traceback.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from contextlib import contextmanager
from typing import Iterator

__all__ = ["UserError", "user_input", "describe_os_error"]


class UserError(Exception):
    """Bad input from the user: a missing path, an unsupported model, an invalid value."""


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
