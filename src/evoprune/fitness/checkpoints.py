"""Sparse checkpoints of the dense prefix cache: which positions keep their entering state, and where.

Owns :func:`checkpoints`, :func:`checkpoint` (pure position arithmetic, shared with the planner,
:mod:`evoprune.plan`) and :func:`keep_states` (thin one batch's dense states and place them on the
cache device). With ``every = j`` the cache keeps the states entering positions ``0, j, 2j, ...`` and
the final-norm input (``n_units``); a candidate whose first dropped position is ``f`` starts from
``j * (f // j)`` and recomputes the dense positions up to ``f`` (see
:class:`~evoprune.fitness.evaluator.NLLEvaluator`).
"""
from __future__ import annotations

__all__ = ["checkpoints", "checkpoint", "keep_states", "free_bytes", "choose_every", "fit_caches", "HEADROOM"]


def checkpoints(n_units: int, every: int) -> tuple[int, ...]:
    """Positions whose entering dense state is kept, ``n_units`` (the final-norm input) last."""
    return tuple(range(0, n_units, every)) + (n_units,)


def checkpoint(first: int, n_units: int, every: int) -> int:
    """The kept position a candidate whose first dropped position is ``first`` starts from
    (``first == n_units``: the dense pattern, which starts at the final norm)."""
    return first if first >= n_units else every * (first // every)


def keep_states(states: list, n_units: int, every: int, device=None) -> list:
    """One batch's ``n_units + 1`` dense states with the unkept ones set to ``None``, the kept ones moved
    to ``device`` (a ``torch.device``; ``None``: where they are), in pinned memory when that is the CPU
    and CUDA is available (so copies to the GPU can overlap)."""
    import torch

    keep = set(checkpoints(n_units, every))
    out = []
    for u, h in enumerate(states):
        if u not in keep:
            out.append(None)
            continue
        if device is not None and h.device != device:
            h = h.to(device)
            if device.type == "cpu" and torch.cuda.is_available():
                h = h.pin_memory()
        out.append(h)
    return out


def free_bytes(device) -> int:
    """Memory a cache on ``device`` may use: free CUDA memory, or the host's available memory
    (``MemAvailable``). ``$EVOPRUNE_CACHE_MEMORY_MB`` overrides both (to keep memory for other work, or in
    tests)."""
    import os

    import torch

    override = os.environ.get("EVOPRUNE_CACHE_MEMORY_MB")
    if override:
        return int(float(override) * 2 ** 20)
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


HEADROOM = 0.8  # a cache may take this share of the free memory: forwards need the rest


def choose_every(n_units: int, entry_bytes: list[int], free: int, fixed: int = 0) -> int | None:
    """The smallest ``every`` whose caches fit: ``sum_s len(checkpoints(n_units, every)) x entry_bytes[s]
    + fixed <= HEADROOM x free`` (``entry_bytes[s]``: one state of every token of stage ``s``; ``fixed``:
    e.g. the LRU). ``None`` when not even the sparsest cache (the input and the final-norm input) fits."""
    for every in range(1, n_units + 1):
        if len(checkpoints(n_units, every)) * sum(entry_bytes) + fixed <= HEADROOM * free:
            return every
    return None


def fit_caches(n_units: int, entry_bytes: list[int], free: int, lru_bytes: int, *, every: int | str = "auto",
               flexible: bool = False) -> tuple[int, int] | None:
    """``(every, lru_bytes)`` of a run's caches on a device with ``free`` bytes: ``every`` as given, or
    (``"auto"``) :func:`choose_every`'s; a ``flexible`` LRU (``--cache-mb auto``) yields to the dense
    caches and takes at most ``lru_bytes`` of what they leave of ``HEADROOM x free`` (possibly 0), a fixed
    one is counted before choosing ``every``. ``None`` when ``every`` is ``"auto"`` and nothing fits."""
    if every == "auto":
        every = choose_every(n_units, entry_bytes, free, 0 if flexible else lru_bytes)
        if every is None:
            return None
    if flexible:
        left = HEADROOM * free - len(checkpoints(n_units, every)) * sum(entry_bytes)
        lru_bytes = int(max(0, min(lru_bytes, left)))
    return int(every), int(lru_bytes)
