"""Exports that load with stock ``transformers`` or llama.cpp, every one reload-checked (:mod:`.checked`).

- :func:`export_dropped` (:mod:`.plain`): blocks removed, a plain HF directory;
- :func:`export_width` / :func:`save_width_model` (:mod:`.remote_code`): per-layer widths, the
  ``trust_remote_code`` format;
- :func:`export_sublayers` (:mod:`.sublayers`): attention / MLP removed separately, whole blocks plain and
  the rest in the width format;
- :func:`save_pruned`: whichever of the two fits an in-memory model (e.g. after fine-tuning);
- :func:`~evoprune.export.gguf.export_gguf` (:mod:`.gguf`, imported on use): any of them as one GGUF file for
  llama.cpp / Ollama, checked by llama.cpp itself.
"""
from __future__ import annotations

from .checked import ExportError, check_out_dir, reference_ids
from .plain import export_dropped
from .remote_code import export_width, save_width_model
from .sublayers import export_sublayers

__all__ = ["ExportError", "check_out_dir", "reference_ids", "export_dropped", "export_width", "save_width_model",
           "export_sublayers", "save_pruned"]


def save_pruned(lm, out, *, overwrite: bool = False, extra: dict | None = None) -> dict:
    """Export ``lm`` as it is in memory (a run's pruned model, possibly fine-tuned) in the format its pruning
    needs: the ``trust_remote_code`` format when width-sliced, else a plain directory (no further drops)."""
    from ..models.slicing import is_width_pruned

    if is_width_pruned(lm.model):
        return save_width_model(lm, out, overwrite=overwrite, extra=extra)
    return export_dropped(lm, [], out, overwrite=overwrite, extra=extra)
