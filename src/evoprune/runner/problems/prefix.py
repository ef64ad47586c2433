"""The prefix-cached evaluators of the layer spaces (``layers``, ``sublayers``), one per fidelity stage.

Owns :func:`prefix_evaluators`: builds one :class:`~evoprune.fitness.evaluator.NLLEvaluator` per stage
slice (``cache_mb`` split evenly among their LRUs), with the cache placement of ``--cache-device`` and
the sparsity of ``--cache-every``. ``auto`` resolves once per run, when the run starts: 1 (every
position kept) unless the stages' dense caches plus the LRU would take more than
:data:`~evoprune.fitness.checkpoints.HEADROOM` of the cache device's free memory
(:func:`~evoprune.fitness.checkpoints.free_bytes`), then the smallest ``J`` that fits. The resolved
value is kept in ``RUN/cache.json`` and read back on resume and by Ray workers, so a resumed run
counts the same token-layers on any machine.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...errors import UserError
from ...files import atomic_write_json
from .common import stage_slices, stage_tokens

__all__ = ["prefix_evaluators", "CACHE_FILE"]

CACHE_FILE = "cache.json"


def _resolve(cfg, lm, evaluators, record: Path) -> int:
    """The run's ``cache_every``: from ``record`` when it exists, else resolved and written there."""
    if record.is_file():
        return int(json.loads(record.read_text())["cache_every"])
    from ...fitness.checkpoints import choose_every, free_bytes
    from ...models.hooks import model_device

    every = cfg.fitness.cache_every
    device = cfg.execution.cache_device or str(model_device(lm.model))
    entries = [ev.lru_entry_bytes for ev in evaluators]
    n_units = evaluators[0].n_units
    free = free_bytes(device)
    if every == "auto":
        every = choose_every(n_units, entries, free, int(cfg.fitness.lru_mb(cfg.space) * 2 ** 20))
        if every is None:
            raise UserError(f"the dense hidden-state caches do not fit on {device} even with one kept state in "
                            f"{n_units} (free: {free / 2 ** 30:.1f} GiB): use --cache-device cpu, fewer "
                            f"calibration tokens, or a smaller --cache-mb")
    try:
        atomic_write_json(record, {"cache_every": int(every), "cache_device": device, "free_bytes": free,
                                   "entry_bytes": entries})
    except OSError:  # a read-only copy of a run: the value still applies to this process
        pass
    return int(every)


def prefix_evaluators(cfg, lm, calib, run, *, sublayers: bool) -> list:
    """One prefix-cached evaluator per fidelity stage of ``cfg`` (see the module docstring); not prepared."""
    from ...fitness.evaluator import NLLEvaluator

    slices = stage_slices(stage_tokens(cfg.method_options), calib.n_samples, calib.seqlen)
    mb = cfg.fitness.lru_mb(cfg.space) / len(slices)
    whole = (calib.n_samples, calib.seqlen)

    def build(every: int) -> list:
        return [NLLEvaluator(lm, calib if (m, t) == whole else calib.slice(m, t), batch_size=cfg.calibration.batch_size,
                             prefix_cache=True, sublayers=sublayers, metric=cfg.fitness.fitness,
                             kl_topk=cfg.fitness.kl_topk, cache_mb=mb, cache_every=every,
                             cache_device=cfg.execution.cache_device)
                for m, t in slices]

    evaluators = build(1)
    every = _resolve(cfg, lm, evaluators, Path(run.path) / CACHE_FILE)
    return evaluators if every == 1 else build(every)
