"""Integration on the real bundled SmolLM2-135M-Instruct (a few hundred tokens)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from evoprune.data.sources import data_dir, get_text
from evoprune.evaluate.perplexity import perplexity, tokenize_text
from evoprune.export import export_dropped

pytestmark = pytest.mark.slow


def test_shape(smollm2):
    info = smollm2.adapter.info(smollm2.model)
    assert (info["layers"], info["heads"], info["kv_heads"], info["hidden"], info["intermediate"]) == (30, 9, 3, 576, 1536)


@pytest.mark.skipif(data_dir() is None, reason="no shared data dir")
def test_ppl_and_export_round_trip(smollm2, tmp_path):
    ids = tokenize_text(smollm2.tokenizer, get_text("wikitext2", "eval"))
    dense = perplexity(smollm2.model, ids=ids, seqlen=256, max_windows=1, progress=False)
    with torch.no_grad():
        loss = smollm2.model(input_ids=ids[None, :256], labels=ids[None, :256]).loss.item()
    assert abs(dense.nll - loss) < 1e-5
    # golden numbers: the first 256 held-out wikitext2 tokens, dense and without blocks 3 and 13 (torch 2.13 CPU)
    assert dense.ppl == pytest.approx(35.34600651844577, rel=1e-4)
    with smollm2.adapter.dropped(smollm2.model, [3, 13]):
        pruned = perplexity(smollm2.model, ids=ids, seqlen=256, max_windows=1, progress=False)
    assert pruned.ppl == pytest.approx(44.845124496788266, rel=1e-4)
    out = tmp_path / "smol-28"
    rec = export_dropped(smollm2, [3, 13], out)
    assert rec["max_abs_diff"] <= 1e-5 and rec["n_layers"] == 28
    code = (
        "import json, math, sys, torch; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval(); ids = torch.load({str(tmp_path / 'ids.pt')!r});"
        "print(json.dumps({'loss': m(input_ids=ids, labels=ids).loss.item(), 'evoprune': 'evoprune' in sys.modules}))"
    )
    torch.save(ids[None, :256], tmp_path / "ids.pt")
    got = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert not got["evoprune"] and abs(got["loss"] - pruned.nll) < 1e-5


@pytest.mark.skipif(data_dir() is None, reason="no shared data dir")
def test_golden_sleb_run(smollm2, tmp_path):
    """A short SLEB (k = 2, one random 128-token wikitext2 window, seed 0): its pattern, loss and evaluations."""
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    cfg = SearchConfig.build(method="sleb", drop_count=2, nsamples=1, seqlen=128, seed=0)
    res = run_search(cfg, tmp_path / "r", lm=smollm2, progress=False)
    assert res["dropped_layers"] == [7, 19] and res["evaluations"] == 59
    assert res["calib_loss"] == pytest.approx(4.296943292095084, rel=1e-5)


def test_sublayer_export_round_trip(smollm2, tmp_path):
    """A mixed attention / MLP / whole-block pattern on the real model: reloaded logits equal the skipped model's."""
    from evoprune.export import export_sublayers

    attention, mlp = (4, 11, 12, 20, 25), (12, 27)
    rec = export_sublayers(smollm2, attention, mlp, tmp_path / "sub")
    assert rec["max_abs_diff"] <= 1e-5 and rec["skipped_max_abs_diff"] <= 1e-5
    assert rec["dropped_layers"] == [12] and rec["num_kv_groups"].count(0) == 4 and rec["intermediate_sizes"].count(0) == 1
    per_block = sum(p.numel() for p in smollm2.adapter.get_blocks(smollm2.model)[0].parameters())
    assert rec["params_dense"] - rec["params"] == per_block + 4 * 884_736 + 2_654_208
