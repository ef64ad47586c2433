"""The checked export: every exported directory is reloaded by stock ``transformers`` and compared.

Owns :class:`ExportError`, :func:`check_out_dir`, :func:`reference_ids`, :func:`logits_of` and
:func:`checked_export`, the one implementation of "write into a temporary sibling directory, reload it,
compare its logits with in-memory references, only then move it into place" that every export format
uses (:mod:`.plain`, :mod:`.remote_code`). A failed export leaves nothing behind; an existing non-empty
``--out`` is refused before any work unless ``overwrite``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError, user_input
from ..files import atomic_dir
from ..models.hooks import model_device
from ..models.loading import reload_export
from ..version import __version__

__all__ = ["ExportError", "check_out_dir", "reference_ids", "logits_of", "n_params", "checked_export"]


class ExportError(RuntimeError):
    """The reloaded export does not reproduce the in-memory model."""


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Validate an output directory before any work; :class:`UserError` if it is a file or holds files."""
    if not str(out).strip():
        raise UserError("--out must not be empty")
    out = Path(out).expanduser()
    with user_input("--out directory", out):
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory {out} exists and is not empty (use --overwrite)")
    return out


def reference_ids(vocab_size: int, n_tokens: int = 64, seed: int = 0) -> torch.Tensor:
    """Deterministic token ids ``[1, n_tokens]`` used to compare logits after reload."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, n_tokens), generator=g)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 CPU logits ``[1, T, vocab]`` of ``model`` on ``ids``."""
    return model(input_ids=ids.to(model_device(model)), use_cache=False).logits.float().cpu()


def n_params(model: torch.nn.Module) -> int:
    """Parameters of ``model`` (tied weights once)."""
    return sum(p.numel() for p in model.parameters())


# write(tmp) -> (record, checks): the pruning.json record, and {diff name: (what, reference logits, tolerance)}
Writer = Callable[[Path], tuple[dict, dict[str, tuple[str, torch.Tensor, float]]]]


def checked_export(out: str | Path, write: Writer, *, ids: torch.Tensor, dtype: torch.dtype,
                   overwrite: bool = False) -> dict:
    """Export by ``write`` into a temporary sibling of ``out``, reload, check, move into place.

    ``write(tmp)`` writes the model files into ``tmp`` and returns the record for ``pruning.json`` and
    the checks: for each name (e.g. ``max_abs_diff``) what it compares against, the reference logits on
    ``ids`` and the largest allowed max abs difference. The record gets ``params`` (of the reloaded
    model) and ``evoprune_version``. Returns the record plus every diff and ``out``; raises
    :class:`ExportError` (nothing written) when a check fails.
    """
    out = check_out_dir(out, overwrite)
    with user_input("--out directory", out, formats=False), atomic_dir(out) as tmp:
        record, checks = write(tmp)
        reloaded = reload_export(tmp, dtype)
        try:
            got, params = logits_of(reloaded, ids), n_params(reloaded)
        finally:
            del reloaded
        record = {**record, "params": params, "evoprune_version": __version__}
        (tmp / "pruning.json").write_text(json.dumps(record, indent=2) + "\n")
        diffs = {}
        for name, (what, ref, tol) in checks.items():
            diffs[name] = float((got - ref).abs().max())
            if not diffs[name] <= tol:
                raise ExportError(f"export check failed: reloaded logits differ from {what} by "
                                  f"{diffs[name]:.3g} > {tol:.3g}")
    return {**record, **diffs, "out": str(out)}
