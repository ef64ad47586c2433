"""Export of a sub-layer pattern (``--space sublayers``): whole blocks removed, attention- or MLP-free blocks
in the width format.

Owns :func:`export_sublayers`. Blocks with both sub-layers dropped are removed as in
:func:`~evoprune.export.plain.export_dropped`; when no other block loses a sub-layer the result is that
plain Hugging Face directory. Otherwise the remaining blocks are written in the project's
``trust_remote_code`` width format (:mod:`.remote_code`): an attention-free block has zero attention
groups, an MLP-free block zero MLP channels, and their output biases are zeroed (OPT), so they add
nothing to the residual stream. Two checks on the reloaded model, both ``<= atol``:
``max_abs_diff`` against the in-memory sliced model and ``skipped_max_abs_diff`` against the dense
model run under :meth:`~evoprune.models.base.Adapter.skipped`, the function the search scored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..models.slicing import is_width_pruned, save_width_pruned, width_sliced
from ..models.sublayers import zero_output_biases
from ..prune.width_plan import sublayer_plan
from .checked import checked_export, logits_of, n_params, reference_ids
from .plain import export_dropped

__all__ = ["export_sublayers"]


def export_sublayers(loaded, attention: Sequence[int], mlp: Sequence[int], out: str | Path, *,
                     overwrite: bool = False, atol: float = 1e-5, extra: dict | None = None) -> dict:
    """Write the dense ``loaded`` with the attention of blocks ``attention`` and the MLP of blocks ``mlp``
    removed to ``out`` (see the module docstring). Returns the ``pruning.json`` record plus the diffs."""
    model, adapter = loaded.model, loaded.adapter
    if is_width_pruned(model) or loaded.dropped:
        raise UserError("export a sub-layer pattern from the dense model")
    n = adapter.n_layers(model)
    with adapter.skipped(model, attention, mlp) as pattern:
        pass  # validates before any work
    whole = list(pattern.blocks)
    info = {"space": "sublayers", "dropped_attention": list(pattern.attention), "dropped_mlp": list(pattern.mlp),
            **(extra or {})}
    if set(pattern.attention) == set(pattern.mlp):  # whole blocks only: a plain HF model
        return export_dropped(loaded, whole, out, overwrite=overwrite, extra=info)
    ids = reference_ids(model.config.vocab_size)
    params_dense = n_params(model)
    new = {b: j for j, b in enumerate(i for i in range(n) if i not in set(whole))}
    a = [new[i] for i in pattern.attention if i in new]
    m = [new[i] for i in pattern.mlp if i in new]

    def write(tmp: Path):
        with adapter.skipped(model, pattern.attention, pattern.mlp):
            skipped = logits_of(model, ids)
        with adapter.dropped(model, whole):
            restore = zero_output_biases(adapter, adapter.get_blocks(model), a, m)
            try:
                plan = sublayer_plan(model, a, m)
                with width_sliced(model, plan, adapter) as width:
                    ref = logits_of(model, ids)
                    save_width_pruned(model, tmp)
            finally:
                restore()
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        record = {"base_model": loaded.base, "base_layers": n, "dropped_layers": whole, "method": "sublayers",
                  "num_kv_groups": width["num_kv_groups"], "intermediate_sizes": width["intermediate_sizes"],
                  "block_params_kept": plan.params_kept, "block_params_total": plan.params_total,
                  "params_dense": params_dense, **info}
        return record, {"max_abs_diff": ("the sliced model's", ref, atol),
                        "skipped_max_abs_diff": ("the skipped dense model's", skipped, atol)}

    return checked_export(out, write, ids=ids, dtype=next(model.parameters()).dtype, overwrite=overwrite)
