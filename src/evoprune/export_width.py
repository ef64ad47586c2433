"""Export of a width-pruned model as a Hugging Face directory with a small remote-code file.

Owns ``export_width`` (a dense model + a plan) and ``save_width_model`` (a
model already sliced, e.g. fine-tuned after pruning). The written directory loads with
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` and no
evoprune import:

- ``config.json``: the base family's config (same ``model_type``) plus
  ``evoprune_width`` (base architecture, attribute layout, per-layer
  ``num_kv_groups`` / ``num_attention_heads`` / ``num_key_value_heads`` /
  ``intermediate_sizes``) and ``auto_map`` pointing at
- ``modeling_evoprune_width.py`` / ``configuration_evoprune_width.py``, copied
  from :mod:`evoprune.models.remote`: the stock ``<Family>ForCausalLM`` with its
  blocks resized after ``__init__`` (zero-group blocks get an attention that
  outputs zeros);
- ``model.safetensors``, the tokenizer and ``pruning.json`` (rates, kept
  parameters, source).

Like :func:`evoprune.export.export_dropped`, the export is written to a
temporary directory, reloaded (with ``trust_remote_code=True``) and its logits
compared with the in-memory sliced and masked models (see :func:`export_width`)
before it is moved into place; a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import __version__
from .errors import UserError
from .export import ExportError, _logits, check_out_dir, reference_ids
from .models.remote import configuration_evoprune_width as remote_config
from .models.remote import modeling_evoprune_width as remote_modeling
from .models.width import WIDTH_KEY, width_config, width_masked, width_sliced

__all__ = ["export_width", "save_width_model"]

_REMOTE_FILES = (Path(remote_modeling.__file__), Path(remote_config.__file__))


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters count once


def _build_pruned(model: torch.nn.Module, width: dict) -> torch.nn.Module:
    """The remote-code model class holding ``model``'s current (sliced) weights, tensors shared."""
    mtype = model.config.model_type
    config = remote_config.CONFIG_CLASSES[mtype].from_dict(model.config.to_dict())
    setattr(config, WIDTH_KEY, width)
    cls = remote_modeling.MODEL_CLASSES[mtype]
    config.auto_map = {"AutoConfig": f"{Path(remote_config.__file__).stem}.{type(config).__name__}",
                       "AutoModelForCausalLM": f"{Path(remote_modeling.__file__).stem}.{cls.__name__}"}
    with torch.device("meta"):
        pruned = cls(config)
    pruned.load_state_dict(model.state_dict(), strict=True, assign=True)
    pruned.tie_weights()
    return pruned.eval()


def export_width(loaded, plan, out: str | Path, *, overwrite: bool = False, atol: float = 1e-5,
                 masked_rtol: float = 1e-3, extra: dict | None = None) -> dict:
    """Write ``loaded`` (a :class:`~evoprune.models.LoadedModel`) pruned by ``plan`` to ``out``.

    ``plan``: a :class:`~evoprune.prune.width_plan.WidthPlan` for this model.
    Two checks on :func:`~evoprune.export.reference_ids`, both must pass:

    - ``max_abs_diff``: reloaded vs the in-memory sliced model
      (:func:`~evoprune.models.width.width_sliced`), ``<= atol`` — the files
      reproduce evoprune's model (the same float operations: 0.0 in practice);
    - ``masked_max_abs_diff``: reloaded vs the in-memory masked model the search
      scored (:func:`~evoprune.models.width.width_masked`), ``<= max(atol,
      masked_rtol * max|logits|)``. The masked model sums the same products plus
      exact zeros, but fp32 matmuls of different widths add in a different
      order; on SmolLM2-135M that moves logits by ~1e-3 (2.6e-5 relative), on
      the tiny test models by 0. A wrong slice moves them by O(max|logits|).

    Returns the ``pruning.json`` record plus both diffs and ``out``; ``params``
    is the exported model's parameter count, ``params_dense`` the loaded
    model's. Raises :class:`UserError` for a plan that does not fit, an
    unsupported family or a non-empty ``out``, and :class:`ExportError` when a
    check fails.
    """
    model, adapter = loaded.model, loaded.adapter
    mtype = model.config.model_type
    if mtype not in remote_modeling.MODEL_CLASSES:
        raise UserError(f"width export does not support {mtype!r} models")
    if getattr(model.config, WIDTH_KEY, None):
        raise UserError("model is already width-pruned; export from the dense model")
    width_config(model, plan, adapter)  # validates the plan before any work
    out = check_out_dir(out, overwrite)
    ids = reference_ids(model.config.vocab_size)
    dtype = next(model.parameters()).dtype
    params_dense = _n_params(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        with width_masked(model, plan, adapter):
            masked = _logits(model, ids)
        with width_sliced(model, plan, adapter) as width:
            ref = _logits(model, ids)
            _write_files(model, width, loaded.tokenizer, tmp)
        params, got = _reload(tmp, dtype, ids)
        record = {
            "base_model": loaded.base,
            "base_layers": adapter.n_layers(model) + len(loaded.dropped),
            "dropped_layers": list(loaded.dropped),
            "method": "width",
            "rates": list(plan.rates),
            "layer_rates": [round(r, 6) for r in plan.layer_rates],
            "num_kv_groups": width["num_kv_groups"],
            "intermediate_sizes": width["intermediate_sizes"],
            "block_params_kept": plan.params_kept,
            "block_params_total": plan.params_total,
            "sparsity": plan.sparsity,
            "params": params,
            "params_dense": params_dense,
            "evoprune_version": __version__,
            **(extra or {}),
        }
        (tmp / "pruning.json").write_text(json.dumps(record, indent=2) + "\n")
        diff = float((got - ref).abs().max())
        masked_diff = float((got - masked).abs().max())
        masked_tol = max(atol, masked_rtol * float(masked.abs().max()))
        if not diff <= atol:
            raise ExportError(f"export check failed: reloaded logits differ from the sliced model's by "
                              f"{diff:.3g} > {atol:g}")
        if not masked_diff <= masked_tol:
            raise ExportError(f"export check failed: reloaded logits differ from the masked model's by "
                              f"{masked_diff:.3g} > {masked_tol:.3g}")
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {**record, "max_abs_diff": diff, "masked_max_abs_diff": masked_diff, "out": str(out)}


def save_width_model(loaded, out: str | Path, *, overwrite: bool = False, atol: float = 1e-5,
                     extra: dict | None = None) -> dict:
    """Write ``loaded``, whose model is *already* width-sliced, in the :func:`export_width` format.

    For a model changed after slicing (e.g. LoRA-merged by
    :func:`evoprune.finetune.finetune_lora`): a width run loaded with
    :func:`~evoprune.record.load_run_model`, or a width export loaded back. The
    widths come from ``model.config.evoprune_width``. One check, on
    :func:`~evoprune.export.reference_ids`: the reloaded (``trust_remote_code``)
    logits equal the in-memory model's, max abs diff ``<= atol``
    (``max_abs_diff``). There is no masked-model check: no plan, and the weights
    are no longer the base model's. Written to a temporary directory and moved
    into place only after the check, like every export.

    Returns the ``pruning.json`` record (``rates`` when ``loaded.extra['run']``
    has them) plus ``max_abs_diff`` and ``out``. Raises :class:`UserError` for a
    model that is not width-pruned, an unsupported family or a non-empty
    ``out``; :class:`ExportError` when the check fails.
    """
    model = loaded.model
    width = getattr(model.config, WIDTH_KEY, None)
    if not width:
        raise UserError("model is not width-pruned (no evoprune_width in its config); use export_width with a plan")
    mtype = model.config.model_type
    if mtype not in remote_modeling.MODEL_CLASSES:
        raise UserError(f"width export does not support {mtype!r} models")
    out = check_out_dir(out, overwrite)
    ids = reference_ids(model.config.vocab_size)
    dtype = next(model.parameters()).dtype
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        ref = _logits(model, ids)
        _write_files(model, width, loaded.tokenizer, tmp)
        params, got = _reload(tmp, dtype, ids)
        run = loaded.extra.get("run") or {}
        record = {
            "base_model": loaded.base,
            "base_layers": len(width["num_kv_groups"]) + len(loaded.dropped),
            "dropped_layers": list(loaded.dropped),
            "method": "width",
            **({"rates": list(run["rates"])} if run.get("rates") is not None else {}),
            "num_kv_groups": list(width["num_kv_groups"]),
            "intermediate_sizes": list(width["intermediate_sizes"]),
            "params": params,
            "evoprune_version": __version__,
            **(extra or {}),
        }
        (tmp / "pruning.json").write_text(json.dumps(record, indent=2) + "\n")
        diff = float((got - ref).abs().max())
        if not diff <= atol:
            raise ExportError(f"export check failed: reloaded logits differ from the in-memory model's by "
                              f"{diff:.3g} > {atol:g}")
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {**record, "max_abs_diff": diff, "out": str(out)}


def _write_files(model: torch.nn.Module, width: dict, tokenizer, tmp: Path) -> None:
    """Weights + config (remote-code class), the two remote-code files and the tokenizer into ``tmp``."""
    pruned = _build_pruned(model, width)
    pruned.save_pretrained(tmp)
    del pruned
    for f in _REMOTE_FILES:
        shutil.copyfile(f, tmp / f.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def _reload(tmp: Path, dtype: torch.dtype, ids: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Parameter count and logits on ``ids`` of the directory reloaded with ``trust_remote_code``."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, trust_remote_code=True).eval()
    try:
        return _n_params(reloaded), _logits(reloaded, ids)
    finally:
        del reloaded


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
