"""Fitness evaluation (naive vs prefix-cached NLL, token-layer accounting) and Block Influence."""
from __future__ import annotations

import random

import pytest
import torch

from evoprune import DropPattern, load_model, perplexity
from evoprune.errors import UserError
from evoprune.fitness import NLLEvaluator
from evoprune.fitness import dense_states
from evoprune.prune.block_influence import block_influence as bi_of_states
from tests.conftest import FAMILIES, TINY_VOCAB, random_calib

N = 6  # tiny models have 6 blocks
# nothing dropped, first/last block, all trailing blocks, all but one, both ends, interior
EDGE_PATTERNS = [(), (0,), (5,), (3, 4, 5), (1, 2, 3, 4, 5), (0, 1, 2, 3, 4), (0, 5), (2, 4)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_patterns(count: int, seed: int) -> list[DropPattern]:
    rng = random.Random(seed)
    return [DropPattern(N, tuple(rng.sample(range(N), rng.randint(1, N - 1)))) for _ in range(count)]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _n_hooks(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_equals_naive(tiny_dirs, family):
    """Same loss (<= 1e-6 relative) on edge and random patterns; batch size 2 leaves a ragged last batch."""
    lm = load_model(str(tiny_dirs[family]))
    calib = random_calib()
    naive = NLLEvaluator(lm, calib, batch_size=2, prefix_cache=False)
    cached = NLLEvaluator(lm, calib, batch_size=2, prefix_cache=True)
    patterns = [DropPattern(N, d) for d in EDGE_PATTERNS] + _random_patterns(10, seed=FAMILIES.index(family))
    losses = set()
    for p in patterns:
        a, b = naive.evaluate(p), cached.evaluate(p)
        assert _rel(b.loss, a.loss) <= 1e-6, (p, a, b)
        assert a.tokens == b.tokens == 3 * 23
        assert a.token_layers == 3 * 24 * len(p.kept)
        assert b.token_layers == 3 * 24 * sum(1 for i in p.kept if i >= p.first_dropped)
        losses.add(round(a.loss, 9))
    assert len(losses) > len(patterns) // 2  # the patterns really are different models


def test_token_layers_exact(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    calib = random_calib()  # 3 x 24 = 72 tokens
    naive = NLLEvaluator(lm, calib, prefix_cache=False)
    cached = NLLEvaluator(lm, calib, prefix_cache=True)
    assert naive.dense_token_layers == cached.dense_token_layers == 72 * 6
    assert cached.setup_token_layers == 0  # lazy: nothing spent yet
    expect = {  # dropped: (naive, cached)
        (): (6 * 72, 0),
        (0,): (5 * 72, 5 * 72),
        (5,): (5 * 72, 0),
        (2, 4): (4 * 72, 2 * 72),
        (1, 3): (4 * 72, 3 * 72),
        (3, 4, 5): (3 * 72, 0),
        (0, 1, 2, 3, 4): (72, 72),
    }
    for dropped, (tn, tc) in expect.items():
        assert naive.evaluate(DropPattern(N, dropped)).token_layers == tn
        assert cached.evaluate(DropPattern(N, dropped)).token_layers == tc
    assert cached.setup_token_layers == 6 * 72
    assert naive.setup_token_layers == 0
    assert cached.n_evaluations == naive.n_evaluations == len(expect)
    assert naive.spent_token_layers == sum(t for t, _ in expect.values())
    assert cached.spent_token_layers == 6 * 72 + sum(t for _, t in expect.values())


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_token_layers_match_blocks_run(tiny_dirs, prefix_cache):
    """The reported cost is what ran: count real block calls with hooks."""
    lm = load_model(str(tiny_dirs["qwen2"]))
    calib = random_calib()
    ev = NLLEvaluator(lm, calib, batch_size=2, prefix_cache=prefix_cache)
    ev.prepare()
    calls = [0] * N

    def counter(i):
        def hook(module, args):
            calls[i] += args[0].shape[0] * args[0].shape[1]  # tokens in this call

        return hook

    handles = [b.register_forward_pre_hook(counter(i)) for i, b in enumerate(lm.adapter.get_blocks(lm.model))]
    try:
        for p in [DropPattern(N, d) for d in EDGE_PATTERNS] + _random_patterns(5, seed=7):
            calls[:] = [0] * N
            res = ev.evaluate(p)
            start = p.first_dropped if prefix_cache else 0
            assert calls == [72 if (i in p.kept and i >= start) else 0 for i in range(N)], p
            assert sum(calls) == res.token_layers
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
@pytest.mark.parametrize("prefix_cache", [False, True])
def test_dense_equals_perplexity(tiny_dirs, family, prefix_cache):
    lm = load_model(str(tiny_dirs[family]))
    calib = random_calib(n=2, seqlen=32)
    ev = NLLEvaluator(lm, calib, prefix_cache=prefix_cache)
    got = ev.evaluate(DropPattern(N))
    ref = perplexity(lm.model, ids=calib.input_ids.reshape(-1), seqlen=32, progress=False)
    assert _rel(got.loss, ref.nll) <= 1e-6
    assert got.tokens == ref.tokens == 2 * 31


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_model_restored_after_evaluation(tiny_dirs, family):
    lm = load_model(str(tiny_dirs[family]))
    model, adapter = lm.model, lm.adapter
    ids = random_calib().input_ids
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    blocks = adapter.get_blocks(model)
    ev = NLLEvaluator(lm, random_calib(), prefix_cache=True)
    for d in EDGE_PATTERNS:
        ev.evaluate(DropPattern(N, d))
    assert adapter.get_blocks(model) is blocks and len(blocks) == N
    assert model.config.num_hidden_layers == N
    assert _n_hooks(model) == 0
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)

    # a failure mid-evaluation still restores the model and removes the hook
    def boom(block, batch_index):
        raise RuntimeError("boom")

    ev._hidden_at = boom
    for d in [(2, 4), (3, 4, 5)]:  # hook on a block / on the final norm
        with pytest.raises(RuntimeError, match="boom"):
            ev.evaluate(DropPattern(N, d))
        assert adapter.get_blocks(model) is blocks
        assert model.config.num_hidden_layers == N
        assert _n_hooks(model) == 0


def test_cache_is_what_feeds_the_blocks(tiny_dirs):
    """Negative control: corrupting the cached state changes the loss, so the hook really replaces the input."""
    lm = load_model(str(tiny_dirs["mistral"]))
    ev = NLLEvaluator(lm, random_calib(), prefix_cache=True)
    p = DropPattern(N, (2, 4))
    good = ev.evaluate(p).loss
    orig = ev._hidden_at
    ev._hidden_at = lambda f, b: orig(f, b) * 0.5
    assert _rel(ev.evaluate(p).loss, good) > 1e-3
    ev._hidden_at = orig
    assert ev.evaluate(p).loss == good  # the cache itself was not modified


def test_bad_inputs(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    ev = NLLEvaluator(lm, random_calib())
    with pytest.raises(UserError):
        ev.evaluate(DropPattern(8, (1,)))
    with pytest.raises(ValueError):
        NLLEvaluator(lm, random_calib(seqlen=1))
    with pytest.raises(ValueError):
        NLLEvaluator(lm, random_calib(), batch_size=0)


def _make_identity(lm, i: int) -> None:
    """Zero the residual-writing projections of block ``i`` so that it returns its input unchanged."""
    block = lm.adapter.get_blocks(lm.model)[i]
    mods = [lm.adapter.attention(block).get_submodule(lm.adapter.o),
            lm.adapter.mlp_module(block).get_submodule(lm.adapter.mlp_out)]
    with torch.no_grad():
        for m in mods:
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()


def block_influence(lm, calib, batch_size=1):
    """Block Influence from one streamed dense forward, and that forward's token-layers."""
    return bi_of_states(b.states for b in dense_states(lm, calib, batch_size)), calib.n_tokens * lm.n_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_block_influence(tiny_dirs, family):
    lm = load_model(str(tiny_dirs[family]))
    calib = random_calib(n=3, seqlen=24)
    scores, tl = block_influence(lm, calib)
    assert len(scores) == N and tl == 72 * N
    assert all(0.0 <= s <= 2.0 for s in scores)
    assert min(scores) > 1e-4  # random blocks all change the residual stream
    batched, _ = block_influence(lm, calib, batch_size=2)
    assert batched == pytest.approx(scores, abs=1e-6)

    _make_identity(lm, 3)
    scores, _ = block_influence(lm, calib)
    assert scores[3] == pytest.approx(0.0, abs=1e-6)
    assert min(range(N), key=scores.__getitem__) == 3
    assert sorted(scores)[1] > 1e-4


# -- shared-prefix LRU and KL fitness -------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES[:2])
def test_lru_prefix_cache_equals_naive(tiny_dirs, family):
    """With the LRU, losses equal naive (<= 1e-6 rel) and a shared kept prefix is not recomputed."""
    lm = load_model(str(tiny_dirs[family]))
    calib = random_calib()
    naive = NLLEvaluator(lm, calib, batch_size=2, prefix_cache=False)
    lru = NLLEvaluator(lm, calib, batch_size=2, prefix_cache=True, cache_mb=1.0)
    entry = 3 * 24 * lm.model.config.hidden_size * 4
    assert lru.lru.capacity == 2 ** 20 // entry
    # (0, 3) then (0, 4): (0, 4) shares blocks 1..3 after the first dropped block; resumes at block 4
    ev = lru.evaluate(DropPattern(N, (0, 3)))
    assert ev.token_layers == 72 * 4  # blocks 1, 2, 4, 5
    ev2 = lru.evaluate(DropPattern(N, (0, 4)))
    # the state entering block 4 under drop {0, 3} is the state entering position 3 under drop {0}: run 3, 5
    assert ev2.token_layers == 72 * 2
    assert _rel(ev2.loss, naive.evaluate(DropPattern(N, (0, 4))).loss) <= 1e-6
    ev3 = lru.evaluate(DropPattern(N, (1, 5)))  # different prefix below 2: starts at its first dropped block
    assert ev3.token_layers == 72 * 3
    for p in [DropPattern(N, d) for d in EDGE_PATTERNS] + _random_patterns(20, seed=7):
        a, b = naive.evaluate(p), lru.evaluate(p)
        assert _rel(b.loss, a.loss) <= 1e-6, (p, a, b)
        assert b.token_layers <= 72 * sum(1 for i in p.kept if i >= p.first_dropped)
    assert lru.lru.hits > 5


def test_lru_bounded_and_replay_matches(tiny_dirs):
    """Capacity is respected; replaying the bookkeeping gives the same later costs and losses (resume)."""
    lm = load_model(str(tiny_dirs["llama"]))
    calib = random_calib()
    entry = 3 * 24 * lm.model.config.hidden_size * 4
    pats = _random_patterns(30, seed=3)
    a = NLLEvaluator(lm, calib, prefix_cache=True, cache_mb=3 * entry / 2 ** 20)
    assert a.lru.capacity == 3
    ref = [a.evaluate(p) for p in pats]
    assert len(a.lru) <= 3
    b = NLLEvaluator(lm, calib, prefix_cache=True, cache_mb=3 * entry / 2 ** 20)
    for p in pats[:17]:
        b.replay(p)
    a2 = NLLEvaluator(lm, calib, prefix_cache=True, cache_mb=3 * entry / 2 ** 20)
    for p in pats[:17]:
        a2.evaluate(p)
    assert b.lru.keys() == a2.lru.keys()
    rest = [b.evaluate(p) for p in pats[17:]]
    assert [e.token_layers for e in rest] == [e.token_layers for e in ref[17:]]
    assert all(_rel(x.loss, y.loss) <= 1e-6 for x, y in zip(rest, ref[17:]))
    assert sum(e.token_layers for e in ref) < sum(72 * sum(1 for i in p.kept if i >= p.first_dropped) for p in pats)


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_kl_fitness(tiny_dirs, prefix_cache):
    """KL of the dense pattern is 0; KL >= 0; top-k KL is a close lower bound of the full KL."""
    lm = load_model(str(tiny_dirs["llama"]))
    calib = random_calib()
    full = NLLEvaluator(lm, calib, batch_size=2, prefix_cache=prefix_cache, metric="kl")
    top = NLLEvaluator(lm, calib, batch_size=2, prefix_cache=prefix_cache, metric="kl", kl_topk=TINY_VOCAB // 4)
    assert abs(full.evaluate(DropPattern(N, ())).loss) <= 1e-6
    assert abs(top.evaluate(DropPattern(N, ())).loss) <= 1e-6
    assert full.setup_token_layers == 72 * N
    top2 = NLLEvaluator(lm, calib, batch_size=2, prefix_cache=prefix_cache, metric="kl", kl_topk=TINY_VOCAB - 8)
    for p in _random_patterns(6, seed=11):
        a, b, b2 = full.evaluate(p).loss, top.evaluate(p).loss, top2.evaluate(p).loss
        # coarse-graining: a finer partition (larger k) gives a larger KL, never above the full KL
        assert 0 < b <= b2 + 1e-9 and b2 <= a + 1e-9 and b2 >= 0.97 * a, (p, a, b, b2)
    with pytest.raises(ValueError):
        NLLEvaluator(lm, calib, metric="ce")
    # the full KL matches a direct computation from two forwards
    p = DropPattern(N, (1, 4))
    from evoprune.models.loading import LoadedModel  # noqa: F401
    with torch.no_grad():
        dense = torch.log_softmax(lm.model(input_ids=calib.input_ids).logits[:, :-1].float(), -1)
        with lm.adapter.dropped(lm.model, p):
            cand = torch.log_softmax(lm.model(input_ids=calib.input_ids).logits[:, :-1].float(), -1)
    want = float((dense.exp() * (dense - cand)).sum(-1).mean())
    assert _rel(full.evaluate(p).loss, want) <= 1e-5


def test_block_influence_from_cache_matches(tiny_dirs):
    """The evaluator's BI (from its cached dense states, no extra forward) equals prune.block_influence."""
    lm = load_model(str(tiny_dirs["llama"]))
    calib = random_calib()
    ev = NLLEvaluator(lm, calib, batch_size=2)
    want, _ = block_influence(lm, calib, batch_size=2)
    got = ev.block_influence()
    assert ev.setup_token_layers == 72 * N
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-12
