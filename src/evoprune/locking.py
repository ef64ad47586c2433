"""One writer per directory: an exclusive OS lock held for a writer's whole life, and who holds it.

Owns :func:`writer_lock` (``with writer_lock(path, "run directory"):`` creates the directory if needed
and holds ``flock(LOCK_EX)`` on the directory itself until the block ends) and :func:`holder` (the pid
of the process that holds a directory's lock, or ``None``: what readers say about a run in progress).

Why ``flock`` on the directory: the kernel releases it when its holder dies, kill -9 included, so
there is never a stale lock to clean up, and nothing is written into the directory to take it (a
refused writer changes nothing). A second writer, in another process or in this one (each lock is its
own open file description), gets a :class:`~evoprune.errors.UserError` naming the directory and the
holder's pid.

A directory the lock created is removed again when the block fails while it is still empty (a
refused or invalid command leaves nothing behind). The holder's pid comes from ``/proc/locks`` on
Linux; elsewhere a shared-lock probe tells only *whether* a writer holds it. A filesystem without
``flock`` (some network filesystems) gets a warning and no lock; Windows has no ``fcntl``: no lock.
"""
from __future__ import annotations

import errno
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["writer_lock", "holder", "UNKNOWN_PID"]

UNKNOWN_PID = 0  # holder(): locked by a process whose pid this platform does not tell
_PROBE_RETRIES = 5  # a reader's shared-lock probe (non-Linux) holds the lock for microseconds: retry past it


def _created_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; the ones created, outermost first."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            pass
        except OSError:  # a parent is a file, no permission: leave nothing half-made
            _remove_empty(created)
            raise
    return created


def _remove_empty(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:  # not empty (someone wrote there), or gone
            return


def _proc_locks() -> list[tuple[int, int, int, int]] | None:
    """``(pid, major, minor, inode)`` of the flock locks in ``/proc/locks``; ``None`` where there is no such file."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK":  # "N: -> FLOCK ..." lines are waiters, not holders
            continue
        try:
            major, minor, inode = parts[5].split(":")
            out.append((int(parts[4]), int(major, 16), int(minor, 16), int(inode)))
        except ValueError:
            continue
    return out


def holder(path: str | os.PathLike) -> int | None:
    """The pid of the process holding ``path``'s writer lock; :data:`UNKNOWN_PID` when it is held by a process
    this platform does not name; ``None`` when no writer holds it (or ``path`` does not exist)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    locks = _proc_locks()
    if locks is not None:
        major, minor = os.major(st.st_dev), os.minor(st.st_dev)
        pids = [pid for pid, ma, mi, ino in locks if ino == st.st_ino and (ma, mi) == (major, minor)]
        return pids[0] if pids else None
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return UNKNOWN_PID
    except OSError:
        return None
    finally:
        os.close(fd)


def _busy(path: Path, what: str) -> UserError:
    pid = holder(path)
    who = f"pid {pid}" if pid else "pid unknown"
    if pid == os.getpid():
        who += ", this process"
    return UserError(f"{what} {path} is being written by another evoprune command ({who}); wait for it to "
                     f"finish or stop it, then try again")


def _acquire(path: Path, what: str) -> int | None:
    """Lock ``path`` (an existing directory): the locked descriptor; ``None`` where the filesystem cannot lock."""
    for attempt in range(_PROBE_RETRIES + 20):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except NotADirectoryError:
            raise UserError(f"{what} {path} exists and is not a directory") from None
        st = os.fstat(fd)
        if fcntl is None:
            os.close(fd)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if attempt < _PROBE_RETRIES and holder(path) == UNKNOWN_PID:
                time.sleep(0.05)
                continue
            raise _busy(path, what) from None
        except OSError as e:  # ENOLCK, EINVAL, EBADF: a filesystem without flock
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EINVAL, errno.EBADF, errno.EOPNOTSUPP):
                raise
            print(f"evoprune: warning: cannot lock {path} on this filesystem ({e.strerror}); make sure no other "
                  f"process writes it", file=sys.stderr)
            return None
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):  # replaced or removed meanwhile
            os.close(fd)
            _created_dirs(path)
            continue
        return fd
    raise UserError(f"{what} {path} keeps being replaced by another process; try again")


@contextmanager
def writer_lock(path: str | os.PathLike, what: str = "directory") -> Iterator[Path]:
    """Hold the exclusive writer lock on directory ``path`` (created, with its parents, if missing) while the block
    runs. ``what`` names it in messages (``"run directory"``, ``"--out directory"``). A directory created here
    and still empty when the block raises is removed. Raises :class:`UserError` when another writer holds it or
    ``path`` is a file."""
    if not os.fspath(path).strip():
        raise UserError(f"{what} must not be empty")
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a directory")
    try:
        created = _created_dirs(path)
    except NotADirectoryError:
        raise UserError(f"cannot create {what} {path}: a parent is a file") from None
    except OSError as e:
        raise UserError(f"cannot create {what} {path}: {e.strerror}") from None
    try:
        fd = _acquire(path, what)
    except BaseException:
        _remove_empty(created)
        raise
    ok = False
    try:
        yield path
        ok = True
    finally:
        if not ok:
            _remove_empty(created)
        if fd is not None:
            os.close(fd)  # closing the last descriptor of the open file releases the flock
