"""Shared fixtures: tiny random models of every family, a tiny tokenizer, the real SmolLM2."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("EVOPRUNE_NO_PROGRESS", "1")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "opt"]
TINY_VOCAB = 320


def tiny_config(family: str, n_layers: int = 6):
    """A small random config of ``family`` (no download): hidden 64, 4 heads, GQA 2 where the family has it."""
    import transformers as tf

    common = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                  max_position_embeddings=256, tie_word_embeddings=False)
    gqa = dict(num_key_value_heads=2, intermediate_size=96)
    if family == "llama":
        return tf.LlamaConfig(**common, **gqa)
    if family == "mistral":
        return tf.MistralConfig(**common, **gqa, sliding_window=24)
    if family == "qwen2":
        # mixed layer_types (full / sliding) exercises per-layer config lists
        return tf.Qwen2Config(**common, **gqa, use_sliding_window=True, sliding_window=12, max_window_layers=3)
    if family == "qwen3":
        return tf.Qwen3Config(**common, **gqa, head_dim=16)
    if family == "gemma3_text":
        types = ["sliding_attention" if i % 3 != 2 else "full_attention" for i in range(n_layers)]
        return tf.Gemma3TextConfig(**common, **gqa, head_dim=16, sliding_window=12, layer_types=types)
    if family == "opt":
        return tf.OPTConfig(**{k: v for k, v in common.items() if k != "tie_word_embeddings"}, ffn_dim=96,
                            word_embed_proj_dim=64, do_layer_norm_before=True)
    raise KeyError(family)


def make_tiny_tokenizer():
    """A byte-level BPE tokenizer with ``TINY_VOCAB`` entries, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog. " * 4] * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def make_tiny_model_dir(path: Path, family: str, n_layers: int = 6, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, n_layers))
    model.save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


def random_calib(n: int = 3, seqlen: int = 24, seed: int = 0):
    """A calibration set of ``n`` x ``seqlen`` uniformly random token ids (for tiny models)."""
    import torch

    from evoprune.data.calibration import CalibSet

    ids = torch.randint(0, TINY_VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return CalibSet(input_ids=ids, cluster_ids=(-1,) * n, meta={})


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: tiny models gain nothing from intra-op threads, and when other
    processes share the 2 CPUs, spinning worker threads make such tests ~10x slower. Restored afterwards."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """family -> directory of a saved tiny random model with a tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model_dir(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M-Instruct (de-quantized once into the evoprune cache)."""
    from evoprune import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return p


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """A 12-block tiny llama: C(12, 4) = 495 patterns, so a GA run has enough distinct evaluations to kill."""
    from tests.conftest import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("deep") / "llama12", "llama", n_layers=12)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    words = "alpha beta gamma delta epsilon the quick brown fox jumps over lazy dog".split()
    import random as _r  # test data only

    g = _r.Random(0)
    p.write_text(" ".join(g.choice(words) for _ in range(3000)))
    return p
