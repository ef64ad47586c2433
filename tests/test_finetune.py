"""LoRA recovery fine-tuning: config validation, data, training, merge, export round trips, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from evoprune.errors import UserError

TEXT = "the quick brown fox jumps over the lazy dog. " * 120


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _ids(n=48, seed=3):
    from tests.conftest import TINY_VOCAB

    return torch.randint(0, TINY_VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def _cfg(**kw):
    from evoprune.finetune import LoRAConfig

    return LoRAConfig(**{"steps": 6, "seqlen": 32, "rank": 4, "lr": 1e-2, "dropout": 0.0, **kw})


@pytest.mark.parametrize("kw", [dict(steps=0), dict(rank=0), dict(seqlen=1), dict(batch_size=0), dict(lr=0.0),
                                dict(alpha=-1.0), dict(dropout=1.0), dict(warmup_steps=7), dict(schedule="cosine"),
                                dict(target=()), dict(steps=2.5)])
def test_config_rejects_bad_values(kw):
    with pytest.raises(UserError):
        _cfg(**kw)


def test_bad_cli_arguments_exit_2_before_loading(tmp_path, capsys, text_file):
    from evoprune.cli import main

    base = ["finetune", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "o")]
    for extra, msg in ((["--data", f"text:{text_file}", "--steps", "0"], "steps must be >= 1"),
                       (["--data", "bogus", "--steps", "2"], "unknown training data"),
                       (["--data", f"text:{text_file}", "--steps", "2", "--rank", "0"], "rank must be >= 1"),
                       (["--data", f"alpaca:{tmp_path / 'missing.json'}", "--steps", "2"], "data file not found")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("evoprune: error:") and msg in err[0]
    assert not (tmp_path / "o").exists()


def test_alpaca_and_training_documents(tmp_path, text_file):
    from evoprune.finetune import alpaca_documents, train_documents
    from evoprune.finetune.data import ALPACA_PROMPT_NO_INPUT

    recs = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Greet.", "input": "", "output": "Hi"}]
    arr, lines = tmp_path / "a.json", tmp_path / "a.jsonl"
    arr.write_text(json.dumps(recs))
    lines.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    docs = alpaca_documents(arr)
    assert docs == alpaca_documents(lines) == train_documents(f"alpaca:{arr}")
    assert "### Input:\n1 2\n\n### Response:\n3" in docs[0]
    assert docs[1] == ALPACA_PROMPT_NO_INPUT.format(instruction="Greet.") + "Hi"
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(UserError, match="record 0"):
        alpaca_documents(tmp_path / "bad.json")
    assert train_documents(f"text:{text_file}") == [text_file.read_text()]


def test_pack_windows_separates_documents_with_eos(tiny_dirs):
    from evoprune import load_model
    from evoprune.finetune import pack_windows

    tok = load_model(str(tiny_dirs["llama"]), progress=False).tokenizer
    w = pack_windows(tok, ["the fox", "the dog"] * 20, 8)
    assert w.dtype == torch.long and w.shape[1] == 8
    assert int((w == tok.eos_token_id).sum()) >= w.numel() // 8  # one EOS per short document
    with pytest.raises(UserError, match="fewer than one window"):
        pack_windows(tok, "fox", 64)


def test_default_targets_follow_the_family(tiny_dirs):
    from evoprune import load_model
    from evoprune.finetune.lora import resolve_targets

    opt = load_model(str(tiny_dirs["opt"]), progress=False)
    names = {n.rsplit(".", 1)[-1] for n in resolve_targets(opt)}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    with pytest.raises(UserError, match="gate_proj"):
        resolve_targets(opt, ["gate_proj"])


def test_training_reduces_loss_and_export_reloads(tiny_dirs, tmp_path):
    from evoprune import load_model
    from evoprune.finetune import finetune_lora, pack_windows
    from evoprune.export import save_pruned as save_finetuned

    lm = load_model(str(tiny_dirs["llama"]), progress=False)
    model = lm.model
    held = pack_windows(lm.tokenizer, TEXT, 32)[:4]
    with torch.no_grad():
        before = float(lm.model(input_ids=held, labels=held).loss)
    stats = finetune_lora(lm, TEXT, _cfg(steps=8))
    with torch.no_grad():
        after = float(lm.model(input_ids=held, labels=held).loss)
    assert lm.model is model and not model.training and all(p.requires_grad for p in model.parameters())
    assert stats["steps"] == 8 and stats["tokens"] == 8 * 32 and len(stats["losses"]) == 8
    assert stats["loss_last"] < stats["loss_first"] - 0.2 and after < before - 0.2
    assert stats["target_modules"] == 6 * 7 and stats["lora_params"] > 0
    assert not any("lora" in n for n, _ in model.named_parameters()) and not hasattr(model, "peft_config")
    rec = save_finetuned(lm, tmp_path / "ft")
    assert rec["max_abs_diff"] <= 1e-5 and rec["n_layers"] == 6
    back = load_model(str(tmp_path / "ft"), progress=False)
    ids = _ids()
    assert torch.allclose(_logits(back.model, ids), _logits(lm.model, ids), atol=1e-5, rtol=0)


def test_same_seed_same_weights(tiny_dirs):
    from evoprune import load_model
    from evoprune.finetune import finetune_lora

    def trained(seed):
        lm = load_model(str(tiny_dirs["qwen2"]), progress=False)
        torch.manual_seed(1000 + seed)  # the global RNG must not matter
        finetune_lora(lm, TEXT, _cfg(steps=3, dropout=0.1, batch_size=2, seed=seed))
        return lm.model.state_dict()

    a, b, c = trained(0), trained(0), trained(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_failure_leaves_the_model_unchanged(tiny_dirs):
    from evoprune import load_model
    from evoprune.finetune import finetune_lora

    lm = load_model(str(tiny_dirs["llama"]), progress=False)
    w0 = {k: v.clone() for k, v in lm.model.state_dict().items()}
    bad = torch.full((4, 32), 10_000, dtype=torch.long)  # out-of-vocabulary ids fail in the first forward
    with pytest.raises(IndexError):
        finetune_lora(lm, bad, _cfg())
    sd = lm.model.state_dict()
    assert sd.keys() == w0.keys() and all(torch.equal(sd[k], w0[k]) for k in sd)
    assert all(p.requires_grad for p in lm.model.parameters()) and not lm.model.training
    with pytest.raises(UserError, match="expected"):
        finetune_lora(lm, bad[:, :16], _cfg())


def test_width_pruned_run_finetunes_and_exports(tiny_dirs, calib_text, tmp_path):
    from evoprune import load_model
    from evoprune.finetune import finetune_lora
    from evoprune.export import save_pruned as save_finetuned
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    res = run_search(SearchConfig.build(model=str(tiny_dirs["llama"]), space="width", method="uniform", sparsity=0.4,
                                  calib=f"text:{calib_text}", sampling="random", nsamples=2, seqlen=32),
                     tmp_path / "run", progress=False)
    lm = load_model(str(tmp_path / "run"), progress=False)
    stats = finetune_lora(lm, calib_text.read_text(), _cfg(steps=4, lr=5e-3))
    assert stats["loss_last"] < stats["loss_first"]
    rec = save_finetuned(lm, tmp_path / "ft")
    assert rec["max_abs_diff"] <= 1e-5 and rec["params"] == res["params"] and rec["rates"] == res["rates"]
    assert (tmp_path / "ft" / "modeling_evoprune_width.py").is_file()
    back = load_model(str(tmp_path / "ft"), progress=False)  # trusted remote code: evoprune's own files
    assert back.model.config.evoprune_width["num_kv_groups"] == lm.model.config.evoprune_width["num_kv_groups"]
    ids = _ids()
    assert torch.allclose(_logits(back.model, ids), _logits(lm.model, ids), atol=1e-5, rtol=0)
    # the export fine-tunes again (loaded through trust_remote_code) and saves in the same format
    finetune_lora(back, calib_text.read_text(), _cfg(steps=1))
    assert save_finetuned(back, tmp_path / "ft2")["max_abs_diff"] <= 1e-5


def test_cli_finetune_with_drop(tiny_dirs, text_file, tmp_path, capsys):
    from evoprune import load_model
    from evoprune.cli import main

    out = tmp_path / "ft"
    assert main(["finetune", str(tiny_dirs["mistral"]), "--drop", "1,4", "--data", f"text:{text_file}",
                 "--steps", "3", "--seqlen", "32", "--rank", "2", "--warmup-steps", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out.strip().splitlines()[-1])
    assert res["steps"] == 3 and res["dropped_layers"] == [1, 4] and res["max_abs_diff"] <= 1e-5
    assert "finetuned" in captured.err and not res["width_pruned"]
    ft = json.loads((out / "finetune.json").read_text())
    assert ft["config"]["rank"] == 2 and len(ft["stats"]["losses"]) == 3 and ft["data_split"] == "calib"
    pr = json.loads((out / "pruning.json").read_text())
    assert pr["dropped_layers"] == [1, 4] and pr["finetune"]["config"]["steps"] == 3
    assert load_model(str(out), progress=False).n_layers == 4
    assert main(["finetune", str(tiny_dirs["mistral"]), "--data", f"text:{text_file}", "--steps", "1",
                 "--out", str(out)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err


def test_cli_finetune_layer_drop_run(tiny_dirs, calib_text, tmp_path, capsys):
    from evoprune import load_model
    from evoprune.cli import main
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.loop import run_search

    res = run_search(SearchConfig.build(model=str(tiny_dirs["llama"]), method="shortgpt", drop_count=2,
                                  calib=f"text:{calib_text}", sampling="random", nsamples=2, seqlen=32),
                     tmp_path / "run", progress=False)
    out = tmp_path / "ft"
    assert main(["finetune", str(tmp_path / "run"), "--data", f"text:{calib_text}", "--steps", "2",
                 "--seqlen", "32", "--target", "q_proj,v_proj", "--out", str(out)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["dropped_layers"] == res["dropped_layers"] and last["target_modules"] == 4 * 2
    pr = json.loads((out / "pruning.json").read_text())
    assert pr["dropped_layers"] == res["dropped_layers"] and pr["n_layers"] == 4
    assert load_model(str(out), progress=False).n_layers == 4
