"""Export of a width-pruned model as a Hugging Face directory with small generated remote-code files.

Owns :func:`export_width` (a dense model + a plan) and :func:`save_width_model` (a model already sliced,
e.g. fine-tuned after pruning). The written directory loads with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` and no evoprune import:

- ``config.json``: the base family's config plus ``evoprune_width`` (base architecture, attribute layout,
  per-layer ``num_kv_groups`` / ``num_attention_heads`` / ``num_key_value_heads`` /
  ``intermediate_sizes``) and ``auto_map`` pointing at
- the generated remote-code files (:mod:`evoprune.models.remote`): the stock ``<Family>ForCausalLM``
  with its blocks resized after ``__init__`` (zero-group blocks get an attention that outputs zeros);
- ``model.safetensors``, the tokenizer and ``pruning.json`` (rates, kept parameters, source).

Written, reloaded and checked by :func:`~evoprune.export.checked.checked_export`.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..models.slicing import (
    is_width_pruned,
    save_width_pruned,
    width_config,
    width_masked,
    width_sliced,
)
from .checked import checked_export, logits_of, n_params, reference_ids

__all__ = ["export_width", "save_width_model"]


def export_width(loaded, plan, out: str | Path, *, overwrite: bool = False, atol: float = 1e-5,
                 masked_rtol: float = 1e-3, extra: dict | None = None) -> dict:
    """Write ``loaded`` (a :class:`~evoprune.models.LoadedModel`) pruned by ``plan`` to ``out``.

    ``plan``: a :class:`~evoprune.prune.width_plan.WidthPlan` for this model. Two checks on
    :func:`~evoprune.export.checked.reference_ids`, both must pass:

    - ``max_abs_diff``: reloaded vs the in-memory sliced model
      (:func:`~evoprune.models.slicing.width_sliced`), ``<= atol`` — the files
      reproduce evoprune's model (the same float operations: 0.0 in practice);
    - ``masked_max_abs_diff``: reloaded vs the in-memory masked model the search
      scored (:func:`~evoprune.models.slicing.width_masked`), ``<= max(atol,
      masked_rtol * max|logits|)``. The masked model sums the same products plus
      exact zeros, but fp32 matmuls of different widths add in a different
      order; on SmolLM2-135M that moves logits by ~1e-3 (2.6e-5 relative), on
      the tiny test models by 0. A wrong slice moves them by O(max|logits|).

    Returns the ``pruning.json`` record plus both diffs and ``out``; ``params`` is the exported model's
    parameter count, ``params_dense`` the loaded model's. Raises :class:`UserError` for a plan that does
    not fit or a non-empty ``out``, and :class:`~evoprune.export.checked.ExportError` when a check fails.
    """
    model, adapter = loaded.model, loaded.adapter
    if is_width_pruned(model):
        raise UserError("model is already width-pruned; export from the dense model")
    width_config(model, plan, adapter)  # validates the plan before any work
    ids = reference_ids(model.config.vocab_size)
    params_dense = n_params(model)

    def write(tmp: Path):
        with width_masked(model, plan, adapter):
            masked = logits_of(model, ids)
        with width_sliced(model, plan, adapter) as width:
            ref = logits_of(model, ids)
            save_width_pruned(model, tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        record = {"base_model": loaded.base, "base_layers": adapter.n_layers(model) + len(loaded.dropped),
                  "dropped_layers": list(loaded.dropped), "method": "width", "rates": list(plan.rates),
                  "layer_rates": [round(r, 6) for r in plan.layer_rates], "num_kv_groups": width["num_kv_groups"],
                  "intermediate_sizes": width["intermediate_sizes"], "block_params_kept": plan.params_kept,
                  "block_params_total": plan.params_total, "sparsity": plan.sparsity, "params_dense": params_dense,
                  **(extra or {})}
        masked_tol = max(atol, masked_rtol * float(masked.abs().max()))
        return record, {"max_abs_diff": ("the sliced model's", ref, atol),
                        "masked_max_abs_diff": ("the masked model's", masked, masked_tol)}

    return checked_export(out, write, ids=ids, dtype=next(model.parameters()).dtype, overwrite=overwrite)


def save_width_model(loaded, out: str | Path, *, overwrite: bool = False, atol: float = 1e-5,
                     extra: dict | None = None) -> dict:
    """Write ``loaded``, whose model is *already* width-sliced, in the :func:`export_width` format.

    For a model changed after slicing (e.g. LoRA-merged by :func:`evoprune.finetune.finetune_lora`): a
    width run loaded with :func:`evoprune.load_model`, or a width export loaded back. The widths come
    from ``model.config.evoprune_width``. One check: the reloaded (``trust_remote_code``) logits equal
    the in-memory model's, max abs diff ``<= atol`` (``max_abs_diff``); there is no masked-model check
    (no plan, and the weights are no longer the base model's). Returns the ``pruning.json`` record
    (``rates`` when ``loaded.extra['run']`` has them) plus ``max_abs_diff`` and ``out``.
    """
    model = loaded.model
    if not is_width_pruned(model):
        raise UserError("model is not width-pruned (no evoprune_width in its config); use export_width with a plan")
    ids = reference_ids(model.config.vocab_size)

    def write(tmp: Path):
        ref = logits_of(model, ids)
        save_width_pruned(model, tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        width = model.config.evoprune_width
        run = loaded.extra.get("run") or {}
        record = {"base_model": loaded.base, "base_layers": len(width["num_kv_groups"]) + len(loaded.dropped),
                  "dropped_layers": list(loaded.dropped), "method": "width",
                  **({"rates": list(run["rates"])} if run.get("rates") is not None else {}),
                  "num_kv_groups": list(width["num_kv_groups"]), "intermediate_sizes": list(width["intermediate_sizes"]),
                  **(extra or {})}
        return record, {"max_abs_diff": ("the in-memory model's", ref, atol)}

    return checked_export(out, write, ids=ids, dtype=next(model.parameters()).dtype, overwrite=overwrite)
