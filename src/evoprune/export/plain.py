"""Export of a layer-dropped (or unpruned, e.g. fine-tuned) model as a plain Hugging Face directory.

Owns :func:`export_dropped`. The written directory loads with ``AutoModelForCausalLM.from_pretrained(DIR)``
and no evoprune import: weights are renumbered 0..n-k-1, ``num_hidden_layers`` and per-layer config lists
describe the smaller model, the tokenizer is included, and ``pruning.json`` records the provenance. The
reload check (max abs logit difference <= ``atol``) is :func:`~evoprune.export.checked.checked_export`'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..spaces import DropPattern
from .checked import checked_export, logits_of, reference_ids

__all__ = ["export_dropped"]


def export_dropped(loaded, layers: Sequence[int] | DropPattern, out: str | Path, *, overwrite: bool = False,
                   atol: float = 1e-5, extra: dict | None = None) -> dict:
    """Write ``loaded`` (a :class:`~evoprune.models.LoadedModel`) with ``layers`` dropped to ``out``.

    Returns the ``pruning.json`` record plus ``max_abs_diff`` of the reload check. Raises
    :class:`~evoprune.errors.UserError` for bad layers / a non-empty ``out``, and
    :class:`~evoprune.export.checked.ExportError` when the reloaded logits differ by more than ``atol``.
    """
    model, adapter = loaded.model, loaded.adapter
    pattern = adapter.pattern(model, layers)
    base_layers = adapter.n_layers(model) + len(loaded.dropped)
    base_kept = [i for i in range(base_layers) if i not in set(loaded.dropped)]
    dropped_base = sorted({*loaded.dropped, *(base_kept[i] for i in pattern.dropped)})
    ids = reference_ids(model.config.vocab_size)

    def write(tmp: Path):
        with adapter.dropped(model, pattern):
            ref = logits_of(model, ids)
            model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        record = {"base_model": loaded.base, "base_layers": base_layers, "dropped_layers": dropped_base,
                  "n_layers": base_layers - len(dropped_base), "sparsity": len(dropped_base) / base_layers,
                  **(extra or {})}
        return record, {"max_abs_diff": ("the in-memory pruned model's", ref, atol)}

    return checked_export(out, write, ids=ids, dtype=next(model.parameters()).dtype, overwrite=overwrite)
