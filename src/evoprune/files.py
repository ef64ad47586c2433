"""Crash-safe files: whole-file writes that are never seen half-written, and append-only JSON lines.

Owns :func:`atomic_open` / :func:`atomic_write_json` (write to a temporary file in the destination's
directory, flush + fsync, then ``os.replace``: a process killed at any instant leaves either the old
file or the new one), :func:`atomic_dir` (the same for a directory: exports, model caches, level
databases) and the JSON-lines pair :func:`append_jsonl` / :func:`read_jsonl`. An append
that a kill interrupts leaves a *torn* last line (no newline, or not JSON); :func:`read_jsonl` drops
it, optionally cutting it off the file so that the next append starts on a fresh line. An append or a
whole-file write that fails (a full disk, a quota) leaves the file as it was and raises the ``OSError`` with
the file's name (a failed ``write`` alone does not carry one).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

__all__ = ["atomic_open", "atomic_write_json", "atomic_write_text", "atomic_dir", "append_jsonl", "read_jsonl"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files; mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make every written file private
    try:
        with _naming(path), os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(dest: str | os.PathLike, done: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary sibling directory of ``dest``; when the block ends without an error it becomes ``dest``
    (an existing ``dest`` is replaced), else it is removed. ``done(dest)``: when true at that moment
    (another process finished the same directory first), the new one is discarded and ``dest`` kept."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if done is None or not done(dest):
            if dest.exists():
                shutil.rmtree(dest)
            try:
                os.replace(tmp, dest)
            except OSError:
                if done is None or not done(dest):  # not a concurrent finish: a real failure
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as (indented) JSON to ``path`` atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Give an ``OSError`` raised inside the block ``path`` as its file name when it has none."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), os.fspath(path)) from e
        raise


def append_jsonl(path: str | os.PathLike, row: dict, *, fsync: bool = True) -> None:
    """Append ``row`` as one JSON line (UTF-8); ``fsync``: on disk before returning (a record that must survive).
    A write that fails part-way is cut off again (truncating needs no space), so the file never keeps a torn line."""
    line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    path = Path(path)
    with _naming(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:  # unbuffered: nothing is left in a buffer to be flushed later
                    view = view[os.write(fd, view):]
                if fsync:
                    os.fsync(fd)
            except BaseException:  # a full disk, or an interrupt between partial writes
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass  # read_jsonl still drops a torn last line
                raise
        finally:
            os.close(fd)


def read_jsonl(path: str | os.PathLike, *, cut_torn_tail: bool = False) -> list[dict]:
    """The complete JSON lines of ``path`` (``[]`` when it does not exist).

    A torn last line (unterminated, or not JSON) is dropped; with ``cut_torn_tail`` it is also
    truncated off the file. A line before the last that is not JSON raises ``ValueError`` naming
    its number: that is corruption, not an interrupted append.
    """
    p = Path(path)
    if not p.is_file():
        return []
    data = p.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (b"" when none)
    rows, good_bytes = [], 0
    for i, raw in enumerate(complete):
        try:
            rows.append(json.loads(raw.decode("utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if i == len(complete) - 1 and not tail:
                break  # the last line is torn: treated like an unterminated one
            raise ValueError(f"{p}: line {i + 1} is not JSON") from None
        good_bytes += len(raw) + 1
    if cut_torn_tail and good_bytes < len(data):
        with open(p, "r+b") as f:
            f.truncate(good_bytes)
            f.flush()
            os.fsync(f.fileno())
    return rows
