"""Width-pruning importance against its definitions: the published Wanda-sp, LLM-Pruner's Taylor, OWL."""
from __future__ import annotations

import pytest
import torch

from evoprune import load_model
from evoprune.models.slicing import width_linears, width_spec
from evoprune.prune.importance import compute_importance
from tests.conftest import random_calib


@pytest.fixture(scope="module")
def lm(tiny_dirs):
    return load_model(str(tiny_dirs["llama"]))


def _input_norms(lm, calib, role):
    """||X_c||_2 over every calibration token of the input of projection ``role`` in every block (by hand)."""
    acc = {}
    handles = []
    for i, block in enumerate(lm.adapter.get_blocks(lm.model)):
        lin = width_linears(lm.adapter, block)[role]

        def hook(module, args, out, i=i):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            acc[i] = acc.get(i, 0) + x.pow(2).sum(0)

        handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        lm.model(input_ids=calib.input_ids, use_cache=False)
    for h in handles:
        h.remove()
    return [acc[i].sqrt() for i in range(len(acc))]


def test_wanda_sp_is_the_published_metric(lm):
    """An et al. (FLAP's prune_wanda_sp): S = |W| * ||X||_2 of the o / down projections, averaged over output
    rows; a group sums its query heads' o columns, a channel is its down column. Fails on the all-weights score."""
    calib = random_calib(n=3, seqlen=24)
    imp, tl = compute_importance(lm, calib, metric="wanda_sp")
    spec = width_spec(lm.model, lm.adapter)
    o_norms, d_norms = _input_norms(lm, calib, "o"), _input_norms(lm, calib, "mlp_out")
    for i, block in enumerate(lm.adapter.get_blocks(lm.model)):
        lin = width_linears(lm.adapter, block)
        s_o = (lin["o"].weight.detach().double().abs() * o_norms[i][None, :]).mean(0)
        want_groups = s_o.reshape(spec.layers[i].groups, -1).sum(1)
        want_channels = (lin["mlp_out"].weight.detach().double().abs() * d_norms[i][None, :]).mean(0)
        assert torch.allclose(imp.group_scores[i], want_groups, rtol=1e-6, atol=0)
        assert torch.allclose(imp.channel_scores[i], want_channels, rtol=1e-6, atol=0)
    assert tl == calib.n_tokens * spec.n_layers
    old, _ = compute_importance(lm, calib, metric="wanda_sp_all")  # the earlier definition scores more weights
    assert not torch.allclose(old.channel_scores[0], imp.channel_scores[0])


def test_taylor_is_llm_pruners_vector_wise_first_order(lm):
    """LLM-Pruner's TaylorImportance(taylor="vectorize", group_reduction="sum"), by hand: the salience
    W * dL/dW of the mean NLL; each neuron (q/k/v/gate/up row, o/down column) scores |its salience summed|;
    a structure sums its neurons. The model is left as it was (weights, no gradients)."""
    calib = random_calib(n=2, seqlen=16)
    model = lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    imp, tl = compute_importance(lm, calib, metric="taylor")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and [p.requires_grad for p in model.parameters()] == flags
    spec = width_spec(model, lm.adapter)
    assert tl == 3 * calib.n_tokens * spec.n_layers
    hd, hpg = spec.head_dim, spec.heads_per_group

    weights = [p for b in lm.adapter.get_blocks(model) for p in (x.weight for x in width_linears(lm.adapter, b).values())]
    wflags = [p.requires_grad for p in weights]
    for p in weights:
        p.requires_grad_(True)
    try:
        logits = model(input_ids=calib.input_ids, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 calib.input_ids[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, weights)
    finally:
        for p, f in zip(weights, wflags):
            p.requires_grad_(f)
    sal = {id(p): (p.detach().double() * g.double()) for p, g in zip(weights, grads)}
    row = lambda lin: sal[id(lin.weight)].sum(1).abs()  # noqa: E731  one score per output row
    col = lambda lin: sal[id(lin.weight)].sum(0).abs()  # noqa: E731  one score per input column
    for i, block in enumerate(lm.adapter.get_blocks(model)):
        lin = width_linears(lm.adapter, block)
        G = spec.layers[i].groups
        want_g = (row(lin["q"]).view(G, -1).sum(1) + row(lin["k"]).view(G, -1).sum(1)
                  + row(lin["v"]).view(G, -1).sum(1) + col(lin["o"]).view(G, -1).sum(1))
        want_c = sum(row(lin[f"mlp_in.{n}"]) for n in lm.adapter.mlp_in) + col(lin["mlp_out"])
        assert torch.allclose(imp.group_scores[i], want_g, rtol=1e-4, atol=1e-9)
        assert torch.allclose(imp.channel_scores[i], want_c, rtol=1e-4, atol=1e-9)
    assert hd * hpg * spec.layers[0].groups == lin["q"].weight.shape[0]


def test_owl_ratios_do_not_depend_on_the_structure_metric(lm):
    calib = random_calib(n=2, seqlen=16)
    ratios = {m: compute_importance(lm, calib, metric=m)[0].outlier_ratio for m in ("wanda_sp", "wanda_sp_all",
                                                                                     "taylor", "magnitude")}
    assert len(set(ratios.values())) == 1 and all(0.0 <= r <= 1.0 for r in ratios["taylor"])
