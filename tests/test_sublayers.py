"""The sub-layer space: genome and budgets, the adapters' scoped skip, and the cached evaluator, on every family."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evoprune import load_model
from evoprune.errors import UserError
from evoprune.spaces import GenomeError, SearchError, SublayerPattern, SublayerSpace
from tests.conftest import FAMILIES, TINY_VOCAB, random_calib

# -- the pure space --------------------------------------------------------------------------------


def test_pattern_key_units_and_invariants():
    p = SublayerPattern(6, (4, 1), (1, 5))
    assert p.attention == (1, 4) and p.mlp == (1, 5) and p.units == (2, 3, 8, 11) and p.blocks == (1,)
    assert p.key == "S6:a1,4:m1,5" and SublayerPattern.from_key(p.key) == p and p.k == 4 and p.first_unit == 2
    assert SublayerPattern.from_units(6, p.units) == p and hash(p) == hash(SublayerPattern(6, (1, 4), (5, 1)))
    for bad in [dict(attention=(6,)), dict(mlp=(1, 1)), dict(attention=tuple(range(6)), mlp=tuple(range(6)))]:
        with pytest.raises(GenomeError):
            SublayerPattern(6, **bad)
    with pytest.raises(GenomeError):
        SublayerPattern.from_key("L6:d1")


def test_parameter_budget_is_within_half_the_smallest_unit():
    sp = SublayerSpace(4, (1,) * 4, (3,) * 4, sparsity=0.25)  # total 16: remove 4 +- 0.5
    pats = list(sp.enumerate())
    assert len(pats) == sp.size() == 17  # 4 attentions (1); 1 mlp + 1 attention (4 x 4); 
    assert all(sp.removed(p.units) == 4 and sp.feasible(p) for p in pats)
    rng = np.random.default_rng(0)
    seen = {sp.sample(rng).key for _ in range(300)}
    assert seen == {p.key for p in pats}  # the sampler reaches every feasible pattern
    assert sp.cost(pats[0]) == pytest.approx(0.75)
    odd = SublayerSpace(3, (2, 2, 2), (5, 5, 5), sparsity=0.3)  # 0.3 * 21 = 6.3 +- 1: {2+2+2, 5}... -> 6 or 7
    assert {odd.removed(p.units) for p in odd.enumerate()} <= {6, 7} and odd.size() == sum(1 for _ in odd.enumerate())
    with pytest.raises(SearchError, match="no sub-layer pattern removes"):
        SublayerSpace(2, (1, 1), (10, 10), sparsity=0.3)  # 6.6 +- 0.5 is unreachable
    with pytest.raises(SearchError, match="exactly one"):
        SublayerSpace(2, (1, 1), (3, 3))
    with pytest.raises(SearchError, match="sparsity must be in"):
        SublayerSpace(2, (1, 1), (3, 3), sparsity=1.0)


def test_count_budget_and_protected_blocks():
    sp = SublayerSpace(5, (1,) * 5, (3,) * 5, k=3, protected=(0, 4))
    assert sp.droppable == (2, 3, 4, 5, 6, 7) and sp.size() == 20 == len(list(sp.enumerate()))
    rng = np.random.default_rng(1)
    assert all(sp.feasible(sp.sample(rng)) for _ in range(50))
    assert not sp.feasible(SublayerPattern(5, (0, 1, 2)))
    with pytest.raises(SearchError, match="cannot drop 6 sub-layers"):
        SublayerSpace(5, (1,) * 5, (3,) * 5, k=6, protected=(0, 4))


# -- the adapters' skip -----------------------------------------------------------------------------

def _ids(n=40, seed=1):
    return torch.randint(0, TINY_VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def _reference_logits(lm, ids, attention, mlp):
    """The same skips applied by hand: forward hooks that zero the removed sub-layers' outputs (the modules
    still run), on the unmodified model."""
    ad, hooks = lm.adapter, []
    blocks = ad.get_blocks(lm.model)
    zero_first = lambda m, a, out: (torch.zeros_like(out[0]), *out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)  # noqa: E731
    for i in attention:
        hooks.append(ad.attention(blocks[i]).register_forward_hook(zero_first))
    for i in mlp:
        mod = ad.mlp_module(blocks[i]) if ad.mlp else blocks[i].get_submodule(ad.mlp_out)
        hooks.append(mod.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
    try:
        with torch.no_grad():
            return lm.model(input_ids=ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_matches_a_hand_made_reference_and_the_kv_cache(tiny_dirs, family):
    lm = load_model(str(tiny_dirs[family]))
    ids = _ids()
    dense = lm.model(input_ids=ids, use_cache=False).logits.detach()
    ptrs = {n: p.data_ptr() for n, p in lm.model.named_parameters()}
    attention, mlp = (1, 2, 4), (2, 3)  # block 2 whole, 1 and 4 attention-free, 3 MLP-free
    want = _reference_logits(lm, ids, attention, mlp)
    with torch.no_grad(), lm.adapter.skipped(lm.model, attention, mlp) as p:
        assert p.blocks == (2,) and lm.adapter.n_layers(lm.model) == 5 and lm.model.config.num_hidden_layers == 5
        got = lm.model(input_ids=ids, use_cache=False).logits
        full = got
        out = lm.model(input_ids=ids[:, :-1], use_cache=True)
        step = lm.model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    assert (got - want).abs().max() <= 1e-5
    assert (step[:, -1] - full[:, -1]).abs().max() < 1e-4  # the cache stays consistent
    assert (got - dense).abs().max() > 1e-3  # the skips change the function
    # everything restored, zero-copy
    assert lm.adapter.n_layers(lm.model) == 6 and lm.model.config.num_hidden_layers == 6
    assert {n: p.data_ptr() for n, p in lm.model.named_parameters()} == ptrs
    assert torch.equal(lm.model(input_ids=ids, use_cache=False).logits, dense)
    with pytest.raises(UserError, match="out of range"):
        with lm.adapter.skipped(lm.model, (6,), ()):
            pass


def test_post_layernorm_opt_is_refused(tiny_dirs):
    lm = load_model(str(tiny_dirs["opt"]))
    lm.model.config.do_layer_norm_before = False
    try:
        with pytest.raises(UserError, match="do_layer_norm_before"):
            with lm.adapter.skipped(lm.model, (1,), ()):
                pass
        with lm.adapter.skipped(lm.model, (1,), (1,)):  # whole blocks are fine
            pass
    finally:
        lm.model.config.do_layer_norm_before = True


# -- the cached evaluator -------------------------------------------------------------------------

PATTERNS = [((), (0,)), ((0,), ()), ((3,), (3,)), ((1, 4), (2,)), ((5,), (0, 5)), ((2, 3, 4), (1, 2, 3))]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_sublayer_evaluation_equals_naive(tiny_dirs, family):
    from evoprune.fitness import NLLEvaluator

    lm = load_model(str(tiny_dirs[family]))
    calib = random_calib()
    naive = NLLEvaluator(lm, calib, prefix_cache=False, sublayers=True)
    cached = NLLEvaluator(lm, calib, sublayers=True)
    lru = NLLEvaluator(lm, calib, sublayers=True, cache_mb=1.0)
    kl = NLLEvaluator(lm, calib, sublayers=True, metric="kl", cache_mb=1.0)
    kl_naive = NLLEvaluator(lm, calib, sublayers=True, metric="kl", prefix_cache=False)
    n_tok = calib.n_tokens
    for a, m in PATTERNS + PATTERNS[::-1]:
        p = SublayerPattern(6, a, m)
        want = _reference_nll(lm, calib, a, m)
        e0, e1, e2 = naive.evaluate(p), cached.evaluate(p), lru.evaluate(p)
        for e in (e0, e1, e2):
            assert abs(e.loss - want) <= 1e-6 * abs(want), (p, e.loss, want)
        assert abs(kl.evaluate(p).loss - kl_naive.evaluate(p).loss) <= 1e-6 * max(1e-3, kl_naive.evaluate(p).loss)
        w = cached.weights
        assert e0.token_layers == round(n_tok * sum(w[u] for u in range(12) if u not in p.units))
        assert e1.token_layers == round(n_tok * sum(w[u] for u in range(p.first_unit, 12) if u not in p.units))
        assert e2.token_layers <= e1.token_layers
    assert lru.lru.hits > 0 and sum(lru.weights[:2]) == pytest.approx(1.0)
    assert cached.setup_token_layers == n_tok * 6
    # a pattern of whole blocks scores as the block space scores the same drop (the spaces nest)
    from evoprune.spaces import DropPattern

    blocks = NLLEvaluator(lm, calib)
    for drop in ((3,), (1, 2, 4)):
        e_sub, e_blk = cached.evaluate(SublayerPattern(6, drop, drop)), blocks.evaluate(DropPattern(6, drop))
        assert abs(e_sub.loss - e_blk.loss) <= 1e-6 * abs(e_blk.loss) and e_sub.token_layers == e_blk.token_layers


@torch.no_grad()
def _reference_nll(lm, calib, attention, mlp):
    from evoprune.evaluate.perplexity import window_nll

    total = 0.0
    for s in range(calib.n_samples):
        ids = calib.input_ids[s:s + 1]
        total += float(window_nll(_reference_logits(lm, ids, attention, mlp), ids).sum())
    return total / (calib.n_samples * (calib.seqlen - 1))


def test_sublayer_block_influence_and_errors(tiny_dirs):
    from evoprune.fitness import NLLEvaluator
    from evoprune.spaces import DropPattern

    lm = load_model(str(tiny_dirs["llama"]))
    ev = NLLEvaluator(lm, random_calib(), sublayers=True)
    bi = ev.block_influence()
    assert len(bi) == 12 and all(0 <= x <= 2 for x in bi)
    with pytest.raises(UserError, match="not a sub-layer pattern"):
        ev.evaluate(DropPattern(6, (1,)))
