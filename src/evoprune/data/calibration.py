"""Calibration sets: the token samples every fitness evaluation runs on.

Owns
- :class:`CalibSet`, the saved/reusable value (token ids ``[n_samples, seqlen]``
  + one cluster id per sample + provenance ``meta``), with atomic save/load
  and slicing for multi-fidelity evaluation;
- :func:`random_windows`, SLEB-style sampling (``--sampling random``);
- :func:`ccds`, EvoP Algorithm 4.1, cluster-based calibration data sampling
  (``--sampling ccds``), with its text pieces :func:`split_sentences`,
  :func:`make_chunks` and :func:`cluster_chunks`.

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
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..atomic import atomic_open

__all__ = [
    "CalibSet",
    "ccds",
    "cluster_chunks",
    "make_chunks",
    "random_windows",
    "split_sentences",
]

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
        payload = {"format": FORMAT, "input_ids": self.input_ids,
                   "cluster_ids": list(self.cluster_ids), "meta_json": json.dumps(self.meta, sort_keys=True)}
        with atomic_open(path, "wb") as f:
            torch.save(payload, f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CalibSet":
        """Read a file written by :meth:`save`.

        ``FileNotFoundError`` if absent; ``ValueError`` (one line) if it is not a
        calibration set or is corrupted. Uses ``weights_only=True``: no code runs.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration set not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict) or obj.get("format") != FORMAT:
                raise ValueError(f"format tag is {obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r}")
            return cls(obj["input_ids"], tuple(obj["cluster_ids"]), json.loads(obj["meta_json"]))
        except Exception as e:  # any unpickling/shape/key error means the same thing to the user
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: not a valid evoprune calibration set ({msg})") from e


# -- shared helpers ------------------------------------------------------------

def _tokenize(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
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


def _base_meta(method: str, text: str, tokenizer: Any, seqlen: int, rng: np.random.Generator,
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


def _check_positive(**kwargs: int) -> None:
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
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    if not text or not text.strip():
        raise ValueError(f"calibration text{f' {source!r}' if source else ''} is empty")
    meta = _base_meta("random", text, tokenizer, seqlen, rng, source)
    ids = _tokenize(tokenizer, [text])[0]
    if len(ids) < seqlen + 1:
        raise ValueError(f"calibration text{f' {source!r}' if source else ''} has {len(ids)} tokens; "
                         f"need at least seqlen+1 = {seqlen + 1}")
    all_ids = torch.tensor(ids, dtype=torch.long)
    starts = rng.integers(0, len(ids) - seqlen, size=int(nsamples))
    input_ids = torch.stack([all_ids[s:s + seqlen] for s in starts.tolist()])
    meta.update(nsamples=int(nsamples), n_text_tokens=len(ids), window_starts=[int(s) for s in starts])
    return CalibSet(input_ids, (-1,) * int(nsamples), meta)


# -- CCDS (EvoP Algorithm 4.1) ---------------------------------------------------

# A sentence ends at . ! or ? (optionally followed by one closing quote/bracket)
# and whitespace, or at any line break. Deliberately simple and deterministic:
# like the authors' splitter it also breaks after abbreviations ("H. americanus"),
# which only shifts chunk boundaries a little. WikiText's " = Heading = " lines
# become their own sentences.
_SENTENCE_SEP = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'\u201d\u2019)\]]))\s+|\s*\n\s*")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence spans ``(start, end)`` (character offsets, end exclusive) in ``text``.

    Spans are stripped of surrounding whitespace, non-empty, in text order.
    """
    spans: list[tuple[int, int]] = []
    pos = 0

    def add(a: int, b: int) -> None:
        seg = text[a:b]
        stripped = seg.strip()
        if stripped:
            a += len(seg) - len(seg.lstrip())
            spans.append((a, a + len(stripped)))

    for m in _SENTENCE_SEP.finditer(text):
        add(pos, m.start())
        pos = m.end()
    add(pos, len(text))
    return spans


def make_chunks(text: str, chunk_sentences: int) -> list[tuple[int, int]]:
    """Group sentences into chunks of ``chunk_sentences`` (the last may be shorter).

    Returns character spans that tile the text: chunk ``i`` runs from the end of
    chunk ``i-1`` (0 for the first) to the end of its last sentence. Keeping the
    whitespace *before* a chunk means the chunk, tokenized alone, starts the way
    it does in running text (e.g. ``" The"`` for BPE tokenizers), and keeps the
    source's paragraph breaks, which held-out evaluation text also has.
    """
    return _group_sentences(split_sentences(text), chunk_sentences)


def _group_sentences(sents: list[tuple[int, int]], chunk_sentences: int) -> list[tuple[int, int]]:
    _check_positive(chunk_sentences=chunk_sentences)
    n = int(chunk_sentences)
    chunks: list[tuple[int, int]] = []
    prev_end = 0
    for i in range(0, len(sents), n):
        end = sents[min(i + n, len(sents)) - 1][1]
        chunks.append((prev_end, end))
        prev_end = end
    return chunks


def cluster_chunks(embeddings: np.ndarray, clusters: int, random_state: int) -> np.ndarray:
    """KMeans labels ``[n_chunks]`` for ``embeddings`` ``[n_chunks, dim]``.

    ``KMeans(n_clusters=clusters, random_state=random_state, n_init=10)``; labels
    are renumbered by first appearance in text order, so cluster 0 is the
    cluster of the first chunk (KMeans' own numbering is arbitrary).
    Raises ``ValueError`` if a cluster comes out empty (too few distinct chunks).
    """
    from sklearn.cluster import KMeans  # lazy: sklearn import is slow
    from sklearn.exceptions import ConvergenceWarning

    n = embeddings.shape[0]
    if n < clusters:
        raise ValueError(f"{n} chunks but {clusters} clusters requested; use more text, fewer "
                         f"--clusters, or a smaller --chunk-sentences")
    with warnings.catch_warnings():
        # duplicate points make KMeans warn and leave clusters empty; we raise instead
        warnings.simplefilter("ignore", ConvergenceWarning)
        raw = KMeans(n_clusters=int(clusters), random_state=int(random_state), n_init=10).fit_predict(embeddings)
    order: dict[int, int] = {}
    for lab in raw.tolist():
        order.setdefault(lab, len(order))
    if len(order) < clusters:
        raise ValueError(f"only {len(order)} distinct clusters among {n} chunks (duplicate text?); "
                         f"use fewer --clusters")
    return np.array([order[lab] for lab in raw.tolist()], dtype=np.int64)


def ccds(text: str, tokenizer: Any, *, clusters: int = 5, samples_per_cluster: int = 1, seqlen: int,
         chunk_sentences: int = 60, embedder: Any = None, rng: np.random.Generator, source: str = "",
         progress: bool = True, embed_device: str = "cpu", embed_batch_size: int = 32) -> CalibSet:
    """Cluster-based calibration data sampling (EvoP Algorithm 4.1).

    1. split ``text`` into sentences and group them into chunks of
       ``chunk_sentences`` (:func:`make_chunks`);
    2. embed each chunk (whitespace-stripped) with a sentence encoder —
       ``embedder`` is ``None`` (all-MiniLM-L6-v2), a spec string for
       :func:`evoprune.data.embed.load_embedder`, or an object with ``encode``;
    3. KMeans into ``clusters`` clusters (:func:`cluster_chunks`);
    4. for each cluster build ``samples_per_cluster`` samples: append the token
       ids of randomly chosen chunks of that cluster until ``>= seqlen`` tokens,
       then truncate to exactly ``seqlen``.

    Random choices, in this order, all from ``rng``: the KMeans ``random_state``;
    one shuffled order of each cluster's chunks (cluster 0 first). A sample
    takes the next chunks in its cluster's order, so samples of a cluster share
    no chunk until the cluster is used up; then a fresh shuffle is drawn and
    chunks repeat (``meta["chunk_reuse"]`` is then true). Samples are stored
    round-robin — ``[c0, c1, .., c(k-1), c0, ..]`` — so any prefix of
    ``clusters`` samples covers all clusters.

    Returns ``input_ids`` ``[clusters * samples_per_cluster, seqlen]``;
    ``meta["sample_chunks"][i]`` lists the chunk indices used by sample ``i`` and
    ``meta["chunk_labels"]`` the cluster of every chunk.
    Raises ``ValueError`` for empty text or fewer chunks than clusters.
    """
    from .embed import describe_embedder, embed_texts, load_embedder

    _check_positive(clusters=clusters, samples_per_cluster=samples_per_cluster, seqlen=seqlen,
                    chunk_sentences=chunk_sentences)
    where = f" {source!r}" if source else ""
    if not text or not text.strip():
        raise ValueError(f"calibration text{where} is empty")
    meta = _base_meta("ccds", text, tokenizer, seqlen, rng, source)
    sents = split_sentences(text)
    spans = _group_sentences(sents, chunk_sentences)
    if len(spans) < clusters:
        raise ValueError(f"calibration text{where} gives {len(spans)} chunks of {chunk_sentences} sentences, "
                         f"fewer than --clusters {clusters}; use more text or a smaller --chunk-sentences")
    kmeans_seed = int(rng.integers(0, 2**31 - 1))

    t0 = time.perf_counter()
    model = load_embedder(embedder, device=embed_device) if embedder is None or isinstance(embedder, str) else embedder
    t1 = time.perf_counter()
    emb = embed_texts(model, [text[a:b].strip() for a, b in spans], batch_size=embed_batch_size, progress=progress)
    t2 = time.perf_counter()
    labels = cluster_chunks(emb, clusters, kmeans_seed)
    t3 = time.perf_counter()

    members = [np.flatnonzero(labels == j) for j in range(clusters)]
    orders = [rng.permutation(m).tolist() for m in members]
    cursor = [0] * clusters
    token_cache: dict[int, list[int]] = {}
    reuse = False

    def next_chunk(j: int) -> int:
        nonlocal reuse
        if cursor[j] == len(orders[j]):  # cluster used up: reshuffle and allow repeats
            orders[j], cursor[j], reuse = rng.permutation(members[j]).tolist(), 0, True
        c = orders[j][cursor[j]]
        cursor[j] += 1
        return c

    rows, cids, sample_chunks = [], [], []
    for _ in range(int(samples_per_cluster)):
        for j in range(clusters):
            ids: list[int] = []
            used: list[int] = []
            empty_run = 0  # guards against a cluster whose chunks all tokenize to nothing
            while len(ids) < seqlen:
                c = next_chunk(j)
                if c not in token_cache:
                    token_cache[c] = _tokenize(tokenizer, [text[spans[c][0]:spans[c][1]]])[0]
                ids.extend(token_cache[c])
                used.append(c)
                empty_run = 0 if token_cache[c] else empty_run + 1
                if empty_run > len(members[j]):
                    raise ValueError(f"cluster {j} of calibration text{where} has no tokens")
            rows.append(torch.tensor(ids[:seqlen], dtype=torch.long))
            cids.append(j)
            sample_chunks.append(used)
    t4 = time.perf_counter()

    meta.update(
        clusters=int(clusters), samples_per_cluster=int(samples_per_cluster), n_samples=len(rows),
        chunk_sentences=int(chunk_sentences), n_chunks=len(spans),
        n_sentences=len(sents),
        embedder=describe_embedder(embedder), embed_dim=int(emb.shape[1]),
        embed_max_seq_length=getattr(model, "max_seq_length", None),
        kmeans_random_state=kmeans_seed, kmeans_n_init=10,
        cluster_sizes=[int(len(m)) for m in members], chunk_labels=labels.tolist(),
        sample_chunks=sample_chunks, chunk_reuse=reuse,
        chunk_char_spans={str(c): list(spans[c]) for c in sorted({c for u in sample_chunks for c in u})},
        timing_s={"load_embedder": round(t1 - t0, 3), "embed": round(t2 - t1, 3),
                  "kmeans": round(t3 - t2, 3), "sample": round(t4 - t3, 3)},
    )
    return CalibSet(torch.stack(rows), tuple(cids), meta)
