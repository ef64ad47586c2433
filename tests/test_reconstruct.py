"""Width reconstruction: the least-squares update of the kept output-projection columns.

It is the structured-OBS removal of the dropped columns (same numbers), lowers the output error it minimizes on
tiny models of every family, is applied and restored exactly, and a search's cached reconstructed candidates score
what a naive reconstruct-and-forward scores.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import FAMILIES, random_calib


def test_reconstruct_is_the_obs_removal_of_the_dropped_columns():
    from evoprune.prune.obs import reconstruct

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    h = x.T @ x
    kept, removed = torch.tensor([0, 2, 3, 7, 8, 11]), torch.tensor([1, 4, 5, 6, 9, 10])
    damp = 0.3
    hd = h + damp * float(torch.diag(h).mean()) * torch.eye(12, dtype=torch.float64)
    hinv = torch.linalg.inv(hd)
    obs = w - w[:, removed] @ torch.linalg.solve(hinv[removed][:, removed], hinv[removed, :])
    got = reconstruct(w, h, kept, damp)
    assert torch.allclose(got, obs[:, kept], atol=1e-10)
    assert torch.allclose(obs[:, removed], torch.zeros(5, 6, dtype=torch.float64), atol=1e-10)
    # undamped: the least-squares kept columns reproduce the layer's output better than the unchanged ones
    ls = reconstruct(w, h, kept, 1e-12)
    err = lambda wk: float(((x[:, kept] @ wk.T) - x @ w.T).pow(2).sum())  # noqa: E731
    assert err(ls) < err(w[:, kept])


def _plan(lm, calib, rate: float):
    from evoprune.prune.importance import compute_importance
    from evoprune.prune.width_plan import plan_widths

    imp, _ = compute_importance(lm, calib)
    return imp, plan_widths(lm, imp, [rate] * lm.adapter.n_layers(lm.model))


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_lowers_each_layer_output_error(tiny_dirs, family, one_thread):
    """For every pruned projection, the reconstructed columns' output error on the calibration inputs
    (``tr((W'-W) H (W'-W)^T)``, the undamped Hessian) is below the masked columns' error."""
    from evoprune import load_model
    from evoprune.models.slicing import output_columns
    from evoprune.prune.hessians import OUTPUT_PROJ, projection_hessians
    from evoprune.prune.obs import obs_error
    from evoprune.prune.reconstruct import Reconstruction

    lm = load_model(str(tiny_dirs[family]), progress=False)
    calib = random_calib(n=4, seqlen=32)
    _, plan = _plan(lm, calib, 0.5)
    recon = Reconstruction(lm, calib)
    hess, _ = projection_hessians(lm, calib, range(lm.adapter.n_layers(lm.model)))
    ratios = []
    for i in range(recon.spec.n_layers):
        for unit, role in OUTPUT_PROJ.items():
            kept, removed = output_columns(recon.spec, plan, i)[role]
            if not len(removed) or not len(kept):
                continue
            dense = recon.dense[(i, role)].double()
            masked = dense.index_fill(1, removed, 0.0)
            rebuilt = torch.zeros_like(dense).index_copy(1, kept, recon.columns(i, role, kept).double())
            e_mask, e_rec = obs_error(dense, masked, hess[(i, unit)]), obs_error(dense, rebuilt, hess[(i, unit)])
            ratios.append(e_rec / e_mask)
    assert len(ratios) >= lm.adapter.n_layers(lm.model)  # every block pruned something
    assert max(ratios) < 1.0 and sum(ratios) / len(ratios) < 0.9, ratios


def _naive_nll(lm, calib, plan, damp: float) -> float:
    """Mean next-token NLL of ``plan`` on ``calib`` with freshly computed reconstructed weights written into a copy."""
    import copy

    from evoprune.models.slicing import output_columns, width_linears, width_spec
    from evoprune.prune.hessians import OUTPUT_PROJ, projection_hessians
    from evoprune.prune.obs import reconstruct

    model = copy.deepcopy(lm.model)
    spec = width_spec(model, lm.adapter)
    n = spec.n_layers
    hess, _ = projection_hessians(lm, calib, range(n))
    with torch.no_grad():
        for i, block in enumerate(lm.adapter.get_blocks(model)):
            lin = width_linears(lm.adapter, block)
            for unit, role in OUTPUT_PROJ.items():
                kept, removed = output_columns(spec, plan, i)[role]
                if len(removed):
                    w = lin[role].weight
                    new = reconstruct(w, hess[(i, unit)].float(), kept, damp).to(w.dtype)
                    w.zero_()
                    w.index_copy_(1, kept, new)
        logits = model(input_ids=calib.input_ids, use_cache=False).logits
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       calib.input_ids[:, 1:].reshape(-1)))


def test_cached_reconstructed_candidates_equal_naive(tiny_dirs, one_thread):
    """The evaluator (block-prefix LRU on, reconstruction cache hit on the repeat) scores each plan as a model copy
    with freshly solved weights does; the model is bit-identical afterwards."""
    from evoprune import load_model
    from evoprune.fitness.whole_model import WidthEvaluator
    from evoprune.prune.kinds import RECONSTRUCT_DAMP
    from evoprune.prune.reconstruct import Reconstruction
    from evoprune.prune.width_plan import plan_widths

    lm = load_model(str(tiny_dirs["qwen2"]), progress=False)
    calib = random_calib(n=3, seqlen=24)
    imp, _ = _plan(lm, calib, 0.3)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    recon = Reconstruction(lm, calib)
    ev = WidthEvaluator(lm, calib, imp, recon=recon, cache_mb=64)
    n = lm.adapter.n_layers(lm.model)
    vectors = [[0.3] * n, [0.5, 0.1] * (n // 2), [0.3] * n]
    for rates in vectors:
        plan = plan_widths(lm, imp, rates)
        assert ev.evaluate(rates).loss == pytest.approx(_naive_nll(lm, calib, plan, RECONSTRUCT_DAMP), abs=1e-6)
    assert recon.solved == len({k for k in recon.cache})  # the repeated vector was all cache hits
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
