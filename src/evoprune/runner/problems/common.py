"""What every problem shares: fidelity stage slices and the checks they need. Torch-free.

Owns :func:`stage_slices`. Stage ``s`` with ``T = tokens_per_stage[s]`` tokens uses one data slice
shared by all its candidates: the first ``m = min(n_samples, ceil(T / seqlen))`` calibration samples,
each cut to its first ``T // m`` tokens (so ``m * (T // m) <= T`` tokens). The last stage must be the
whole calibration set (``T = n_samples * seqlen``). No ``tokens_per_stage``: one stage, the whole set.
``"auto"``: two stages, :func:`auto_first_stage` then the whole set.
"""
from __future__ import annotations

from ...errors import UserError
from ...search.defaults import AUTO_MIN_TOKENS, AUTO_SHARE

__all__ = ["stage_slices", "stage_tokens", "check_stages", "auto_first_stage", "batch_prefix", "stage_links"]


def stage_tokens(cfg) -> tuple[int, ...] | str | None:
    """The ``tokens_per_stage`` of a search's method (``None`` for one stage or an unstaged method)."""
    return cfg.selection.tokens_per_stage


def check_stages(cfg) -> None:
    """A staged method's survivors need one fitness slice per stage: several stages need ``tokens_per_stage``."""
    sel = cfg.selection
    if sel.survivors is not None and sel.tokens_per_stage is None and len(sel.survivors) != 1:
        raise UserError("several --survivors-per-stage entries need --tokens-per-stage")


def auto_first_stage(n_samples: int, seqlen: int) -> tuple[int, int]:
    """The cheap first slice of ``tokens_per_stage="auto"``: ``(samples, tokens per sample)``: 1/8 of the
    set, but at least ``min(64, half the set)`` tokens (fewer are too noisy to rank candidates by)."""
    n = n_samples * seqlen
    total = max(2, n // AUTO_SHARE, min(AUTO_MIN_TOKENS, n // 2))
    m = min(n_samples, -(-total // seqlen))
    return m, max(2, total // m)


def stage_slices(tokens_per_stage, n_samples: int, seqlen: int) -> list[tuple[int, int]]:
    """``(samples, tokens per sample)`` of each fidelity stage (see the module docstring)."""
    if tokens_per_stage is None:
        return [(n_samples, seqlen)]
    if tokens_per_stage == "auto":
        first = auto_first_stage(n_samples, seqlen)
        return [first, (n_samples, seqlen)] if first != (n_samples, seqlen) else [first, first]
    if tokens_per_stage[-1] != n_samples * seqlen:
        raise UserError(f"the last --tokens-per-stage entry must be the whole calibration set "
                        f"({n_samples} x {seqlen} = {n_samples * seqlen} tokens), got {tokens_per_stage[-1]}")
    out = []
    for t in tokens_per_stage:
        m = min(n_samples, -(-t // seqlen))
        out.append((m, t // m))
    return out


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def batch_prefix(part: tuple[int, int], whole: tuple[int, int], batch_size: int) -> int | None:
    """How many leading batches of slice ``whole`` the slice ``part`` is (both ``(samples, tokens per
    sample)`` of one calibration set, batched by ``batch_size``): the same whole windows, batched alike. A
    candidate scored on ``part`` continues on ``whole`` from there
    (:meth:`~evoprune.fitness.whole_model.WholeModelEvaluator.extends`, which checks the data too).
    ``None`` when it is not such a prefix."""
    (m, t), (n, u) = part, whole
    if t != u or m >= n:
        return None
    a, b = _batches(m, batch_size), _batches(n, batch_size)
    return len(a) if a == b[: len(a)] else None


def stage_links(slices, batch_size: int) -> dict[int, list[tuple[int, int]]]:
    """Stage ``t`` -> ``[(s, k), ...]``: the lower stages ``s`` (latest first) whose slice is the first ``k``
    batches of stage ``t``'s (:func:`batch_prefix`); only stages that have one."""
    out = {}
    for t, whole in enumerate(slices):
        found = [(s, k) for s in range(t - 1, -1, -1) if (k := batch_prefix(slices[s], whole, batch_size)) is not None]
        if found:
            out[t] = found
    return out

