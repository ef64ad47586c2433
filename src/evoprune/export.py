"""Export of a layer-dropped model as a plain Hugging Face directory.

Owns ``export_dropped``. The written directory loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` and no evoprune import: weights
are renumbered 0..n-k-1, ``num_hidden_layers`` and per-layer config lists
describe the smaller model, the tokenizer is included, and ``pruning.json``
records the provenance. Every export is reloaded and its logits compared with
the in-memory pruned model (max abs diff <= ``atol``) before the directory is
moved into place, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from . import __version__
from .errors import UserError
from .genome import DropPattern

__all__ = ["ExportError", "export_dropped", "check_out_dir", "reference_ids"]


class ExportError(RuntimeError):
    """The reloaded export does not reproduce the in-memory model."""


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Validate an output directory before any work; :class:`UserError` if it holds files."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"output directory {out} exists and is not empty (use --overwrite)")
    return out


def reference_ids(vocab_size: int, n_tokens: int = 64, seed: int = 0) -> torch.Tensor:
    """Deterministic token ids [1, n_tokens] used to compare logits after reload."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, n_tokens), generator=g)


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    dev = next(model.parameters()).device
    return model(input_ids=ids.to(dev), use_cache=False).logits.float().cpu()


def export_dropped(loaded, layers: Sequence[int] | DropPattern, out: str | Path, *, overwrite: bool = False,
                   atol: float = 1e-5, extra: dict | None = None) -> dict:
    """Write ``loaded`` (a :class:`~evoprune.models.LoadedModel`) with ``layers`` dropped to ``out``.

    Returns the ``pruning.json`` record plus ``max_abs_diff`` of the reload check.
    Raises :class:`UserError` for bad layers / a non-empty ``out``, and
    :class:`ExportError` when the reloaded logits differ by more than ``atol``.
    """
    from transformers import AutoModelForCausalLM

    model, adapter = loaded.model, loaded.adapter
    pattern = adapter.pattern(model, layers)
    out = check_out_dir(out, overwrite)
    n_before = adapter.n_layers(model)
    base_layers = n_before + len(loaded.dropped)
    base_kept = [i for i in range(base_layers) if i not in set(loaded.dropped)]
    dropped_base = sorted({*loaded.dropped, *(base_kept[i] for i in pattern.dropped)})
    ids = reference_ids(model.config.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        with adapter.dropped(model, pattern):
            ref = _logits(model, ids)
            params = sum(p.numel() for p in model.parameters())
            model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        record = {
            "base_model": loaded.base,
            "base_layers": base_layers,
            "dropped_layers": dropped_base,
            "n_layers": base_layers - len(dropped_base),
            "sparsity": len(dropped_base) / base_layers,
            "params": params,
            "evoprune_version": __version__,
            **(extra or {}),
        }
        (tmp / "pruning.json").write_text(json.dumps(record, indent=2) + "\n")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=next(model.parameters()).dtype).eval()
        diff = float((_logits(reloaded, ids) - ref).abs().max())
        del reloaded
        if not diff <= atol:
            raise ExportError(f"export check failed: reloaded logits differ by {diff:.3g} > {atol:g}")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {**record, "max_abs_diff": diff, "out": str(out)}
