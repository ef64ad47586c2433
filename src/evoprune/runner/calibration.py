"""A run's calibration set: built once (random windows or CCDS), saved as ``RUN/calib.pt``, reused on resume.

Owns :func:`build_calib` and :func:`check_calib` (its inputs, refused before the model loads). ``--calib-from RUN`` copies another run's set; the calibration stream of
random numbers (``default_rng([seed, 1])``) is apart from the search's, so the same seed gives the same
samples whatever the method.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError
from .rundir import RunDir

__all__ = ["build_calib", "check_calib"]


def check_calib(cfg) -> None:
    """Refuse calibration inputs that :func:`build_calib` would refuse after the model loaded: a ``--calib-from``
    that is no run with a ``calib.pt``, a ``--calib`` source that is unknown or missing, an ``--embedder`` path
    that does not exist (a hub id is checked when it loads)."""
    from pathlib import Path

    from ..data.sources import check_source

    c = cfg.calibration
    if c.calib_from:
        _source_run(c.calib_from)
        return
    check_source(c.calib, what="--calib")
    e = c.embedder
    if c.sampling == "ccds" and e and (e.startswith((".", "/", "~")) or Path(e).expanduser().exists()):
        p = Path(e).expanduser()
        if not p.is_dir():
            raise UserError(f"--embedder {e}: {'not a directory' if p.exists() else 'no such directory'} "
                            f"(a sentence-transformers model directory or hub id)")


def _source_run(path) -> RunDir:
    """The run of ``--calib-from``: a run directory with a ``calib.pt``."""
    src = RunDir(path)
    src.read_config()
    if not src.calib_path.exists():
        raise UserError(f"--calib-from {path}: run has no calib.pt")
    return src


def build_calib(cfg, lm, run: RunDir, progress: bool):
    """The :class:`~evoprune.data.calibration.CalibSet` of run ``run`` (built and saved on first use)."""
    from ..data.calibration import CalibSet, random_windows
    from ..data.ccds import ccds
    from ..data.sources import get_text

    if run.calib_path.exists():
        return CalibSet.load(run.calib_path)
    c = cfg.calibration
    if c.calib_from:
        calib = CalibSet.load(_source_run(c.calib_from).calib_path)
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
