"""Every adapter family: reversible zero-copy dropping, KV-cache consistency, export round trip."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from evoprune import load_model
from evoprune.errors import UserError
from evoprune.export import export_dropped
from tests.conftest import FAMILIES, TINY_VOCAB


def _ids(n=40, seed=1):
    return torch.randint(0, TINY_VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_is_reversible_and_zero_copy(tiny_dirs, family):
    lm = load_model(str(tiny_dirs[family]))
    assert lm.adapter.n_layers(lm.model) == 6
    ids = _ids()
    dense = _logits(lm.model, ids)
    before = [id(b) for b in lm.adapter.get_blocks(lm.model)]
    ptrs = {n: p.data_ptr() for n, p in lm.model.named_parameters()}
    with lm.adapter.dropped(lm.model, [1, 4]) as pat:
        assert pat.kept == (0, 2, 3, 5)
        blocks = lm.adapter.get_blocks(lm.model)
        assert [id(b) for b in blocks] == [before[i] for i in pat.kept]  # same objects, no copy
        assert lm.model.config.num_hidden_layers == 4
        assert [lm.adapter.attention(b).layer_idx for b in blocks] == [0, 1, 2, 3]
        pruned = _logits(lm.model, ids)
        assert not torch.allclose(pruned, dense)
    assert [id(b) for b in lm.adapter.get_blocks(lm.model)] == before
    assert lm.model.config.num_hidden_layers == 6
    assert [lm.adapter.attention(b).layer_idx for b in lm.adapter.get_blocks(lm.model)] == list(range(6))
    assert {n: p.data_ptr() for n, p in lm.model.named_parameters()} == ptrs
    assert torch.equal(_logits(lm.model, ids), dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_consistent_when_dropped(tiny_dirs, family):
    """Incremental decoding with a KV cache equals the full forward on the dropped model."""
    lm = load_model(str(tiny_dirs[family]))
    ids = _ids(30)
    with torch.no_grad(), lm.adapter.dropped(lm.model, [0, 3]):
        full = lm.model(input_ids=ids, use_cache=False).logits
        out = lm.model(input_ids=ids[:, :-1], use_cache=True)
        step = lm.model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    assert (step[:, -1] - full[:, -1]).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(tiny_dirs, family, tmp_path):
    lm = load_model(str(tiny_dirs[family]))
    ids = _ids(40)  # longer than the sliding windows of the tiny configs
    with lm.adapter.dropped(lm.model, [2, 5]):
        want = _logits(lm.model, ids)
    out = tmp_path / "exp"
    rec = export_dropped(lm, [2, 5], out)
    assert rec["max_abs_diff"] <= 1e-5
    assert rec["dropped_layers"] == [2, 5] and rec["n_layers"] == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4
    if "layer_types" in cfg and cfg["layer_types"] is not None:
        orig = lm.model.config.layer_types
        assert cfg["layer_types"] == [orig[i] for i in (0, 1, 3, 4)]
    assert json.loads((out / "pruning.json").read_text())["sparsity"] == pytest.approx(2 / 6)
    # reload in a fresh interpreter that never imports evoprune
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval();"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r});"
        f"torch.save(m(input_ids=ids, use_cache=False).logits, {str(tmp_path / 'got.pt')!r});"
        "assert 'evoprune' not in sys.modules"
    )
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", code], check=True)
    got = torch.load(tmp_path / "got.pt")
    assert (got - want).abs().max() <= 1e-5


def test_bad_drops_raise(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    for bad, msg in [([6], "out of range"), ([1, 1], "repeated"), (list(range(6)), "every layer"), ([-1], "out of range")]:
        with pytest.raises(UserError, match=msg):
            with lm.adapter.dropped(lm.model, bad):
                pass
    assert lm.model.config.num_hidden_layers == 6


def test_info_counts(tiny_dirs):
    lm = load_model(str(tiny_dirs["qwen3"]))
    info = lm.adapter.info(lm.model)
    assert (info["layers"], info["heads"], info["kv_heads"], info["head_dim"], info["intermediate"]) == (6, 4, 2, 16, 96)
    assert info["params"] == sum(p.numel() for p in lm.model.parameters())
