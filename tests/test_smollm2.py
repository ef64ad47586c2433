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
    assert 5 < dense.ppl < 200  # a real language model, not random weights (ln 49152 = 10.8)
    with smollm2.adapter.dropped(smollm2.model, [3, 13]):
        pruned = perplexity(smollm2.model, ids=ids, seqlen=256, max_windows=1, progress=False)
    assert pruned.nll > dense.nll
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


def test_sublayer_export_round_trip(smollm2, tmp_path):
    """A mixed attention / MLP / whole-block pattern on the real model: reloaded logits equal the skipped model's."""
    from evoprune.export import export_sublayers

    attention, mlp = (4, 11, 12, 20, 25), (12, 27)
    rec = export_sublayers(smollm2, attention, mlp, tmp_path / "sub")
    assert rec["max_abs_diff"] <= 1e-5 and rec["skipped_max_abs_diff"] <= 1e-5
    assert rec["dropped_layers"] == [12] and rec["num_kv_groups"].count(0) == 4 and rec["intermediate_sizes"].count(0) == 1
    per_block = sum(p.numel() for p in smollm2.adapter.get_blocks(smollm2.model)[0].parameters())
    assert rec["params_dense"] - rec["params"] == per_block + 4 * 884_736 + 2_654_208
