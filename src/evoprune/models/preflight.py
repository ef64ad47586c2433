"""What can be checked before a model's weights are loaded: the device it goes to and what its config says.

Owns :func:`check_device` (an unknown, unavailable or out-of-range torch device is a
:class:`~evoprune.errors.UserError`), :func:`check_spec` (from :mod:`.loading`: a spec that names nothing), :func:`model_facts` (a model spec's context length, family and block
count, read from its ``config.json`` or GGUF metadata; ``None`` where that needs the network) and
:func:`check_window` (a window longer than the model's context is a :class:`UserError`). The commands call
these first, so a bad ``--device`` or ``--seqlen`` costs no model load and writes nothing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .loading import check_spec

__all__ = ["check_device", "check_spec", "ModelFacts", "model_facts", "config_facts", "check_window"]

# config.json keys that hold a model's trained context, most common first
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def check_device(device: str | None, what: str = "--device") -> None:
    """Refuse a device this machine cannot run a model on: an unknown name, CUDA in a CPU-only build or on a
    machine without a GPU, ``cuda:N`` beyond the GPUs present, an unavailable MPS/XPU backend."""
    import torch

    if device is None:
        return
    text = str(device).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"{what} {device!r} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cpu":
        return
    if dev.type == "meta":
        raise UserError(f"{what} meta holds no data; a model cannot run there (use cpu, cuda, cuda:N or mps)")
    backend = getattr(torch, dev.type, None)
    if dev.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = backend is not None and getattr(backend, "is_available", lambda: False)()
    if not available:
        why = "this torch is a CPU-only build" if dev.type == "cuda" and torch.version.cuda is None else \
            f"no {dev.type.upper()} device is available"
        raise UserError(f"{what} {text}: {why} (use --device cpu)")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        have = ", ".join(f"{dev.type}:{i}" for i in range(count))
        raise UserError(f"{what} {text}: this machine has {count} {dev.type.upper()} device"
                        f"{'s' if count != 1 else ''} ({have})")


@dataclass(frozen=True)
class ModelFacts:
    """What a model's config says: ``context`` (positions it was trained for; ``None``: not stated),
    ``model_type`` and ``n_layers`` (decoder blocks)."""

    context: int | None
    model_type: str | None
    n_layers: int | None

    @property
    def projections(self) -> tuple[str, ...] | None:
        """The family's block projection names (``q_proj``, ...); ``None`` for a family evoprune does not know."""
        from .base import adapter_for_type

        try:
            return adapter_for_type(str(self.model_type)).projection_names()
        except UserError:
            return None


def _from_config(d: dict) -> ModelFacts:
    text = d.get("text_config") if isinstance(d.get("text_config"), dict) else {}
    def first(*keys):
        for src in (d, text):
            for k in keys:
                v = src.get(k)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
        return None

    return ModelFacts(first(*_CONTEXT_KEYS), d.get("model_type"), first("num_hidden_layers", "n_layer", "num_layers"))


def config_facts(config: dict) -> ModelFacts:
    """The :class:`ModelFacts` of a model's config (``config.json`` as a dict)."""
    return _from_config(config)


def _from_gguf(path: Path) -> ModelFacts:
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.get_field("general.architecture").contents()

    def value(key):
        f = reader.get_field(f"{arch}.{key}")
        return int(f.contents()) if f is not None else None

    return ModelFacts(value("context_length"), arch, value("block_count"))


def model_facts(spec: str) -> ModelFacts | None:
    """The :class:`ModelFacts` of a model spec (built-in alias, ``.gguf`` file, local HF directory); ``None`` for a
    hub id (reading its config would need the network; the load checks it) or a spec that does not resolve (the
    load says why)."""
    from .loading import converted_dir, gguf_file

    try:
        gguf = gguf_file(spec)
    except UserError:
        return None
    if gguf is not None:
        cached = converted_dir(gguf, spec)
        if cached is not None:
            return _from_config(json.loads((cached / "config.json").read_text()))
        try:
            return _from_gguf(gguf)
        except Exception:  # not readable as GGUF: the load reports it
            return None
    cfg = Path(spec).expanduser() / "config.json"
    if not cfg.is_file():
        return None
    try:
        d = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    return _from_config(d) if isinstance(d, dict) else None


def check_window(facts: ModelFacts | None, tokens: int, what: str, name: str) -> None:
    """Refuse a window of ``tokens`` positions (``what``: the flag, e.g. ``--seqlen 100000``) longer than the
    context of the model ``name`` (``facts`` from :func:`model_facts`; unknown context: no check)."""
    if facts is None or facts.context is None or tokens <= facts.context:
        return
    raise UserError(f"{what} is longer than the context of {name} ({facts.context:,} positions)")
