"""Calibration sets: the token samples every fitness evaluation runs on.

Owns
- :class:`CalibSet`, the saved/reusable value (token ids ``[n_samples, seqlen]``
  + one cluster id per sample + provenance ``meta``), with atomic save/load
  and slicing for multi-fidelity evaluation;
- :func:`random_windows`, SLEB-style sampling (``--sampling random``), and the
  helpers every sampler shares (:func:`tokenize_texts`, :func:`base_meta`);
  EvoP's clustered sampling is :func:`evoprune.data.ccds.ccds`.

All randomness comes from the caller's ``numpy.random.Generator``; the same
seed, text, tokenizer and embedder give the same token ids. Nothing here
downloads anything; the encoder is loaded by :mod:`evoprune.data.embed`.
Token ids are produced with ``add_special_tokens=False`` (no BOS/EOS/CLS):
samples are raw text windows, whatever the model adds is the evaluator's call.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..tensorfiles import load_tagged, save_tagged

__all__ = ["CalibSet", "random_windows", "tokenize_texts", "base_meta", "check_positive"]

FORMAT = "evoprune.calib/1"
# meta keys holding one entry per sample; slice() cuts them with the samples.
_PER_SAMPLE_KEYS = ("window_starts", "sample_chunks")


@dataclass(frozen=True, eq=False)
class CalibSet:
    """A fixed calibration set.

    - ``input_ids``: ``torch.long`` ``[n_samples, seqlen]`` token ids (CPU).
    - ``cluster_ids``: one int per sample, the CCDS cluster it was drawn from;
      ``-1`` for random sampling.
    - ``meta``: JSON-able provenance (method, seed, seqlen, source, ...). It is
      normalised through a JSON round trip on construction (tuples become
      lists), so a loaded set compares equal to the saved one.
    """

    input_ids: torch.Tensor
    cluster_ids: tuple[int, ...]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = torch.as_tensor(self.input_ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [n_samples>=1, seqlen>=1], got shape {tuple(ids.shape)}")
        if ids.dtype != torch.long:
            raise ValueError(f"input_ids must be torch.long, got {ids.dtype}")
        cids = tuple(int(c) for c in self.cluster_ids)
        if len(cids) != ids.shape[0]:
            raise ValueError(f"{len(cids)} cluster ids for {ids.shape[0]} samples")
        try:
            meta = json.loads(json.dumps(self.meta))
        except TypeError as e:
            raise ValueError(f"meta must be JSON-serialisable: {e}") from e
        object.__setattr__(self, "input_ids", ids.detach().to("cpu").contiguous())
        object.__setattr__(self, "cluster_ids", cids)
        object.__setattr__(self, "meta", meta)

    # -- shape helpers -------------------------------------------------------
    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seqlen(self) -> int:
        """Tokens per sample."""
        return int(self.input_ids.shape[1])

    @property
    def n_tokens(self) -> int:
        """Total tokens = n_samples * seqlen (the unit of ``token_layers``)."""
        return self.n_samples * self.seqlen

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CalibSet):
            return NotImplemented
        return (torch.equal(self.input_ids, other.input_ids) and self.cluster_ids == other.cluster_ids
                and self.meta == other.meta)

    __hash__ = None  # mutable tensor inside; equality is by value

    def __repr__(self) -> str:
        return (f"CalibSet(n_samples={self.n_samples}, seqlen={self.seqlen}, "
                f"method={self.meta.get('method')!r}, source={self.meta.get('source')!r})")

    # -- multi-fidelity ------------------------------------------------------
    def slice(self, n_samples: int | None = None, n_tokens: int | None = None) -> "CalibSet":
        """The first ``n_samples`` samples, each cut to its first ``n_tokens`` tokens.

        ``None`` keeps that axis whole. CCDS samples are stored round-robin over
        clusters, so the first ``clusters`` samples already cover every cluster.
        """
        ns = self.n_samples if n_samples is None else int(n_samples)
        nt = self.seqlen if n_tokens is None else int(n_tokens)
        if not 1 <= ns <= self.n_samples:
            raise ValueError(f"n_samples must be in [1, {self.n_samples}], got {ns}")
        if not 1 <= nt <= self.seqlen:
            raise ValueError(f"n_tokens must be in [1, {self.seqlen}], got {nt}")
        meta = dict(self.meta)
        for key in _PER_SAMPLE_KEYS:
            if isinstance(meta.get(key), list):
                meta[key] = meta[key][:ns]
        meta["sliced_from"] = meta.get("sliced_from") or {"n_samples": self.n_samples, "seqlen": self.seqlen}
        meta["n_samples"], meta["seqlen"] = ns, nt
        return CalibSet(self.input_ids[:ns, :nt].clone(), self.cluster_ids[:ns], meta)

    # -- persistence ---------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` (one ``.pt`` file) atomically: temp file, fsync, ``os.replace``."""
        save_tagged(path, FORMAT, {"input_ids": self.input_ids, "cluster_ids": list(self.cluster_ids),
                                   "meta_json": json.dumps(self.meta, sort_keys=True)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibSet":
        """Read a file written by :meth:`save`.

        ``FileNotFoundError`` if absent; ``ValueError`` (one line) if it is not a
        calibration set or is corrupted. Uses ``weights_only=True``: no code runs.
        """
        return load_tagged(path, FORMAT, "calibration set", lambda obj: cls(
            obj["input_ids"], tuple(obj["cluster_ids"]), json.loads(obj["meta_json"])))


# -- shared helpers ------------------------------------------------------------

def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text, no special tokens; ``verbose=False`` silences the
    'longer than model max length' warning (we only slice ids, never run them)."""
    return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]


def _rng_seed(rng: np.random.Generator) -> int | None:
    """The int seed of a *fresh* ``default_rng(seed)``; ``None`` if unknown or already used."""
    bg = rng.bit_generator
    seq = getattr(bg, "seed_seq", None)
    if seq is None or not isinstance(getattr(seq, "entropy", None), int) or seq.spawn_key:
        return None
    return int(seq.entropy) if type(bg)(seq).state == bg.state else None


def base_meta(method: str, text: str, tokenizer: Any, seqlen: int, rng: np.random.Generator,
               source: str) -> dict:
    return {
        "method": method,
        "seed": _rng_seed(rng),
        "seqlen": int(seqlen),
        "source": source,
        "text_chars": len(text),
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "tokenizer": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
        "vocab_size": len(tokenizer) if hasattr(tokenizer, "__len__") else None,
    }


def check_positive(**kwargs: int) -> None:
    for name, v in kwargs.items():
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")


# -- SLEB-style random windows ---------------------------------------------------

def random_windows(text: str, tokenizer: Any, nsamples: int, seqlen: int, rng: np.random.Generator,
                   source: str = "") -> CalibSet:
    """``nsamples`` random contiguous windows of ``seqlen`` tokens from ``text``.

    As SLEB: the whole text is tokenized once and each window start is drawn
    uniformly from ``[0, n_tokens - seqlen - 1]`` (one token of slack, as in
    SLEB's ``randint(0, n - seqlen - 1)``). Windows may overlap.
    Returns ``input_ids`` ``[nsamples, seqlen]``, cluster ids all ``-1``.
    Raises ``ValueError`` if the text is empty or shorter than ``seqlen + 1`` tokens.
    """
    check_positive(nsamples=nsamples, seqlen=seqlen)
    if not text or not text.strip():
        raise ValueError(f"calibration text{f' {source!r}' if source else ''} is empty")
    meta = base_meta("random", text, tokenizer, seqlen, rng, source)
    ids = tokenize_texts(tokenizer, [text])[0]
    if len(ids) < seqlen + 1:
        raise ValueError(f"calibration text{f' {source!r}' if source else ''} has {len(ids)} tokens; "
                         f"need at least seqlen+1 = {seqlen + 1}")
    all_ids = torch.tensor(ids, dtype=torch.long)
    starts = rng.integers(0, len(ids) - seqlen, size=int(nsamples))
    input_ids = torch.stack([all_ids[s:s + seqlen] for s in starts.tolist()])
    meta.update(nsamples=int(nsamples), n_text_tokens=len(ids), window_starts=[int(s) for s in starts])
    return CalibSet(input_ids, (-1,) * int(nsamples), meta)
