"""Racing (issue 16): a raced evaluation stops only when clearly worse, a finished one equals naive,
partial cost and LRU bookkeeping are exact, and a default evo run (auto stages, racing, default
budget) logs exact full-fidelity scores and resumes after kill -9 to the same history."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from evoprune import DropPattern, load_model
from evoprune.fitness import NLLEvaluator
from evoprune.fitness.racing import Race
from evoprune.runner.problems.common import auto_first_stage
from evoprune.search.layers.evo import greedy_reference
from tests.conftest import random_calib
from tests.test_run import _cmd, _env, _history, _kill_resume

pytestmark = pytest.mark.usefixtures("one_thread")
N = 6


def test_race_rule():
    r = Race(refs=((10.0, 10.0, 10.0), (12.0, 12.0, 12.0)), batch_tokens=(10, 10, 10), rank=1, margin=0.1)
    # behind the better reference by more than 0.1 nats x the 20 tokens still to come
    assert not r.stop(1, 11.9) and r.stop(1, 12.1)
    assert not r.stop(2, 20.9) and r.stop(2, 21.1)  # 10 tokens to come
    assert not r.stop(3, 100.0)  # never after the last batch
    two = Race(refs=r.refs, batch_tokens=r.batch_tokens, rank=2, margin=0.1)
    assert not two.stop(1, 13.0) and not two.stop(2, 24.9) and two.stop(2, 25.1)  # must trail both
    assert not Race(refs=(), batch_tokens=(10, 10)).active
    with pytest.raises(ValueError):
        Race(refs=((1.0,),), batch_tokens=(10, 10))


def test_raced_evaluation_exact(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    calib = random_calib()  # 3 x 24 tokens: 3 batches of 23 predicted tokens
    naive = NLLEvaluator(lm, calib, prefix_cache=False)
    ev = NLLEvaluator(lm, calib, prefix_cache=True, cache_mb=1.0)
    pats = [DropPattern(N, (i,)) for i in range(N)] + [DropPattern(N, (i, j)) for i in range(N) for j in range(i + 1, N)]
    by_first = sorted(pats, key=lambda p: naive.evaluate(p).batch_losses[0])
    good, other, bad = by_first[0], by_first[1], by_first[-1]
    ref = ev.evaluate(good)
    assert len(ref.batch_losses) == 3 and ref.complete
    assert abs(sum(ref.batch_losses) / ref.tokens - ref.loss) <= 1e-12
    b_naive = naive.evaluate(bad)
    margin = 0.5 * (b_naive.batch_losses[0] - ref.batch_losses[0]) / (2 * 23)  # stops after batch 1 of 3
    assert margin > 0
    n_lru = len(ev.lru)
    raced = ev.evaluate(bad, race=Race((ref.batch_losses,), ev.batch_tokens, 1, margin))
    assert not raced.complete and len(raced.batch_losses) == 1
    assert raced.tokens == 23  # one batch of 24 input tokens x the blocks it runs from its first dropped one
    assert raced.token_layers == 24 * sum(1 for i in range(bad.dropped[0], N) if i not in bad.dropped)
    assert abs(raced.batch_losses[0] - b_naive.batch_losses[0]) <= 1e-6 * abs(b_naive.batch_losses[0])
    assert len(ev.lru) == n_lru  # a partial evaluation enters nothing
    keys_after_race = ev.lru.keys()
    # a race it does not lose (its first batch beats the reference's): finishes, equal to naive
    o_naive = naive.evaluate(other)
    race = Race((o_naive.batch_losses,), ev.batch_tokens, 1, margin)
    assert not race.stop(1, o_naive.batch_losses[0]) and not race.stop(2, sum(o_naive.batch_losses[:2]))
    done = ev.evaluate(other, race=race)
    assert done.complete and abs(done.loss - o_naive.loss) <= 1e-6 * done.loss
    # replay of the partial evaluation: same cost, same (absent) LRU entries
    again = NLLEvaluator(lm, calib, prefix_cache=True, cache_mb=1.0)
    assert again.replay(good) == ref.token_layers
    assert again.replay(bad, batches=1) == raced.token_layers
    assert again.lru.keys() == keys_after_race


def test_greedy_screen_and_raced_promotion():
    """Greedy steps after the first score the better half of the previous step's stage-0 ranking plus the
    neighbours of dropped blocks; promotions: the stage-0 best alone, then the others raced against it."""
    import numpy as np

    from evoprune.search import make_strategy
    from evoprune.spaces import LayerDropSpace

    space = LayerDropSpace(14, 3)
    s = make_strategy("evo", space, np.random.default_rng(0), generations=2, offspring=8, survivors=(4, 2))
    f0 = lambda p: float(sum(p.dropped)) + 0.1 * len(p.dropped)  # noqa: E731 (low blocks are cheapest)
    reqs = s.ask()
    assert len(reqs) == 14 and {r.stage for r in reqs} == {0}
    s.tell(reqs, [f0(r.pattern) for r in reqs])
    first = s.ask()  # the stage-0 best (block 0) alone, unraced
    assert [r.dropped for r in first] == [(0,)] and first[0].stage == 1 and not first[0].refs
    s.tell(first, [1.0])
    rest = s.ask()  # the next three, raced against it
    assert [r.dropped for r in rest] == [(1,), (2,), (3,)]
    assert all(r.refs == ("L14:d0",) and r.rank == 1 and r.margin == 0.05 for r in rest)
    s.tell(rest, [2.0, float("inf"), 0.5])  # block 3 wins at full fidelity; block 2 was raced out
    step2 = s.ask()
    # the shortlist: the best 7 of the 14 single blocks at stage 0 (0..6), plus the neighbours of block 3
    # (2, 4), minus 3 itself
    assert sorted(next(b for b in r.dropped if b != 3) for r in step2) == [0, 1, 2, 4, 5, 6]
    assert s.shortlist == [0, 1, 2, 3, 4, 5, 6] and s.screen == [0, 1, 2, 4, 5, 6]
    s.tell(step2, [f0(r.pattern) for r in step2])
    s.tell(s.ask(), [1.0])  # the stage-0 best, (0, 3), wins at full fidelity
    s.tell(s.ask(), [2.0, 3.0, 4.0])
    step3 = s.ask()  # the greedy moves on when asked
    # the third step adds from the same shortlist, plus the neighbours of 0 and 3 (1, 2, 4), minus 0 and 3
    assert s.greedy == [0, 3] and s.screen == [1, 2, 4, 5, 6] and len(step3) == 5


def test_default_budget_follows_the_first_stage():
    """0.135 x the naive greedy pass when stage 0 is 1/8 of the set (or one stage); more when it is a larger share."""
    from evoprune.search import make_strategy
    from evoprune.spaces import LayerDropSpace

    ev = make_strategy("evo", LayerDropSpace(30, 6), np.random.default_rng(0))
    ref = greedy_reference(30, 30, 6, 2048)
    assert ev.default_budget((256, 2048)) == int(0.135 * ref)  # 4 x 512: the calibrated point
    assert ev.default_budget((128, 2048)) == int(0.135 * ref)  # a smaller first stage never shrinks it
    assert ev.default_budget((2048,)) == int(0.135 * ref)
    small = greedy_reference(30, 30, 6, 256)
    assert ev.default_budget((64, 256)) == int(0.135 * 2 * small)  # 2 x 128: 64 tokens = 1/4 of the set


def test_greedy_reference():
    # step 0: 4 patterns x 4 blocks, step 1: 3 x 3; 10 tokens
    assert greedy_reference(5, 4, 2, 10) == 10 * (4 * 4 + 3 * 3)


# the tiny random model's candidates are near-ties: a small margin makes racing stop some of them, and a
# larger budget share leaves room for evolution after the greedy phase (its promotions dominate at 12 blocks);
# the first stage (64 of 192 tokens) scales it by 8 x 1/3
_DEFAULT_ARGS = ["--offspring", "8", "--cache-mb", "1", "--generations", "6", "--race-margin", "0.002",
                 "--budget-share", "0.1875"]


def _default_evo(deep_model, calib_text, out):
    return ["search", "--model", str(deep_model), "--method", "evo", "--drop-count", "4", "--calib",
            f"text:{calib_text}", "--sampling", "random", "--nsamples", "4", "--seqlen", "48", "--seed", "3",
            "--out", str(out), *_DEFAULT_ARGS]


@pytest.mark.parametrize("kill_after", [[9], [20, 41]])
def test_default_evo_exact_and_resumable(deep_model, calib_text, tmp_path, kill_after):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(*_default_evo(deep_model, calib_text, ref)), env=_env(), check=True, capture_output=True,
                   timeout=300)
    a = json.loads((ref / "result.json").read_text())
    rows = [json.loads(x) for x in _history(ref).splitlines()]
    cfg = json.loads((ref / "config.json").read_text())
    assert cfg["method_options"]["tokens_per_stage"] == "auto" and cfg["method_options"]["survivors"] == [6, 2]
    # auto stages: 1/8 of 4 x 48 tokens, at least 64: the first 2 samples x 32 tokens, then the whole set
    assert auto_first_stage(4, 48) == (2, 32) and auto_first_stage(4, 512) == (1, 256)
    assert {r["tokens"] for r in rows if r["stage"] == 0} == {2 * 31}
    assert a["budget_token_layers"] == int(0.1875 * (8 * 64 / (4 * 48)) * greedy_reference(12, 12, 4, 4 * 48))
    full = [r for r in rows if r["stage"] == 1]
    raced = [r for r in full if r.get("raced")]
    done = [r for r in full if not r.get("raced")]
    assert raced and done, "the run should race some candidates and finish others"
    assert all(r["tokens"] < 4 * 47 and r["eval_token_layers"] < 4 * 48 * 12 for r in raced)
    assert a["calib_loss"] == min(r["loss"] for r in done)
    # every fully evaluated candidate's logged score equals a naive evaluation of it
    from evoprune.data.calibration import CalibSet

    lm = load_model(str(deep_model))
    naive = NLLEvaluator(lm, CalibSet.load(ref / "calib.pt"), prefix_cache=False)
    for r in done[:: max(1, len(done) // 8)]:
        x = naive.evaluate(DropPattern(12, tuple(r["dropped"]))).loss
        assert abs(x - r["loss"]) <= 1e-6 * abs(x), r
    run = tmp_path / "killed"
    args = _default_evo(deep_model, calib_text, run)
    _kill_resume(args, run, kill_after)
    b = json.loads((run / "result.json").read_text())
    for key in ("dropped_layers", "calib_loss", "evaluations", "token_layers"):
        assert a[key] == b[key], key
    assert _history(ref) == _history(run)


def _raced_rows(run):
    rows = [json.loads(x) for x in _history(run).splitlines()]
    return rows, [r for r in rows if r.get("raced")], [r for r in rows if not r.get("raced")]


def test_width_racing_exact_and_resumable(tiny_dirs, calib_text, tmp_path):
    """Width evo races its children against the population: raced rows are partial (one batch of two),
    finished ones score as an unraced evaluation, and kill -9 + resume gives the same history."""
    from tests.test_width_search import _width_args

    model = tiny_dirs["llama"]
    ref = tmp_path / "ref"
    args = _width_args(model, calib_text, ref, "evo", ["--race-margin", "0.0005", "--generations", "5",
                                                       "--tokens-per-stage", "none", "--cache-mb", "0"])
    subprocess.run(_cmd(*args), env=_env(), check=True, capture_output=True, timeout=300)
    a = json.loads((ref / "result.json").read_text())
    rows, raced, done = _raced_rows(ref)
    assert raced and done and all(r["generation"] >= 1 for r in raced)
    assert all(r["tokens"] == 31 and r["eval_token_layers"] == 32 * 6 for r in raced)  # 1 of 2 windows, 6 blocks
    assert a["calib_loss"] == min(r["loss"] for r in done if r.get("origin") != "probe")  # probes: measurements
    assert a["token_layers"] < rows[0]["token_layers"] + (len(rows) - 1) * 64 * 6  # cheaper than unraced
    from evoprune.data.calibration import CalibSet
    from evoprune.fitness.whole_model import WidthEvaluator
    from evoprune.prune.importance import WidthImportance
    from evoprune.prune.reconstruct import Reconstruction

    lm, calib = load_model(str(model)), CalibSet.load(ref / "calib.pt")
    ev = WidthEvaluator(lm, calib, WidthImportance.load(ref / "importance.pt"), recon=Reconstruction(lm, calib))
    for r in done[:: max(1, len(done) // 5)]:
        assert ev.evaluate(r["rates"]).loss == pytest.approx(r["loss"], rel=1e-6)
    run = tmp_path / "killed"
    _kill_resume(_width_args(model, calib_text, run, "evo", ["--race-margin", "0.0005", "--generations", "5",
                                                             "--tokens-per-stage", "none", "--cache-mb", "0"]), run, [9])
    assert _history(ref) == _history(run)
    assert json.loads((run / "result.json").read_text())["token_layers"] == a["token_layers"]


def test_darwinlm_auto_stages_and_racing_resumable(tiny_dirs, calib_text, tmp_path, monkeypatch):
    """One-shot darwinlm with auto stages and racing on the last stage: kill -9 + resume ==
    uninterrupted; the result is the best complete last-stage score."""
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))

    def args(out):
        return ["search", "--model", str(tiny_dirs["llama"]), "--space", "levels", "--method", "darwinlm",
                "--sparsity", "0.3", "--calib", f"text:{calib_text}", "--sampling", "random", "--nsamples", "3",
                "--seqlen", "48", "--seed", "2", "--offspring", "4", "--generations", "5", "--training-aware", "off",
                "--tokens-per-stage", "auto", "--race-margin", "0.0005", "--out", str(out)]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(*args(ref)), env=_env(), check=True, capture_output=True, timeout=300)
    a = json.loads((ref / "result.json").read_text())
    rows, raced, done = _raced_rows(ref)
    assert {r["stage"] for r in rows} == {0, 1}  # auto: 64 of 144 tokens (2 x 32), then all
    assert {r["tokens"] for r in done if r["stage"] == 0} == {2 * 31}
    assert a["calib_loss"] == min(r["loss"] for r in done if r["stage"] == 1)
    run = tmp_path / "killed"
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache2"))  # builds its own database, as ref did
    _kill_resume(args(run), run, [6])
    assert _history(ref) == _history(run)


def test_width_defaults_cached_staged_raced_exact_and_resumable(tiny_dirs, calib_text, tmp_path):
    """Width evo with today's defaults (sensitivity rounds, a screening stage, racing, the block-prefix
    cache): every complete score equals a naive evaluation on its slice (no cache, no continuation), some
    candidates start from a cached prefix (fewer token-layers than a full forward), and kill -9 + resume
    (mid-round and mid-evolution) gives the same history and result."""
    from evoprune.data.calibration import CalibSet
    from evoprune.fitness.whole_model import WidthEvaluator
    from evoprune.prune.importance import WidthImportance
    from evoprune.prune.reconstruct import Reconstruction

    model = tiny_dirs["llama"]

    def args(out):
        return ["search", "--model", str(model), "--space", "width", "--method", "evo", "--sparsity", "0.4",
                "--calib", f"text:{calib_text}", "--sampling", "random", "--nsamples", "3", "--seqlen", "48",
                "--seed", "1", "--generations", "3", "--race-margin", "0.0005", "--out", str(out)]
    ref = tmp_path / "ref"
    subprocess.run(_cmd(*args(ref)), env=_env(), check=True, capture_output=True, timeout=300)
    a = json.loads((ref / "result.json").read_text())
    rows = [json.loads(x) for x in _history(ref).splitlines()]
    assert {r["stage"] for r in rows} == {0, 1} and any(r.get("origin") == "probe" for r in rows)
    full_cost = {0: 2 * 32 * 6, 1: 3 * 48 * 6}  # window tokens x 6 blocks: a full forward
    assert any(r["eval_token_layers"] < full_cost[r["stage"]] and not r.get("raced") for r in rows)  # prefix reuse
    done = [r for r in rows if not r.get("raced")]
    assert a["calib_loss"] == min(r["loss"] for r in done if r["stage"] == 1)
    lm = load_model(str(model))
    calib = CalibSet.load(ref / "calib.pt")
    imp = WidthImportance.load(ref / "importance.pt")
    recon = Reconstruction(lm, calib)  # the run's: Hessians of the whole calibration set
    naive = {1: WidthEvaluator(lm, calib, imp, recon=recon), 0: WidthEvaluator(lm, calib.slice(2, 32), imp, recon=recon)}
    for r in done[:: max(1, len(done) // 12)]:
        x = naive[r["stage"]].evaluate(r["rates"]).loss
        assert abs(x - r["loss"]) <= 1e-6 * abs(x), r
    run = tmp_path / "killed"
    _kill_resume(args(run), run, [5, 20])
    assert _history(ref) == _history(run)
    b = json.loads((run / "result.json").read_text())
    for key in ("rates", "calib_loss", "evaluations", "token_layers"):
        assert a[key] == b[key], key
