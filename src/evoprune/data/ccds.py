"""CCDS, EvoP's cluster-based calibration data sampling (Algorithm 4.1; ``--sampling ccds``).

Owns :func:`ccds` and its text pieces :func:`split_sentences`, :func:`make_chunks` and
:func:`cluster_chunks`. All randomness comes from the caller's ``numpy.random.Generator``; the encoder
is loaded by :mod:`evoprune.data.embed`. Token ids are produced with ``add_special_tokens=False``.
"""
from __future__ import annotations

import re
import time
import warnings
from typing import Any

import numpy as np
import torch

from .calibration import CalibSet, base_meta, check_positive, tokenize_texts

__all__ = ["ccds", "cluster_chunks", "make_chunks", "split_sentences"]


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
    check_positive(chunk_sentences=chunk_sentences)
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

    check_positive(clusters=clusters, samples_per_cluster=samples_per_cluster, seqlen=seqlen,
                    chunk_sentences=chunk_sentences)
    where = f" {source!r}" if source else ""
    if not text or not text.strip():
        raise ValueError(f"calibration text{where} is empty")
    meta = base_meta("ccds", text, tokenizer, seqlen, rng, source)
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

    rows, cids, sample_chunks, reuse = _draw_samples(text, tokenizer, spans, labels, clusters, samples_per_cluster,
                                                     seqlen, rng, where)
    t4 = time.perf_counter()

    meta.update(
        clusters=int(clusters), samples_per_cluster=int(samples_per_cluster), n_samples=len(rows),
        chunk_sentences=int(chunk_sentences), n_chunks=len(spans),
        n_sentences=len(sents),
        embedder=describe_embedder(embedder), embed_dim=int(emb.shape[1]),
        embed_max_seq_length=getattr(model, "max_seq_length", None),
        kmeans_random_state=kmeans_seed, kmeans_n_init=10,
        cluster_sizes=[int((labels == j).sum()) for j in range(clusters)], chunk_labels=labels.tolist(),
        sample_chunks=sample_chunks, chunk_reuse=reuse,
        chunk_char_spans={str(c): list(spans[c]) for c in sorted({c for u in sample_chunks for c in u})},
        timing_s={"load_embedder": round(t1 - t0, 3), "embed": round(t2 - t1, 3),
                  "kmeans": round(t3 - t2, 3), "sample": round(t4 - t3, 3)},
    )
    return CalibSet(torch.stack(rows), tuple(cids), meta)


def _draw_samples(text: str, tokenizer: Any, spans, labels: np.ndarray, clusters: int, samples_per_cluster: int,
                  seqlen: int, rng: np.random.Generator, where: str):
    """Step 4 of :func:`ccds`: ``(rows, cluster ids, chunks per sample, chunk reuse)``, samples round-robin."""
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
                    token_cache[c] = tokenize_texts(tokenizer, [text[spans[c][0]:spans[c][1]]])[0]
                ids.extend(token_cache[c])
                used.append(c)
                empty_run = 0 if token_cache[c] else empty_run + 1
                if empty_run > len(members[j]):
                    raise ValueError(f"cluster {j} of calibration text{where} has no tokens")
            rows.append(torch.tensor(ids[:seqlen], dtype=torch.long))
            cids.append(j)
            sample_chunks.append(used)
    return rows, cids, sample_chunks, reuse
