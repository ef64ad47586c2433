"""A local OpenAI-compatible chat server for the LLM operator: ``transformers serve`` in a subprocess.

Owns :func:`start_local_server` (a context manager that launches
``transformers serve`` pinned to one model directory on ``host:port``, waits until
it answers ``/health`` and always stops it on exit) and :class:`LocalServer`
(what it yields: the base URL and the model name to send). Used by tests and
benchmarks to run Self-Pruner against a small local model (e.g. the bundled
SmolLM2-135M-Instruct) without network access. Torch-free: the model lives in the
child process. Needs the ``[llm]`` extra (``transformers[serving]``: fastapi, uvicorn).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ...errors import UserError

__all__ = ["LocalServer", "start_local_server", "free_port"]


@dataclass(frozen=True)
class LocalServer:
    """A running server: ``url`` is the OpenAI base URL (``http://HOST:PORT/v1``); ``model`` the
    name requests must carry (the server is pinned to it); ``log_path`` its stdout+stderr."""

    url: str
    model: str
    pid: int
    log_path: Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is not None:
        return
    try:  # the child leads its own session: signal its group (uvicorn workers, if any, included)
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(timeout=grace_s)


@contextmanager
def start_local_server(model_dir: str | os.PathLike, port: int = 0, *, host: str = "127.0.0.1",
                       device: str = "cpu", startup_timeout_s: float = 180.0, offline: bool = True,
                       extra_args: Sequence[str] = (), log_path: str | os.PathLike | None = None,
                       ) -> Iterator[LocalServer]:
    """Run ``transformers serve`` for the HF model directory ``model_dir`` while the block runs.

    ``port=0`` picks a free port. ``offline`` sets ``HF_HUB_OFFLINE=1`` in the child.
    Readiness: ``GET /health`` answers 200 (the pinned model is loaded before the
    server starts listening). Raises :class:`UserError` when the directory is
    missing, or the server exits or is not ready within ``startup_timeout_s``
    (with the tail of its log). The server is terminated (SIGTERM, then SIGKILL)
    on exit from the block, also on error. Its output goes to ``log_path`` (kept)
    or to a temporary file (deleted).
    """
    model_dir = Path(model_dir).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise UserError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    port = port or free_port(host)
    keep_log = log_path is not None
    if log_path is None:
        fd, tmp = tempfile.mkstemp(prefix="evoprune-serve-", suffix=".log")
        os.close(fd)
        log_path = tmp
    log_path = Path(log_path)
    env = dict(os.environ)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--host", host,
           "--port", str(port), "--device", device, *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        root = f"http://{host}:{port}"
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise UserError(f"transformers serve exited with code {proc.returncode}:\n{_tail(log_path)}")
            try:
                with urllib.request.urlopen(root + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise UserError(f"transformers serve not ready after {startup_timeout_s:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.25)
        yield LocalServer(url=root + "/v1", model=str(model_dir), pid=proc.pid, log_path=log_path)
    finally:
        _stop(proc, grace_s=15.0)
        if not keep_log:
            log_path.unlink(missing_ok=True)
