"""Structured width pruning: Wanda-sp importance, plans, masking == slicing, evaluator, export round trip."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from evoprune import DropPattern, load_model
from evoprune.data.calibration import CalibSet
from evoprune.errors import UserError
from evoprune.export import export_width
from evoprune.fitness import NLLEvaluator
from evoprune.fitness.whole_model import WidthEvaluator
from evoprune.models.loading import LoadedModel
from evoprune.models.slicing import WIDTH_KEY, apply_width_inplace, width_masked, width_sliced, width_spec
from evoprune.prune.importance import WidthImportance, compute_importance
from evoprune.prune.width_plan import allocate, plan_widths
from tests.conftest import TINY_VOCAB, random_calib

# every edge in one vector: intact block, all groups + channels gone, rounding cases
RATES = [0.0, 0.3, 0.5, 1.0, 0.7, 0.2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lms(tiny_dirs):
    """family -> (LoadedModel, wanda_sp importance) for the families the tests slice."""
    out = {}
    for fam in ("llama", "qwen2", "qwen3", "gemma3_text", "opt"):
        lm = load_model(str(tiny_dirs[fam]))
        out[fam] = (lm, compute_importance(lm, random_calib())[0])
    return out


def _ids(n=40, seed=1):
    return torch.randint(0, TINY_VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- structures, importance, plans -------------------------------------------------

def test_spec_counts_every_prunable_parameter(lms):
    for fam, (lm, _) in lms.items():
        spec = width_spec(lm.model)
        block = lm.adapter.get_blocks(lm.model)[0]
        norms = sum(p.numel() for n, p in block.named_parameters() if "norm" in n)
        assert spec.layers[0].total == sum(p.numel() for p in block.parameters()) - norms, fam
    opt_spec = width_spec(lms["opt"][0].model)  # MHA: a group is one head (16 dims); biases count
    opt = opt_spec.layers[0]
    assert (opt.groups, opt_spec.heads_per_group, opt_spec.head_dim) == (4, 1, 16)
    assert opt.group_params == 3 * 16 * (64 + 1) + 64 * 16 and opt.channel_params == 64 + 1 + 64
    assert opt.fixed_params == 2 * 64  # out_proj and fc2 biases stay
    llama = width_spec(lms["llama"][0].model)
    assert (llama.layers[0].groups, llama.heads_per_group, llama.head_dim) == (2, 2, 16)


@torch.no_grad()
def test_wanda_sp_all_scores_match_definition(lms):
    """``wanda_sp_all`` from independently captured activations: sum |W| * ||X_col||_2 over every weight of a structure.

    (The published ``wanda_sp`` reads only o_proj/down_proj; ``tests/test_importance.py`` holds it.)
    """
    lm, _ = lms["llama"]
    calib = random_calib()
    imp, _ = compute_importance(lm, calib, metric="wanda_sp_all")
    block = lm.adapter.get_blocks(lm.model)[2]
    attn, mlp = block.self_attn, block.mlp
    sq = {}

    def grab(key):
        def hook(mod, args):
            sq[key] = sq.get(key, 0) + args[0].double().pow(2).sum((0, 1))
        return hook

    hs = [m.register_forward_pre_hook(grab(k)) for k, m in
          (("x", attn.k_proj), ("o", attn.o_proj), ("m", mlp.up_proj), ("d", mlp.down_proj))]
    for s in range(calib.n_samples):  # batch size 1, as compute_importance's default
        lm.model(input_ids=calib.input_ids[s:s + 1])
    for h in hs:
        h.remove()
    n = {k: v.sqrt() for k, v in sq.items()}
    roles = {"q": (attn.q_proj, "x"), "k": (attn.k_proj, "x"), "v": (attn.v_proj, "x"), "o": (attn.o_proj, "o"),
             "g": (mlp.gate_proj, "m"), "u": (mlp.up_proj, "m"), "d": (mlp.down_proj, "d")}
    S = {name: lin.weight.double().abs() * n[key][None, :] for name, (lin, key) in roles.items()}
    hd, hpg = 16, 2
    for g in range(2):  # group g = kv head g + query heads 2g, 2g+1
        q_rows = slice(g * hpg * hd, (g + 1) * hpg * hd)
        want = (S["q"][q_rows].sum() + S["k"][g * hd:(g + 1) * hd].sum() + S["v"][g * hd:(g + 1) * hd].sum()
                + S["o"][:, q_rows].sum())
        assert float(imp.group_scores[2][g]) == pytest.approx(float(want), rel=1e-5)
    want_c = S["g"].sum(1) + S["u"].sum(1) + S["d"].sum(0)
    assert torch.allclose(imp.channel_scores[2], want_c, rtol=1e-5)
    allS = torch.cat([s.reshape(-1) for s in S.values()])
    assert imp.outlier_ratio[2] == pytest.approx(float((allS > 5 * allS.mean()).double().mean()), abs=1e-4)
    assert imp.token_layers == calib.n_tokens * 6 and imp.metric == "wanda_sp_all"
    mag, tl = compute_importance(lm, None, metric="magnitude")
    assert tl == 0 and float(mag.group_scores[2][1]) == pytest.approx(float(
        attn.q_proj.weight[32:].abs().sum() + attn.k_proj.weight[16:].abs().sum()
        + attn.v_proj.weight[16:].abs().sum() + attn.o_proj.weight[:, 32:].abs().sum()), rel=1e-5)


def test_importance_save_load(lms, tmp_path):
    _, imp = lms["qwen2"]
    imp.save(tmp_path / "importance.pt")
    back = WidthImportance.load(tmp_path / "importance.pt")
    assert back.metric == imp.metric and back.outlier_ratio == imp.outlier_ratio
    assert back.token_layers == imp.token_layers and back.outlier_m == 5.0
    assert all(torch.equal(a, b) for a, b in zip(back.group_scores + back.channel_scores,
                                                   imp.group_scores + imp.channel_scores))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a valid"):
        WidthImportance.load(tmp_path / "bad.pt")


def test_plan_allocation_and_ranking(lms):
    lm, imp = lms["qwen2"]
    spec = width_spec(lm.model)
    plan = plan_widths(lm, imp, RATES)
    assert plan_widths(spec, imp, RATES) == plan  # deterministic, spec or model
    for i, (lw, p) in enumerate(zip(spec.layers, RATES)):
        g, c = allocate(lw, p)
        assert g == int(p * lw.groups + 0.5)  # halves round up: 0.5 * 2 groups -> 1, 0.3 * 2 -> 1
        assert len(plan.kept_groups[i]) == lw.groups - g and len(plan.kept_channels[i]) == lw.channels - c
        removed = g * lw.group_params + c * lw.channel_params
        if 0 < c < lw.channels:  # the channel count makes the removed params closest to p * total
            assert abs(removed - p * lw.total) <= lw.channel_params / 2
        assert plan.layer_rates[i] == pytest.approx(removed / lw.total)
        # the removed structures are the least important ones
        dropped_g = set(range(lw.groups)) - set(plan.kept_groups[i])
        if dropped_g and plan.kept_groups[i]:
            assert max(imp.group_scores[i][list(dropped_g)]) <= min(imp.group_scores[i][list(plan.kept_groups[i])])
        assert list(plan.kept_channels[i]) == sorted(plan.kept_channels[i])
    assert plan.kept_groups[0] == (0, 1) and len(plan.kept_channels[0]) == 96  # p = 0: intact
    assert plan.kept_groups[3] == () and plan.kept_channels[3] == ()  # p = 1: everything gone
    assert plan.params_total == spec.total
    assert plan.params_kept == pytest.approx(spec.total - sum(r * lw.total for r, lw in zip(plan.layer_rates,
                                                                                            spec.layers)))
    assert plan.sparsity == pytest.approx(sum(RATES) / 6, abs=0.01)
    for bad in ([0.1] * 5, [0.1] * 5 + [1.5], [float("nan")] * 6):
        with pytest.raises(UserError):
            plan_widths(lm, imp, bad)
    with pytest.raises(UserError, match="different shape"):
        plan_widths(lms["opt"][0], imp, RATES)


# -- masking == slicing ------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3_text", "opt"])
def test_masked_equals_sliced(lms, family):
    lm, imp = lms[family]
    ids = _ids()
    dense, before = _logits(lm.model, ids), _state(lm.model)
    plan = plan_widths(lm, imp, RATES)
    with width_masked(lm.model, plan):
        masked = _logits(lm.model, ids)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit for bit
    sliced_model = copy.deepcopy(lm.model)
    width = apply_width_inplace(sliced_model, plan)
    assert sliced_model.config.evoprune_width == width and width["num_kv_groups"] == [len(g) for g in plan.kept_groups]
    assert sum(p.numel() for p in sliced_model.parameters()) == (
        sum(p.numel() for p in lm.model.parameters()) - plan.params_total + plan.params_kept)
    assert (_logits(sliced_model, ids) - masked).abs().max() <= 1e-5
    assert not torch.allclose(masked, dense)
    zero = plan_widths(lm, imp, [0.0] * 6)  # nothing removed: exactly the dense model
    with width_masked(lm.model, zero):
        assert torch.equal(_logits(lm.model, ids), dense)
    with width_sliced(lm.model, zero):
        assert torch.equal(_logits(lm.model, ids), dense)


@torch.no_grad()
def test_removed_structures_do_not_contribute(lms):
    """GQA mapping: with group 1 removed, its q rows (query heads 2, 3), k/v rows (kv head 1) and the
    removed channels' gate/up rows are dead weight; a kept group's rows are not."""
    lm, imp = lms["llama"]
    ids = _ids(20)
    keep_all_c = tuple(range(96))
    plan = plan_widths(lm, imp, [0.0] * 6)
    plan = type(plan)(plan.rates, ((0,),) + plan.kept_groups[1:], (keep_all_c[48:],) + plan.kept_channels[1:],
                      plan.layer_rates, plan.params_kept, plan.params_total)
    block = lm.adapter.get_blocks(lm.model)[0]
    with width_masked(lm.model, plan):
        base = _logits(lm.model, ids)
    attn, mlp = block.self_attn, block.mlp
    for lin, rows, dead in ((attn.q_proj, slice(32, 64), True), (attn.k_proj, slice(16, 32), True),
                            (attn.v_proj, slice(16, 32), True), (mlp.gate_proj, slice(0, 48), True),
                            (mlp.up_proj, slice(0, 48), True), (attn.q_proj, slice(0, 32), False),
                            (attn.v_proj, slice(0, 16), False), (mlp.up_proj, slice(48, 96), False)):
        orig = lin.weight[rows].clone()
        lin.weight[rows] += 1.0
        try:
            with width_masked(lm.model, plan):
                moved = (_logits(lm.model, ids) - base).abs().max()
        finally:
            lin.weight[rows] = orig
        assert (moved == 0) if dead else (moved > 1e-3)


def test_mask_and_slice_restore_on_error(lms):
    lm, imp = lms["opt"]
    before, modules = _state(lm.model), [id(m) for m in lm.model.modules()]
    plan = plan_widths(lm, imp, RATES)
    for scope in (width_masked, width_sliced):
        with pytest.raises(RuntimeError, match="boom"):
            with scope(lm.model, plan):
                raise RuntimeError("boom")
    assert [id(m) for m in lm.model.modules()] == modules and not hasattr(lm.model.config, WIDTH_KEY)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    bad = type(plan)(plan.rates, plan.kept_groups[:5], plan.kept_channels[:5], plan.layer_rates, 0, 1)
    with pytest.raises(UserError, match="the model has 6"):
        with width_masked(lm.model, bad):
            pass


@pytest.mark.parametrize("family", ["llama", "opt"])
@torch.no_grad()
def test_kv_cache_with_an_empty_attention(lms, family):
    """Block 0 without attention groups still advances the KV cache: incremental decoding == full forward."""
    lm, imp = lms[family]
    model = copy.deepcopy(lm.model)
    apply_width_inplace(model, plan_widths(lm, imp, [1.0, 0.3, 0.5, 1.0, 0.7, 0.2]))
    ids = _ids(20)
    full = model(input_ids=ids, use_cache=False).logits
    out = model(input_ids=ids[:, :-2], use_cache=True)
    pkv = out.past_key_values
    for t in (18, 19):
        out = model(input_ids=ids[:, t:t + 1], past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        assert (out.logits[:, -1] - full[:, t]).abs().max() < 1e-4
    assert pkv.get_seq_length() == 20


# -- evaluator ----------------------------------------------------------------------

def test_evaluator_loss_is_the_sliced_models(lms):
    lm, imp = lms["qwen2"]
    calib = random_calib(n=2, seqlen=20, seed=3)
    ev = WidthEvaluator(lm, calib, imp)
    res = ev.evaluate(RATES)
    sliced = copy.deepcopy(lm.model)
    apply_width_inplace(sliced, ev.plan(RATES))
    want = NLLEvaluator(LoadedModel(sliced, None, lm.adapter, "s", "s"), calib, prefix_cache=False).evaluate(
        DropPattern(6))
    assert res.loss == pytest.approx(want.loss, rel=1e-6)
    assert res.tokens == 2 * 19 and res.token_layers == calib.n_tokens * 6
    assert ev.n_evaluations == 1 and ev.spent_token_layers == calib.n_tokens * 6
    ev.replay(RATES)  # resume bookkeeping: nothing to do
    dense = NLLEvaluator(lm, calib, prefix_cache=False).evaluate(DropPattern(6)).loss
    assert ev.evaluate([0.0] * 6).loss == dense and res.loss > dense
    kl = WidthEvaluator(lm, calib, imp, metric="kl")
    assert kl.evaluate([0.0] * 6).loss == pytest.approx(0.0, abs=1e-6)  # targets from the unmasked model
    assert kl.evaluate(RATES).loss > 0.01


# -- export -------------------------------------------------------------------------

def test_export_round_trip_without_evoprune(lms, tmp_path):
    """Llama (GQA), Qwen2 (q/k/v biases), Qwen3 (q/k norms), Gemma-3, OPT (MHA, biases) reload with plain
    transformers + trust_remote_code, in a fresh interpreter, and reproduce the masked model."""
    ids = _ids(40)  # longer than the sliding windows of the tiny configs
    torch.save(ids, tmp_path / "ids.pt")
    dirs = {}
    for fam, (lm, imp) in lms.items():
        plan = plan_widths(lm, imp, RATES)
        with width_masked(lm.model, plan):
            torch.save(_logits(lm.model, ids), tmp_path / f"want-{fam}.pt")
        out = tmp_path / f"exp-{fam}"
        rec = export_width(lm, plan, out)
        assert rec["max_abs_diff"] <= 1e-5 and rec["masked_max_abs_diff"] <= 1e-5
        assert rec["params"] == rec["params_dense"] - plan.params_total + plan.params_kept
        cfg = json.loads((out / "config.json").read_text())
        w = cfg["evoprune_width"]
        assert cfg["model_type"] == lm.model.config.model_type and w["base_architecture"] == type(lm.model).__name__
        assert w["num_kv_groups"] == [len(g) for g in plan.kept_groups] == w["num_key_value_heads"]
        assert w["intermediate_sizes"] == [len(c) for c in plan.kept_channels]
        assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        assert (out / "modeling_evoprune_width.py").is_file() and (out / "tokenizer.json").is_file()
        pr = json.loads((out / "pruning.json").read_text())
        assert pr["rates"] == RATES and pr["block_params_kept"] == plan.params_kept
        dirs[fam] = str(out)
    code = (
        "import sys, json, torch; from transformers import AutoModelForCausalLM\n"
        f"dirs = json.loads({json.dumps(json.dumps(dirs))}); ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "for fam, d in dirs.items():\n"
        "    m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()\n"
        "    with torch.no_grad(): torch.save(m(input_ids=ids, use_cache=False).logits, d + '/got.pt')\n"
        "assert 'evoprune' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    for fam, d in dirs.items():
        got, want = torch.load(f"{d}/got.pt"), torch.load(tmp_path / f"want-{fam}.pt")
        assert (got - want).abs().max() <= 1e-5, fam


def test_export_refuses_bad_input(lms, tmp_path):
    lm, imp = lms["llama"]
    plan = plan_widths(lm, imp, RATES)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_width(lm, plan, tmp_path / "full")
    with pytest.raises(UserError):
        export_width(lms["opt"][0], plan, tmp_path / "o")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written


# -- the real model ----------------------------------------------------------------

@pytest.mark.slow
@torch.no_grad()
def test_smollm2_width(smollm2):
    """SmolLM2-135M (3 KV groups of 3 heads, 1536 channels): a 30% plan, masked vs sliced, restore."""
    lm = smollm2
    ids = torch.randint(0, lm.model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    imp, tl = compute_importance(lm, CalibSet(ids, (-1,)))
    assert tl == 64 * 30 and len(imp.group_scores[0]) == 3 and len(imp.channel_scores[0]) == 1536
    assert all(0 < r < 0.1 for r in imp.outlier_ratio)
    plan = plan_widths(lm, imp, [0.3] * 30)
    assert {len(g) for g in plan.kept_groups} == {2} and plan.sparsity == pytest.approx(0.3, abs=1e-3)
    dense = _logits(lm.model, ids[:, :32])
    with width_masked(lm.model, plan):
        masked = _logits(lm.model, ids[:, :32])
    with width_sliced(lm.model, plan):
        sliced = _logits(lm.model, ids[:, :32])
    # fp32 sums of different widths: ~1e-3 on logits of magnitude ~40 (0 in float64)
    assert (masked - sliced).abs().max() <= 1e-3 * masked.abs().max()
    assert torch.equal(_logits(lm.model, ids[:, :32]), dense)
