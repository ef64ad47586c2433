"""What the commands share: the model flags, loading, the JSON last line, progress, layer lists, recipes.

Owns :func:`add_model_options` (``--model/--device/--dtype``, generated once from
:class:`~evoprune.runner.sections.ModelOptions`), :func:`load` (a model spec -> ``LoadedModel``, quietly),
:func:`emit` (a command's result as the JSON last line of stdout, optionally also to a file),
:func:`progress`, :func:`drop_arg` (``--drop 3,13``) and :func:`read_recipe` (a YAML or JSON file).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError, user_input
from ..runner.sections import ModelOptions
from .options import add_options

__all__ = ["add_model_options", "load", "emit", "check_out_file", "progress", "drop_arg", "read_recipe",
           "quiet_transformers"]


def add_model_options(p, *, model: bool = True) -> None:
    """``--model``, ``--device``, ``--dtype`` with :class:`ModelOptions`' defaults (``model=False``: the command
    takes the model as a positional argument)."""
    add_options(p, ModelOptions, exclude=() if model else ("model",), defaults=True)


def progress() -> bool:
    return not os.environ.get("EVOPRUNE_NO_PROGRESS")


def quiet_transformers() -> None:
    """Per-tensor loading bars and warnings would precede (and clutter) one-line error messages;
    ``EVOPRUNE_VERBOSE=1`` keeps the warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not os.environ.get("EVOPRUNE_VERBOSE"):
        hf_logging.set_verbosity_error()


def load(spec: str, device: str = "cpu", dtype: str = "float32"):
    """The model behind ``spec`` (a run directory included), in ``dtype`` on ``device``."""
    import torch

    from ..runner.pruned import load_model

    quiet_transformers()
    return load_model(spec, dtype=getattr(torch, dtype), device=device, progress=progress())


def check_out_file(out: str | None) -> None:
    """Refuse an ``--out`` result file that cannot be one (a directory), before any work."""
    if out and Path(out).is_dir():
        raise UserError(f"--out {out} is a directory; give a file name")


def emit(obj: dict, out: str | None = None) -> None:
    """Print ``obj`` as the JSON last line of stdout; also save it to ``out`` when given."""
    if out:
        path = Path(out)
        check_out_file(out)
        with user_input("--out file", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(obj, indent=2) + "\n")
    print(json.dumps(obj), flush=True)


def drop_arg(text: str | None) -> tuple[int, ...]:
    """``"3,13"`` -> ``(3, 13)`` (validated against a model later); a :class:`UserError` for non-integers."""
    from ..spaces import parse_layer_list

    return parse_layer_list(text)


def read_recipe(path: str) -> dict:
    """A search recipe: a YAML (``.yaml``/``.yml``) or JSON file holding one mapping (see ``search --config``)."""
    p = Path(path)
    with user_input("--config file", p):
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                obj = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        else:
            obj = json.loads(text)
    if not isinstance(obj, dict):
        raise UserError(f"--config {path}: expected a mapping of options, got {type(obj).__name__}")
    return obj
