"""What the commands share: the model flags, loading, the JSON last line, progress, layer lists, recipes.

Owns :func:`add_model_options` (``--model/--device/--dtype``, generated once from
:class:`~evoprune.runner.sections.ModelOptions`), :func:`preflight` (the device and each window against the
model's context, before any load), :func:`load` (a model spec -> ``LoadedModel``, quietly, its device checked first),
:func:`emit` (a command's result as the JSON last line of stdout, optionally also to a file),
:func:`progress`, :func:`drop_arg` (``--drop 3,13``) and :func:`read_recipe` (a YAML or JSON file).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import UserError, user_input
from ..runner.sections import ModelOptions
from .options import add_options

__all__ = ["add_model_options", "preflight", "load", "emit", "check_out_file", "progress", "drop_arg", "read_recipe",
           "quiet_transformers", "at_least"]


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


def at_least(args, minimum: int, *names: str) -> None:
    """Refuse an integer flag of ``args`` below ``minimum`` (``None``: not given, allowed)."""
    for name in names:
        v = getattr(args, name)
        if v is not None and v < minimum:
            raise UserError(f"--{name.replace('_', '-')} must be >= {minimum}, got {v}")


def preflight(spec: str, device: str | None, windows: dict[str, int] | None = None, drop: tuple[int, ...] = ()):
    """Before any model load: refuse an unavailable ``device``, a model spec that names nothing, each window
    (``{"--seqlen 4096": 4096}``) longer than the context of the model behind ``spec`` (a run directory: its
    base model) and ``--drop`` blocks it does not have. Returns the model's
    :class:`~evoprune.models.preflight.ModelFacts` when windows or blocks were checked (``None``: unknown, e.g. a
    hub id, or not read)."""
    from ..models.preflight import check_device, check_spec, check_window, model_facts
    from ..runner.pruned import base_spec
    from ..spaces import DropPattern

    ModelOptions(model=spec)  # an empty --model
    check_device(device)
    base = base_spec(spec)
    check_spec(base)
    facts = model_facts(base) if windows or drop else None  # a GGUF not converted yet takes seconds to read
    for what, tokens in (windows or {}).items():
        check_window(facts, tokens, what, spec)
    if drop and facts is not None and facts.n_layers and base == str(spec):  # a run's indices are its pruned model's
        try:
            DropPattern(facts.n_layers, drop)
        except UserError as e:
            raise UserError(f"--drop {','.join(map(str, drop))}: {e}") from None
    return facts


def load(spec: str, device: str = "cpu", dtype: str = "float32"):
    """The model behind ``spec`` (a run directory included), in ``dtype`` on ``device`` (checked first)."""
    import torch

    from ..runner.pruned import load_model

    preflight(spec, device)
    quiet_transformers()
    lm = load_model(spec, dtype=getattr(torch, dtype), device=device, progress=progress())
    run = lm.extra.get("run") or {}
    if run.get("unfinished"):
        print(f"note: run {spec} is unfinished, {run['unfinished']}: using its best candidate so far (calib loss "
              f"{run['calib_loss']:.4f} after {run['evaluations']} evaluations)", file=sys.stderr, flush=True)
    return lm


def check_out_file(out: str | None) -> None:
    """Refuse an ``--out`` result file that cannot be one (empty, a directory, under a file), before any work."""
    if out is None:
        return
    if not out.strip():
        raise UserError("--out must not be empty (give a file name, or leave --out out)")
    path = Path(out).expanduser()
    if path.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a directory")


def emit(obj: dict, out: str | None = None) -> None:
    """Print ``obj`` as the JSON last line of stdout; also save it to ``out`` when given."""
    if out:
        from ..files import atomic_open

        path = Path(out).expanduser()
        check_out_file(out)
        with user_input("--out file", path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_open(path) as f:
                f.write(json.dumps(obj, indent=2) + "\n")
    print(json.dumps(obj), flush=True)


def drop_arg(text: str | None) -> tuple[int, ...]:
    """``"3,13"`` -> ``(3, 13)`` (validated against a model later); a :class:`UserError` for non-integers."""
    from ..spaces import parse_layer_list

    try:
        return parse_layer_list(text)
    except UserError as e:
        raise UserError(f"--drop: {e}") from None


def read_recipe(path: str) -> dict:
    """A search recipe: a YAML (``.yaml``/``.yml``) or JSON file holding one mapping (see ``search --config``)."""
    if not str(path).strip():
        raise UserError("--config must not be empty")
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"--config {path} is a directory; give a recipe file")
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
