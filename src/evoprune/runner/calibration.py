"""A run's calibration set: built once (random windows or CCDS), saved as ``RUN/calib.pt``, reused on resume.

Owns :func:`build_calib`. ``--calib-from RUN`` copies another run's set; the calibration stream of
random numbers (``default_rng([seed, 1])``) is apart from the search's, so the same seed gives the same
samples whatever the method.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from .rundir import RunDir

__all__ = ["build_calib"]


def build_calib(cfg, lm, run: RunDir, progress: bool):
    """The :class:`~evoprune.data.calibration.CalibSet` of run ``run`` (built and saved on first use)."""
    from ..data.calibration import CalibSet, random_windows
    from ..data.ccds import ccds
    from ..data.sources import get_text

    if run.calib_path.exists():
        return CalibSet.load(run.calib_path)
    c = cfg.calibration
    if c.calib_from:
        src = RunDir(c.calib_from)
        src.read_config()
        if not src.calib_path.exists():
            raise UserError(f"--calib-from {c.calib_from}: run has no calib.pt")
        calib = CalibSet.load(src.calib_path)
    else:
        text = get_text(c.calib, "calib")
        rng = np.random.default_rng([cfg.seed, 1])  # calibration stream, apart from the search's
        try:
            if c.sampling == "random":
                calib = random_windows(text, lm.tokenizer, c.nsamples, c.seqlen, rng, source=c.calib)
            else:
                calib = ccds(text, lm.tokenizer, clusters=c.clusters, samples_per_cluster=c.samples_per_cluster,
                             seqlen=c.seqlen, chunk_sentences=c.chunk_sentences, embedder=c.embedder,
                             rng=rng, source=c.calib, progress=progress)
        except ValueError as e:
            raise UserError(f"calibration: {e}") from None
    calib.save(run.calib_path)
    return calib
