"""Local OpenAI-compatible chat servers for the LLM operator, in a subprocess: llama.cpp or ``transformers serve``.

Owns :func:`start_llama_cpp_server` (llama-cpp-python's server on a ``.gguf`` file: takes a JSON schema
as ``response_format``), :func:`start_local_server` (``transformers serve`` pinned to one model directory:
refuses ``response_format``) and :class:`LocalServer` (what they yield: the base URL, the model name to
send, the backend and its version). Each is a context manager that launches the server on
``host:port``, waits until it answers and always stops it on exit. Used by ``evoprune operator-server``,
the tests and the benchmarks to run Self-Pruner against the bundled SmolLM2-135M-Instruct without
network access. Torch-free: the model lives in the child process.
"""
from __future__ import annotations

import dataclasses
import errno
import importlib.util
import os
import re
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

__all__ = ["LocalServer", "start_local_server", "start_llama_cpp_server", "free_port", "check_listen", "BACKENDS"]

BACKENDS = ("llama.cpp", "transformers")


@dataclass(frozen=True)
class LocalServer:
    """A running server: ``url`` is the OpenAI base URL (``http://HOST:PORT/v1``); ``model`` the name requests
    must carry (the server is pinned to it); ``log_path`` its stdout+stderr; ``backend`` (``transformers`` or
    ``llama.cpp``) and the serving package's ``version``, for the record."""

    url: str
    model: str
    pid: int
    log_path: Path
    backend: str = "transformers"
    version: str | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_listen(host: str, port: int) -> None:
    """Refuse, before anything is loaded, a ``host:port`` a server could not listen on: a port outside
    0..65535 (0: any free port), a host that is no address of this machine, a port in use or reserved."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"--port must be an integer in 0..65535 (0: any free port), got {port!r}")
    if not str(host).strip():
        raise UserError("--host must not be empty (e.g. 127.0.0.1, or 0.0.0.0 for every interface)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: not an address this machine can listen on ({getattr(e, 'strerror', e)})") \
            from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: a port in TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as e:
            why = {errno.EADDRINUSE: "the port is in use", errno.EACCES: "a port below 1024 needs root",
                   errno.EADDRNOTAVAIL: "no interface of this machine has that address"}.get(e.errno, e.strerror)
            raise UserError(f"cannot listen on {host}:{port}: {why}") from None


def _last_line(path: Path) -> str:
    """The last non-empty line of a server log (a traceback's last line is its error), without colour codes."""
    try:
        text = path.read_text(errors="replace")[-20000:]
    except OSError:
        return "(no log)"
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(empty log)"


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


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The server leads its own session (so its whole group can be signalled) and, on Linux, gets SIGTERM when
    the process that started it dies without stopping it (killed, or SIGTERM without a handler)."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextmanager
def _serve(cmd: list[str], ready: str, *, name: str, startup_timeout_s: float, log_path, env: dict,
           server: "LocalServer") -> Iterator[LocalServer]:
    """Run ``cmd`` (its own process group) until ``GET ready`` answers 200, yield ``server``, always stop it."""
    keep_log = log_path is not None
    if log_path is None:
        fd, tmp = tempfile.mkstemp(prefix="evoprune-serve-", suffix=".log")
        os.close(fd)
        log_path = tmp
    log_path = Path(log_path)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_child_setup)
    failed = False
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                failed = True
                raise UserError(f"{name} exited with code {proc.returncode}: {_last_line(log_path)} "
                                f"(full log: {log_path})")
            try:
                with urllib.request.urlopen(ready, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                failed = True
                raise UserError(f"{name} not ready after {startup_timeout_s:.0f} s; its last line: "
                                f"{_last_line(log_path)} (full log: {log_path})")
            time.sleep(0.25)
        yield dataclasses.replace(server, pid=proc.pid, log_path=log_path)
    finally:
        _stop(proc, grace_s=15.0)
        if not keep_log and not failed:  # a failed start keeps its log: the error line names it
            log_path.unlink(missing_ok=True)


@contextmanager
def start_local_server(model_dir: str | os.PathLike, port: int = 0, *, host: str = "127.0.0.1",
                       device: str = "cpu", startup_timeout_s: float = 180.0, offline: bool = True,
                       extra_args: Sequence[str] = (), log_path: str | os.PathLike | None = None,
                       ) -> Iterator[LocalServer]:
    """Run ``transformers serve`` for the HF model directory ``model_dir`` while the block runs.

    ``port=0`` picks a free port. ``offline`` sets ``HF_HUB_OFFLINE=1`` in the child. Readiness: ``GET
    /health`` answers 200 (the pinned model is loaded before the server starts listening). Raises
    :class:`UserError` when the directory is missing, or the server exits or is not ready within
    ``startup_timeout_s`` (with the tail of its log). The server is terminated (SIGTERM, then SIGKILL) on exit
    from the block, also on error. Its output goes to ``log_path`` (kept) or to a temporary file (deleted).
    ``transformers serve`` refuses ``response_format`` (HTTP 422): the operator then prompts in plain text.
    """
    model_dir = Path(model_dir).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise UserError(f"not a Hugging Face model directory (no config.json): {model_dir}")
    port = port or free_port(host)
    env = dict(os.environ, **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir), "--host", host,
           "--port", str(port), "--device", device, *extra_args]
    server = LocalServer(url=f"http://{host}:{port}/v1", model=str(model_dir), pid=0, log_path=Path(),
                         backend="transformers", version=_version("transformers"))
    with _serve(cmd, f"http://{host}:{port}/health", name="transformers serve", startup_timeout_s=startup_timeout_s,
                log_path=log_path, env=env, server=server) as srv:
        yield srv


@contextmanager
def start_llama_cpp_server(gguf: str | os.PathLike, port: int = 0, *, host: str = "127.0.0.1",
                           alias: str = "smollm2-135m", n_ctx: int = 4096, threads: int | None = None,
                           startup_timeout_s: float = 180.0, log_path: str | os.PathLike | None = None,
                           ) -> Iterator[LocalServer]:
    """Run llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``, from ``llama-cpp-python[server]``)
    on the ``.gguf`` file ``gguf`` while the block runs; it answers as model ``alias``.

    No de-quantization: llama.cpp runs the file as it is. It takes ``response_format={"type": "json_object",
    "schema": ...}`` and compiles the schema into a grammar (array lengths and enums enforced, numeric ranges
    not). ``threads``: llama.cpp's CPU threads (default: its own choice). Readiness: ``GET /v1/models``
    answers 200. Errors, shutdown and the log as :func:`start_local_server`.
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise UserError(f"model file not found: {gguf}")
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError("the llama.cpp backend needs llama-cpp-python: pip install 'llama-cpp-python[server]' "
                        "(make setup installs it unless LLAMA_CPP=0)")
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias, "--host", host,
           "--port", str(port), "--n_ctx", str(int(n_ctx))]
    if threads:
        cmd += ["--n_threads", str(int(threads))]
    server = LocalServer(url=f"http://{host}:{port}/v1", model=alias, pid=0, log_path=Path(), backend="llama.cpp",
                         version=_version("llama-cpp-python"))
    with _serve(cmd, f"http://{host}:{port}/v1/models", name="llama.cpp server", startup_timeout_s=startup_timeout_s,
                log_path=log_path, env=dict(os.environ), server=server) as srv:
        yield srv


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # not installed
        return None
