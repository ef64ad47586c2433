"""Running a GGUF file in llama.cpp (llama-cpp-python): its logits, its perplexity, its speed.

Owns :func:`open_gguf` (a loaded :class:`LlamaCpp`, freed on exit), :meth:`LlamaCpp.logits` (every
position's logits for given token ids, from an empty context), :meth:`LlamaCpp.nll` (mean next-token NLL
over windows of ids, as :func:`evoprune.evaluate.perplexity.perplexity` counts it) and
:meth:`LlamaCpp.prefill_tok_s` / :meth:`LlamaCpp.decode_tok_s`. Token ids come from evoprune's tokenizer, so a
comparison with evoprune's model is a comparison of the models, not of two tokenizers.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import UserError

__all__ = ["LlamaCpp", "open_gguf", "require_llama_cpp", "native_output"]


@contextlib.contextmanager
def native_output(log: str | os.PathLike) -> Iterator[Path]:
    """Route what native code prints on file descriptors 1 and 2 (llama.cpp's loader and quantizer logs) into
    ``log`` while the block runs; Python's own streams are flushed first and restored after."""
    import sys

    log = Path(log)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield log
            finally:
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def last_line(log: Path) -> str:
    """The last non-empty line of a native log (for an error message), or ''."""
    try:
        lines = [ln for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def require_llama_cpp() -> None:
    """:class:`UserError` unless llama-cpp-python is installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError("llama.cpp is needed here: pip install llama-cpp-python (make setup builds it unless "
                        "LLAMA_CPP=0)")


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[:, 0]
    return lse - x[np.arange(len(targets)), targets]


@dataclass
class LlamaCpp:
    """A GGUF model loaded in llama.cpp with room for ``n_ctx`` tokens."""

    llm: object
    path: Path
    threads: int

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """fp32 logits ``[len(ids), vocab]`` of ``ids`` evaluated from an empty context."""
        self.llm.reset()
        self.llm.eval(list(map(int, ids)))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def nll(self, windows: np.ndarray) -> float:
        """Mean next-token NLL (nats) over the rows of ``windows`` (``[n, seqlen]`` token ids)."""
        total, n = 0.0, 0
        for row in np.asarray(windows):
            nll = _log_softmax_nll(self.logits(row)[:-1], row[1:])
            total, n = total + float(nll.sum()), n + len(nll)
        return total / n

    def prefill_tok_s(self, ids: Sequence[int]) -> float:
        """Tokens/s of evaluating ``ids`` from an empty context."""
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(list(map(int, ids)))
        return len(ids) / (time.perf_counter() - t)

    def decode_tok_s(self, prompt: Sequence[int], n: int) -> float:
        """Tokens/s of ``n`` greedy tokens, one at a time, after ``prompt`` (whose prefill is not timed)."""
        self.llm.reset()
        self.llm.eval(list(map(int, prompt)))
        tok = int(np.argmax(self.llm.scores[len(prompt) - 1]))
        t = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return n / (time.perf_counter() - t)


@contextlib.contextmanager
def open_gguf(path: str | os.PathLike, n_ctx: int, threads: int | None = None) -> Iterator[LlamaCpp]:
    """``path`` loaded by llama.cpp (all logits kept, CPU, ``threads`` or one per core), freed on exit."""
    require_llama_cpp()
    import llama_cpp

    threads = int(threads or os.cpu_count() or 1)
    log = Path(tempfile.mkstemp(prefix="llama-cpp-", suffix=".log")[1])
    try:
        with native_output(log):
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=int(n_ctx), n_batch=min(int(n_ctx), 512), logits_all=True,
                                  n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False)
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise UserError(f"llama.cpp cannot load {path}: {last_line(log) or e}") from None
    finally:
        log.unlink(missing_ok=True)
    try:
        yield LlamaCpp(llm, Path(path), threads)
    finally:
        llm.close()
