"""Block-prefix states of whole-model evaluators (width rates, one-shot levels): the LRU's bookkeeping, exact
losses against naive evaluation, token-layers from the first differing block, continuation of a candidate
from a lower stage's batches, replay, and the planner's simulation of the same bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest

from evoprune.fitness.block_prefix import BlockPrefix, auto_every

pytestmark = pytest.mark.usefixtures("one_thread")


def _keys(*blocks):
    return tuple(blocks)


def test_lookup_insert_cover_and_lineage():
    pre = BlockPrefix(4, max_bytes=160, entry_bytes=10)  # 16 entries: 4 candidates of 4
    assert pre.every == 1 and pre.positions(0) == [1, 2, 3, 4] and pre.positions(2) == [3, 4]
    a = _keys(1, 1, 1, 1)
    assert pre.lookup(a, [0, 1]) == (0, None, None)
    pre.insert(a, 0, [0], {j: {0: f"s{j}"} for j in range(1, 5)})  # scored on batch 0 only
    b = _keys(1, 1, 2, 1)
    start, key, states = pre.lookup(b, [0])
    assert (start, key, states) == (2, (2, (1, 1)), {0: "s2"})
    assert pre.lookup(b, [0, 1])[0] == 0  # batch 1 is not covered yet
    pre.insert(a, 0, [1], {j: {1: f"t{j}"} for j in range(1, 5)})  # the same prefix, the other batch
    assert pre.lookup(b, [0, 1]) == (2, (2, (1, 1)), {0: "s2", 1: "t2"})
    assert pre.lookup(a, [0, 1])[0] == 4  # equal in every block: the final-norm input
    pre.insert(b, 2, [0, 1], None)  # ghosts at 3, 4
    assert pre.lookup(b, [0, 1]) == (4, (4, (1, 1, 2, 1)), None)  # a ghost: the caller recomputes
    pre.fill((4, (1, 1, 2, 1)), {0: "g0", 1: "g1"})
    assert pre.lookup(b, [0, 1])[2] == {0: "g0", 1: "g1"}


def test_a_hit_keeps_its_lineage():
    pre = BlockPrefix(4, max_bytes=8, entry_bytes=1, every=1)  # 8 entries: two candidates' worth
    a, c = (1, 1, 1, 1), (2, 2, 2, 2)
    pre.insert(a, 0, [0], None)
    pre.insert(c, 0, [0], None)
    assert pre.lookup((1, 1, 1, 3), [0])[0] == 3  # refreshes a's entries at 1, 2 and 3, not at 4
    pre.insert((3, 3, 3, 3), 0, [0], None)  # evicts the four least recent: a's 4 and c's 1-3, not a's lineage
    assert pre.lookup(a, [0])[0] == 3 and pre.lookup((2, 2, 2, 9), [0])[0] == 0


def test_capacity_eviction_and_auto_every():
    assert auto_every(30, 868) == 1 and auto_every(30, 100) == 2 and auto_every(80, 3) is None
    assert auto_every(80, 7) == 41 and auto_every(80, 8) == 27 and auto_every(32, 12) == 9
    off = BlockPrefix(30, max_bytes=3, entry_bytes=1)  # fewer than 4 entries: off
    assert not off.active and off.lookup((0,) * 30, [0]) == (0, None, None)
    thin = BlockPrefix(6, max_bytes=12, entry_bytes=1)  # 12 entries: every 2nd position (3 per candidate)
    assert thin.every == 2 and thin.positions(0) == [2, 4, 6] and thin.positions(3) == [4, 6]
    thin.insert((0,) * 6, 0, [0], None)
    assert thin.lookup((0, 0, 0, 1, 0, 0), [0])[0] == 2  # 3 is not kept: the deepest kept position below it
    small = BlockPrefix(3, max_bytes=12, entry_bytes=1)  # 12 entries = 4 candidates of 3
    assert small.every == 1
    for c in range(5):
        small.insert((c, 0, 0), 0, [0], None)
    assert len(small.lru) == 12 and small.lookup((0, 0, 0), [0])[0] == 0  # the first candidate was evicted


def test_replayed_bookkeeping_equals_the_evaluated():
    rng = np.random.default_rng(0)
    cands = [tuple(int(x) for x in rng.integers(0, 2, 6)) for _ in range(40)]
    a, b = BlockPrefix(6, 40, 1), BlockPrefix(6, 40, 1)
    for c in cands:
        sa = a.lookup(c, [0])[0]
        a.insert(c, sa, [0], {j: {0: j} for j in range(1, 7)})
        sb = b.lookup(c, [0])[0]
        b.insert(c, sb, [0], None)
        assert sa == sb
    assert a.lru.keys() == b.lru.keys()


# -- evaluators ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def width_lm(tiny_dirs):
    from evoprune import load_model
    from evoprune.prune.importance import compute_importance
    from tests.conftest import random_calib

    lm = load_model(str(tiny_dirs["llama"]))
    return lm, compute_importance(lm, random_calib())[0]


RATES = [[0.3] * 6, [0.3, 0.3, 0.3, 0.5, 0.1, 0.3], [0.3, 0.3, 0.3, 0.5, 0.3, 0.1], [0.3, 0.0, 0.6, 0.3, 0.3, 0.3],
         [0.3] * 5 + [0.31], [0.3] * 6]


def test_width_prefix_is_exact_and_counts_the_blocks_run(width_lm):
    from evoprune.fitness.whole_model import WidthEvaluator
    from tests.conftest import random_calib

    lm, imp = width_lm
    calib = random_calib(n=3, seqlen=20, seed=3)
    naive = WidthEvaluator(lm, calib, imp)
    cached = WidthEvaluator(lm, calib, imp, cache_mb=1.0)
    starts = []
    for r in RATES[:-1]:
        a, b = naive.evaluate(r), cached.evaluate(r)
        assert b.loss == a.loss and b.batch_losses == a.batch_losses  # bit for bit on CPU
        assert a.token_layers == 60 * 6 and b.token_layers % 60 == 0
        starts.append(6 - b.token_layers // 60)
    # first differing block from the deepest cached candidate: 3, 4 (vs the 2nd), 1, 5 (0.31 keeps other channels)
    assert starts == [0, 3, 4, 1, 5]
    assert cached.spent_token_layers == 60 * (6 + 3 + 2 + 5 + 1)
    replay = WidthEvaluator(lm, calib, imp, cache_mb=1.0)
    assert [replay.replay(r) for r in RATES[:-1]] == [60 * (6 - s) for s in starts]
    assert replay.evaluate(RATES[1]).token_layers == 0  # a replayed ghost: recomputed, uncounted
    assert replay.evaluate(RATES[1]).loss == naive.evaluate(RATES[1]).loss


def test_width_continuation_from_leading_batches(width_lm):
    from evoprune.fitness.whole_model import WidthEvaluator, share_prefixes
    from tests.conftest import random_calib

    lm, imp = width_lm
    calib = random_calib(n=3, seqlen=20, seed=3)
    naive = WidthEvaluator(lm, calib, imp)
    first, cut, whole = (WidthEvaluator(lm, calib.slice(1, 20), imp), WidthEvaluator(lm, calib.slice(1, 10), imp),
                         WidthEvaluator(lm, calib, imp))
    assert whole.extends(first) == 1 and whole.extends(cut) is None and first.extends(whole) is None
    share_prefixes([cut, first, whole], 3.0)
    assert first.prefix is whole.prefix and cut.prefix is not whole.prefix
    assert whole.prefix.lru.capacity == int(2 * 2 ** 20 // whole._nll.lru_entry_bytes)
    for r in RATES[:3]:
        a = first.evaluate(r)
        b = whole.evaluate(r, done=a.batch_losses)
        want = naive.evaluate(r)
        assert b.loss == want.loss and b.batch_losses == want.batch_losses and b.tokens == want.tokens
        assert a.token_layers + b.token_layers <= want.token_layers
    # the third continued from block 4 of the second's states, on the two batches it had not scored
    assert b.token_layers == 2 * 20 * 2
    from evoprune.fitness.racing import Race

    worse = Race(((0.0, 0.0, 0.0),), whole.batch_tokens, rank=1, margin=0.05)
    c = whole.evaluate(RATES[3], race=worse, done=first.evaluate(RATES[3]).batch_losses)
    assert not c.complete and c.token_layers == 0 and len(c.batch_losses) == 1  # stopped before any batch


def test_levels_prefix_is_exact(tiny_dirs, tmp_path):
    from evoprune import load_model
    from evoprune.fitness.levels import LevelEvaluator
    from evoprune.models.slicing import width_spec
    from evoprune.prune.levels_db import AppliedLevels, LevelDatabase, level_ladders
    from evoprune.spaces import LevelSpace
    from tests.conftest import random_calib

    lm = load_model(str(tiny_dirs["opt"]))
    spec = width_spec(lm.model, lm.adapter)
    a, m = level_ladders(spec)
    db = LevelDatabase.build(lm, random_calib(), tmp_path / "db", attn_counts=a, mlp_counts=m)
    applied = AppliedLevels(lm, db)
    lw = spec.layers[0]
    space = LevelSpace(6, tuple(c * lw.group_params for c in a), tuple(c * lw.channel_params for c in m), 0.3,
                       spec.total)
    calib = random_calib(n=2, seqlen=16, seed=5)
    naive, cached = LevelEvaluator(applied, calib), LevelEvaluator(applied, calib, cache_mb=1.0)
    trained = LevelEvaluator(applied, calib, cache_mb=1.0, train_windows=random_calib(n=1, seqlen=16).input_ids)
    assert trained.prefix is None and trained.block_keys(space.uniform()) is None
    rng = np.random.default_rng(1)
    g, spent = space.uniform(), 0
    for _ in range(6):
        x, y = naive.evaluate(g), cached.evaluate(g)
        assert y.loss == x.loss
        spent += y.token_layers
        g = space.mutate(g, rng, 1)
    assert spent < 6 * 32 * 6 and cached.spent_token_layers == spent
    applied.restore()
