"""Sparse checkpoints of the dense prefix cache (--cache-every) and its placement (--cache-device)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evoprune import DropPattern, load_model
from evoprune.fitness import NLLEvaluator
from evoprune.fitness.checkpoints import HEADROOM, checkpoint, checkpoints, choose_every, fit_caches
from evoprune.spaces import SublayerPattern
from tests.conftest import FAMILIES, random_calib

pytestmark = pytest.mark.usefixtures("one_thread")

N = 6
PATTERNS = [(), (0,), (1,), (2,), (3,), (5,), (3, 4, 5), (1, 2, 3, 4, 5), (2, 4), (4, 5), (1, 3)]


def test_checkpoint_positions():
    assert checkpoints(6, 1) == (0, 1, 2, 3, 4, 5, 6)
    assert checkpoints(6, 4) == (0, 4, 6)
    assert checkpoints(12, 5) == (0, 5, 10, 12)
    assert [checkpoint(f, 6, 4) for f in range(7)] == [0, 0, 0, 0, 4, 4, 6]
    # 7 states of 100 bytes fit in 800 x HEADROOM; 4 (every 2) fit in 500 x HEADROOM; nothing fits in 100
    assert choose_every(6, [100], 1000) == 1
    assert choose_every(6, [60, 40], int(400 / HEADROOM) + 1) == 2
    assert choose_every(6, [100], 100) is None
    assert choose_every(6, [100], int(700 / HEADROOM), fixed=100) == 2  # the LRU's share counts too


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("every", [2, 4])
def test_sparse_checkpoints_equal_full_cache(tiny_dirs, family, every):
    """Every pattern's loss equals the full cache's (<= 1e-6 relative), the extra token-layers are exactly
    the recomputed dense blocks, the cache is smaller, BI is unchanged, and the LRU sees the same keys."""
    lm = load_model(str(tiny_dirs[family]))
    calib = random_calib()  # 3 x 24 tokens
    full = NLLEvaluator(lm, calib, batch_size=2, cache_mb=1.0)
    sparse = NLLEvaluator(lm, calib, batch_size=2, cache_mb=1.0, cache_every=every, cache_device="cpu")
    for d in PATTERNS + PATTERNS[::-1]:
        p = DropPattern(N, d)
        a, b = full.evaluate(p), sparse.evaluate(p)
        assert abs(b.loss - a.loss) <= 1e-6 * abs(a.loss), (d, a.loss, b.loss)
        f = d[0] if d else N
        hit = a.token_layers < calib.n_tokens * sum(1 for i in range(f, N) if i not in d)  # an LRU start
        extra = 0 if hit else calib.n_tokens * (f - checkpoint(f, N, every))
        assert b.token_layers == a.token_layers + extra, (d, a.token_layers, b.token_layers)
    assert full.lru.keys() == sparse.lru.keys() and full.lru.hits == sparse.lru.hits > 0
    assert sparse.cache_bytes == len(checkpoints(N, every)) * full.cache_bytes // (N + 1)
    assert sum(t is not None for t in sparse._cache[0]) == len(checkpoints(N, every))
    assert sparse.block_influence() == pytest.approx(full.block_influence(), rel=1e-6, abs=1e-9)
    # replay (resume, distributed drivers) predicts the same token-layers as evaluate
    replayed = NLLEvaluator(lm, calib, batch_size=2, cache_mb=1.0, cache_every=every)
    fresh = NLLEvaluator(lm, calib, batch_size=2, cache_mb=1.0, cache_every=every)
    for d in PATTERNS:
        assert replayed.replay(DropPattern(N, d)) == fresh.evaluate(DropPattern(N, d)).token_layers


def test_sparse_sublayer_checkpoints(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    calib = random_calib()
    full = NLLEvaluator(lm, calib, sublayers=True)
    sparse = NLLEvaluator(lm, calib, sublayers=True, cache_every=3)
    for a_, m_ in [((), ()), ((2,), ()), ((), (2,)), ((4,), (1, 5)), ((0,), ()), ((), (5,))]:
        p = SublayerPattern(N, a_, m_)
        a, b = full.evaluate(p), sparse.evaluate(p)
        assert abs(b.loss - a.loss) <= 1e-6 * abs(a.loss)
        u = p.first_unit if p.units else 2 * N
        extra = calib.n_tokens * sum(full.weights[v] for v in range(checkpoint(u, 2 * N, 3), u))
        assert abs(b.token_layers - (a.token_layers + extra)) <= 1  # each total is rounded to an integer


def _cmd(*args):
    return [sys.executable, "-m", "evoprune.cli", *args]


def test_fit_caches_and_recorded_lru(tmp_path):
    """A flexible LRU (--cache-mb auto) takes at most its cap of what the dense caches leave; a fixed one is
    counted first; a run's record fixes both, and a record without an LRU (written before the layer spaces
    had one by default) keeps none under auto."""
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.problems.prefix import _resolve

    assert fit_caches(6, [100], 1000, 10 ** 6, flexible=True) == (1, 100)  # 800 - 7 x 100
    assert fit_caches(6, [100], 1000, 50, flexible=True) == (1, 50)
    assert fit_caches(6, [100], 1000, 200) == (2, 200)  # 7 x 100 + 200 > 800; 4 x 100 + 200 fits
    assert fit_caches(6, [100], 1000, 10 ** 6, every=3, flexible=True) == (3, 500)
    assert fit_caches(6, [100], 1000, 10 ** 6, every=1, flexible=True) == (1, 100)
    assert fit_caches(6, [60, 40], 700, 10 ** 6, every=1, flexible=True) == (1, 0)  # none left
    assert fit_caches(6, [100], 100, 0, flexible=True) is None
    record = tmp_path / "cache.json"
    record.write_text(json.dumps({"cache_every": 2}))
    auto = SearchConfig.build(model="m", method="sleb", drop_count=2)
    fixed = SearchConfig.build(model="m", method="sleb", drop_count=2, cache_mb=256)
    assert _resolve(auto, None, [], record) == (2, 0.0) and _resolve(fixed, None, [], record) == (2, 256.0)
    record.write_text(json.dumps({"cache_every": 1, "lru_mb": 12.5}))
    assert _resolve(auto, None, [], record) == (1, 12.5)


def test_auto_cache_every_from_free_memory(tiny_dirs, calib_text, tmp_path):
    """With too little memory for the full cache, auto picks the smallest J that fits, records it, and the
    run's losses equal a full-cache run's while its token-layers are the recomputed ones more. The default
    LRU (``--cache-mb auto``) takes at most 1024 MiB of what the dense caches leave: same losses, fewer
    token-layers, recorded for resume."""
    base = ["search", "--model", str(tiny_dirs["llama"]), "--method", "sleb", "--drop-count", "2", "--calib",
            f"text:{calib_text}", "--sampling", "random", "--nsamples", "3", "--seqlen", "32", "--seed", "1"]
    env = {**os.environ, "EVOPRUNE_NO_PROGRESS": "1"}
    full, sparse, auto = tmp_path / "full", tmp_path / "sparse", tmp_path / "auto"
    subprocess.run(_cmd(*base, "--cache-mb", "0", "--out", str(full)), env=env, check=True, capture_output=True,
                   timeout=300)
    entry = json.loads((full / "cache.json").read_text())["entry_bytes"][0]
    assert json.loads((full / "cache.json").read_text())["cache_every"] == 1
    assert json.loads((full / "cache.json").read_text())["lru_mb"] == 0
    # room for 4 states (every 2: 0, 2, 4, final) but not 7
    mb = 4.5 * entry / HEADROOM / 2 ** 20
    r = subprocess.run(_cmd(*base, "--cache-mb", "0", "--out", str(sparse)),
                       env={**env, "EVOPRUNE_CACHE_MEMORY_MB": str(mb)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((sparse / "cache.json").read_text())["cache_every"] == 2
    rows_f = [json.loads(line) for line in (full / "history.jsonl").read_text().splitlines()]
    rows_s = [json.loads(line) for line in (sparse / "history.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rows_f] == [r["dropped"] for r in rows_s]
    n_tok = 3 * 32
    for a, b in zip(rows_f, rows_s):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])
        f = a["dropped"][0]
        assert b["eval_token_layers"] - a["eval_token_layers"] == n_tok * (f - checkpoint(f, N, 2))
    # the default LRU: room for the 7 dense states and 20.5 entries -> every 1, an LRU of 20.5 entries
    r = subprocess.run(_cmd(*base, "--out", str(auto)),
                       env={**env, "EVOPRUNE_CACHE_MEMORY_MB": str(27.5 * entry / HEADROOM / 2 ** 20)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rec = json.loads((auto / "cache.json").read_text())
    assert rec["cache_every"] == 1 and abs(rec["lru_mb"] * 2 ** 20 - 20.5 * entry) <= 1
    rows_a = [json.loads(line) for line in (auto / "history.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rows_a] == [r["dropped"] for r in rows_f]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]) for a, b in zip(rows_f, rows_a))
    assert all(b["eval_token_layers"] <= a["eval_token_layers"] for a, b in zip(rows_f, rows_a))
    assert rows_a[-1]["token_layers"] < rows_f[-1]["token_layers"]
    # nothing fits: one clear line, exit 2
    r = subprocess.run(_cmd(*base, "--out", str(tmp_path / "none")), env={**env, "EVOPRUNE_CACHE_MEMORY_MB": "0.0001"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().startswith("evoprune: error: the dense hidden-state caches")
    r = subprocess.run(_cmd(*base, "--cache-every", "0", "--out", str(tmp_path / "bad")), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--cache-every" in r.stderr and not (tmp_path / "bad").exists()
