"""Peak memory of a forward pass: CUDA allocator statistics, or the process's resident-set growth on CPU.

Owns :func:`peak_extra` and :data:`MEM_METHODS`. On CUDA the extra memory of a pass is
``torch.cuda.max_memory_allocated`` minus the allocation before it; on CPU it is the peak resident-set
growth during the pass, read from ``VmHWM`` after resetting it through ``/proc/self/clear_refs``
(Linux), else sampled with ``psutil`` every millisecond, else ``ru_maxrss`` growth (a lower bound).
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
import threading
import time

__all__ = ["peak_extra", "MEM_METHODS", "model_bytes"]


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    """Give freed heap memory back to the OS so that the next pass's RSS growth is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakCPU:
    """Peak RSS growth over a ``with`` block, by the best method available (see the module docstring)."""

    def __init__(self):
        self.method = None
        self.extra = 0

    def __enter__(self):
        _trim()
        self.base = _rss_bytes()
        if self.base is not None and _hwm_bytes() is not None and _reset_hwm():
            self.method = "vmhwm"
            return self
        try:
            import psutil

            proc = psutil.Process()
            self.base = proc.memory_info().rss
            self.peak, self.stop = self.base, threading.Event()

            def poll():
                while not self.stop.is_set():
                    self.peak = max(self.peak, proc.memory_info().rss)
                    time.sleep(0.001)

            self.thread = threading.Thread(target=poll, daemon=True)
            self.thread.start()
            self.method = "psutil"
            return self
        except ImportError:
            import resource

            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss"
            return self

    def __exit__(self, *exc):
        if self.method == "vmhwm":
            self.extra = max(0, (_hwm_bytes() or 0) - self.base)
        elif self.method == "psutil":
            self.stop.set()
            self.thread.join()
            self.extra = max(0, self.peak - self.base)
        else:
            import resource

            self.extra = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base)
        return False


MEM_METHODS = {
    "cuda": "weights + (torch.cuda.max_memory_allocated - allocated before) over one prefill+decode pass",
    "vmhwm": "weights (param+buffer bytes) + peak RSS growth over one prefill+decode pass (VmHWM reset via "
             "/proc/self/clear_refs)",
    "psutil": "weights (param+buffer bytes) + peak RSS growth over one prefill+decode pass (psutil, sampled every ms)",
    "ru_maxrss": "weights (param+buffer bytes) + growth of the process's ru_maxrss (a lower bound)",
}


def peak_extra(run_pass, device) -> tuple[int, str]:
    """``(peak extra bytes, method)`` of calling ``run_pass()`` (one prefill + decode pass) on ``device``."""
    import torch

    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_pass()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before), "cuda"
    with _PeakCPU() as pk:
        run_pass()
    return pk.extra, pk.method
