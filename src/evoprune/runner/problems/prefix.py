"""The prefix-cached evaluators of the layer spaces (``layers``, ``sublayers``), one per fidelity stage.

Owns :func:`prefix_evaluators`: builds one :class:`~evoprune.fitness.evaluator.NLLEvaluator` per stage
slice (``cache_mb`` split evenly among their LRUs), with the cache placement of ``--cache-device`` and
the sparsity of ``--cache-every``. ``auto`` resolves once per run, when the run starts: 1 (every
position kept) unless the stages' dense caches (plus an LRU of a given ``--cache-mb``) would take more
than :data:`~evoprune.fitness.checkpoints.HEADROOM` of the cache device's free memory
(:func:`~evoprune.fitness.checkpoints.free_bytes`), then the smallest ``J`` that fits; ``--cache-mb
auto`` gives the LRU at most its default of what the dense caches leave
(:func:`~evoprune.fitness.checkpoints.fit_caches`). The resolved values are kept in ``RUN/cache.json``
and read back on resume and by Ray workers, so a resumed run counts the same token-layers on any
machine.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...errors import UserError
from ...files import atomic_write_json
from .common import stage_slices, stage_tokens

__all__ = ["prefix_evaluators", "CACHE_FILE"]

CACHE_FILE = "cache.json"


def _resolve(cfg, lm, evaluators, record: Path) -> tuple[int, float]:
    """The run's ``(cache_every, LRU MiB)``: from ``record`` when it exists, else resolved and written there.
    A record from before the LRU was recorded had no LRU under ``--cache-mb auto``."""
    auto_lru = cfg.fitness.cache_mb == "auto"
    if record.is_file():
        rec = json.loads(record.read_text())
        lru = rec.get("lru_mb", 0.0 if auto_lru else cfg.fitness.lru_mb(cfg.space))
        return int(rec["cache_every"]), float(lru)
    from ...fitness.checkpoints import fit_caches, free_bytes
    from ...models.hooks import model_device

    device = cfg.execution.cache_device or str(model_device(lm.model))
    entries = [ev.lru_entry_bytes for ev in evaluators]
    n_units = evaluators[0].n_units
    free = free_bytes(device)
    fit = fit_caches(n_units, entries, free, int(cfg.fitness.lru_mb(cfg.space) * 2 ** 20),
                     every=cfg.fitness.cache_every, flexible=auto_lru)
    if fit is None:
        raise UserError(f"the dense hidden-state caches do not fit on {device} even with one kept state in "
                        f"{n_units} (free: {free / 2 ** 30:.1f} GiB): use --cache-device cpu, fewer "
                        f"calibration tokens, or a smaller --cache-mb")
    every, lru = fit[0], fit[1] / 2 ** 20
    try:
        atomic_write_json(record, {"cache_every": every, "lru_mb": lru, "cache_device": device, "free_bytes": free,
                                   "entry_bytes": entries})
    except OSError:  # a read-only copy of a run: the values still apply to this process
        pass
    return every, lru


def prefix_evaluators(cfg, lm, calib, run, *, sublayers: bool) -> list:
    """One prefix-cached evaluator per fidelity stage of ``cfg`` (see the module docstring); not prepared."""
    from ...fitness.evaluator import NLLEvaluator

    slices = stage_slices(stage_tokens(cfg), calib.n_samples, calib.seqlen)
    whole = (calib.n_samples, calib.seqlen)

    def build(every: int, lru_mb: float) -> list:
        mb = lru_mb / len(slices)
        return [NLLEvaluator(lm, calib if (m, t) == whole else calib.slice(m, t), batch_size=cfg.calibration.batch_size,
                             prefix_cache=True, sublayers=sublayers, metric=cfg.fitness.fitness,
                             kl_topk=cfg.fitness.kl_topk, cache_mb=mb, cache_every=every,
                             cache_device=cfg.execution.cache_device)
                for m, t in slices]

    evaluators = build(1, 0.0)  # their entry sizes, before anything is allocated
    return build(*_resolve(cfg, lm, evaluators, Path(run.path) / CACHE_FILE))
