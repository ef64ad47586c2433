"""Perplexity protocol and text sources."""
from __future__ import annotations

import json

import pytest
import torch

from evoprune import load_model
from evoprune.data import sources
from evoprune.errors import UserError
from evoprune.evaluate.perplexity import perplexity, windows


def test_windows_shape_and_errors():
    ids = torch.arange(100)
    assert windows(ids, 30).shape == (3, 30)
    assert windows(ids, 30, max_windows=2).tolist()[1][0] == 30
    with pytest.raises(UserError, match="longer than the text"):
        windows(ids, 101)


def test_ppl_matches_hf_labels_loss(tiny_dirs):
    lm = load_model(str(tiny_dirs["llama"]))
    ids = torch.randint(0, 320, (200,), generator=torch.Generator().manual_seed(0))
    res = perplexity(lm.model, ids=ids, seqlen=64, max_windows=1, progress=False)
    with torch.no_grad():
        loss = lm.model(input_ids=ids[None, :64], labels=ids[None, :64]).loss.item()
    assert abs(res.nll - loss) < 1e-5 and res.tokens == 63
    # several windows: mean over all predicted tokens
    res3 = perplexity(lm.model, ids=ids, seqlen=64, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [lm.model(input_ids=ids[None, i * 64:(i + 1) * 64], labels=ids[None, i * 64:(i + 1) * 64]).loss.item()
                  for i in range(3)]
    assert res3.windows == 3 and abs(res3.nll - sum(losses) / 3) < 1e-5


def test_local_sources_disjoint(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw/wiki.valid.raw").write_text(" = A = \n\n valid line \n")
    (tmp_path / "wikitext-2-raw/wiki.test.raw").write_text(" = B = \n\n test line \n")
    import gzip

    (tmp_path / "c4").mkdir()
    with gzip.open(tmp_path / "c4/c4_validation_2k.json.gz", "wt") as f:
        for i in range(2000):
            f.write(json.dumps({"text": f"doc{i}", "url": "", "timestamp": ""}) + "\n")
    monkeypatch.setenv("EVOPRUNE_DATA", str(tmp_path))
    # hub layout: one row per line, blank lines "", joined with "\n\n"
    assert sources.get_text("wikitext2", "calib") == " = A = \n" + "\n\n" + "" + "\n\n" + " valid line \n"
    assert "test line" in sources.get_text("wikitext2", "eval")
    ev, ca = sources.get_documents("c4", "eval"), sources.get_documents("c4", "calib")
    assert ev[0] == "doc0" and ev[-1] == "doc999" and ca[0] == "doc1000" and ca[-1] == "doc1999"
    j = tmp_path / "d.jsonl"
    j.write_text('{"body": "x"}\n{"body": "y"}\n')
    assert sources.get_text(f"jsonl:{j}:body") == "x\n\ny"
    with pytest.raises(UserError, match="field 'text'"):
        sources.get_text(f"jsonl:{j}")


def test_missing_local_data_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOPRUNE_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError, match="data source not found: no local wikitext-2-raw/wiki.test.raw"):
        sources.get_text("wikitext2", "eval")


@pytest.mark.skipif(sources.data_dir() is None, reason="no shared data dir")
def test_shared_data_sizes():
    docs = sources.get_documents("c4", "eval")
    assert len(docs) == 1000
    assert len(sources.get_text("wikitext2", "eval")) > 1_000_000
