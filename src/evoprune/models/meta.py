"""A model to plan for, without its weights: a config resolved offline and built on the ``meta`` device.

Owns :func:`reference_configs` (the small JSON configs shipped in ``evoprune/models/configs``),
:func:`resolve_config` (``--model-config NAME|PATH|HUB_ID``, or the search's ``--model``) and
:func:`meta_model` (the :class:`~evoprune.models.loading.LoadedModel` of a config with every tensor on
the ``meta`` device: shapes and parameter counts, no memory, no download), for :mod:`evoprune.plan`.
Nothing here loads weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError

__all__ = ["reference_configs", "resolve_config", "meta_model", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).with_name("configs")


def reference_configs() -> list[str]:
    """Names of the shipped reference configs (``llama-3.1-8b``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--model-config {path}: not a readable config.json ({e})") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise UserError(f"--model-config {path}: not a Hugging Face config (no model_type)")
    return {k: v for k, v in d.items() if not k.startswith("_")}


def resolve_config(spec: str) -> tuple[dict, str]:
    """``(config dict, where it came from)`` for a shipped name, a ``config.json`` (or a directory holding
    one, e.g. a run's export), a run directory (its model), or a hub id (``AutoConfig``: the hub's cache
    offline). :class:`UserError` when none of these resolves."""
    spec = str(spec)
    name = spec.lower().removesuffix(".json")
    if (CONFIG_DIR / f"{name}.json").is_file():
        return _read(CONFIG_DIR / f"{name}.json"), f"shipped config {name}"
    p = Path(spec).expanduser()
    if p.is_file():
        return _read(p), str(p)
    if p.is_dir():
        if (p / "config.json").is_file() and "evoprune_run" in json.loads((p / "config.json").read_text()):
            model = json.loads((p / "config.json").read_text()).get("model", {})
            model = model.get("model") if isinstance(model, dict) else model
            return resolve_config(model or "smollm2-135m")
        if (p / "config.json").is_file():
            return _read(p / "config.json"), str(p / "config.json")
        raise UserError(f"--model-config {spec}: directory without config.json")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"--model-config {spec}: no such file")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(spec).to_dict(), f"hub config {spec}"
    except Exception as e:  # offline without a cached copy, a typo, a gated repo
        raise UserError(f"--model-config {spec}: not a shipped config ({', '.join(reference_configs())}), a file "
                        f"or a hub id that resolves here ({type(e).__name__})") from None


def meta_model(config: dict, dtype: str = "bfloat16", name: str = "plan"):
    """The :class:`~evoprune.models.loading.LoadedModel` of ``config`` on the ``meta`` device (no tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .base import get_adapter
    from .loading import LoadedModel

    d = dict(config)
    model_type = d.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **d)
    except (KeyError, ValueError) as e:
        raise UserError(f"model type {model_type!r} is not known to this transformers ({e})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    return LoadedModel(model, None, get_adapter(model), name=name, base=name)
