"""Recovery by distillation (``finetune --loss kd | kd+lm``) and full fine-tuning (``--mode full``).

The KD loss is the fitness KL, differentiable; it is zero for the teacher itself; training on it brings a pruned
tiny model's next-token distributions closer to the dense model's, with a live teacher or cached top-k targets;
``--mode full`` changes only the targeted projections; the CLI records which teacher it used.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from tests.conftest import TINY_VOCAB

TEXT = "the quick brown fox jumps over the lazy dog. a cat sat on the mat by the door. " * 60


def _kl(teacher, student, ids) -> float:
    from evoprune.fitness.kl import KLTarget, kl_sum

    with torch.no_grad():
        t = KLTarget.from_logits(teacher(input_ids=ids, use_cache=False).logits)
        return kl_sum(t, student(input_ids=ids, use_cache=False).logits) / (ids.shape[0] * (ids.shape[1] - 1))


def test_kl_divergence_is_the_fitness_kl_with_a_gradient():
    from evoprune.fitness.kl import KLTarget, kl_divergence, kl_sum

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 9, 50, generator=g), torch.randn(2, 9, 50, generator=g, requires_grad=True)
    for k in (None, 5):
        t = KLTarget.from_logits(teacher, k)
        d = kl_divergence(t, student)
        assert float(d.detach()) == kl_sum(t, student) > 0
        d.backward()
        assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
        student.grad = None
        assert float(kl_divergence(t, teacher)) == pytest.approx(0.0, abs=1e-5)  # the teacher learns nothing


def _distilled(tiny_dirs, loss: str, topk: int | None):
    """(KL to the dense model on held-out ids before, after, the training stats) of a tiny llama without blocks 2
    and 3 trained 20 steps with ``loss``."""
    from evoprune import load_model
    from evoprune.finetune import LoRAConfig, finetune_lora
    from evoprune.finetune.distill import Teacher
    from evoprune.finetune.lora import training_windows

    dense = load_model(str(tiny_dirs["llama"]), progress=False)
    lm = load_model(str(tiny_dirs["llama"]), progress=False)
    lm.adapter.drop_inplace(lm.model, [2, 3])
    cfg = LoRAConfig(steps=20, seqlen=32, rank=4, lr=1e-3, dropout=0.0, loss=loss, kd_topk=topk)
    windows = training_windows(dense, TEXT, cfg.seqlen)
    teacher = None if loss == "lm" else Teacher.live(dense.model) if topk is None else \
        Teacher.cached(dense.model, windows, topk)
    held = torch.randint(0, TINY_VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    before = _kl(dense.model, lm.model, held)
    stats = finetune_lora(lm, windows, cfg, teacher=teacher)
    return before, _kl(dense.model, lm.model, held), stats


@pytest.mark.parametrize("topk", [None, 16])
def test_distillation_brings_the_student_closer_to_the_teacher(tiny_dirs, one_thread, topk):
    """KD alone, live or from cached top-16 targets: the training KL falls and the held-out KL to the teacher too."""
    before, after, stats = _distilled(tiny_dirs, "kd", topk)
    assert stats["loss"] == "kd" and stats["teacher"] == ("live" if topk is None else f"top-{topk} cached")
    assert sum(stats["losses"][-3:]) < sum(stats["losses"][:3])
    assert after < 0.8 * before


def test_kd_plus_lm_stays_closer_to_the_teacher_than_lm(tiny_dirs, one_thread):
    """On a random tiny teacher the text pulls the student away from it; the KD term holds it closer."""
    _, kd_lm, stats = _distilled(tiny_dirs, "kd+lm", None)
    _, lm, _ = _distilled(tiny_dirs, "lm", None)
    assert stats["loss_last"] < stats["loss_first"] and kd_lm < lm


def test_full_mode_trains_only_the_targets(tiny_dirs, one_thread):
    from evoprune import load_model
    from evoprune.finetune import LoRAConfig, finetune_lora

    lm = load_model(str(tiny_dirs["llama"]), progress=False)
    before = copy.deepcopy(lm.model.state_dict())
    flags = [p.requires_grad for p in lm.model.parameters()]
    stats = finetune_lora(lm, TEXT, LoRAConfig(steps=3, seqlen=32, lr=1e-3, mode="full", target=("down_proj",)))
    after = lm.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in range(6)}
    assert stats["mode"] == "full" and stats["lora_params"] == sum(after[k].numel() for k in changed)
    assert [p.requires_grad for p in lm.model.parameters()] == flags


def test_cli_distills_from_the_runs_base(tiny_dirs, tmp_path, capsys, text_file):
    """A run directory's base is the teacher; --kd-topk caches its targets; finetune.json says which."""
    from evoprune.cli import main

    run = tmp_path / "run"
    assert main(["search", "--model", str(tiny_dirs["llama"]), "--method", "shortgpt", "--drop-count", "2", "--calib",
                 f"text:{text_file}", "--sampling", "random", "--nsamples", "2", "--seqlen", "32", "--out",
                 str(run)]) == 0
    for extra, kind in (([], "live"), (["--kd-topk", "8"], "top-8 cached")):
        out = tmp_path / f"ft{len(extra)}"
        capsys.readouterr()
        assert main(["finetune", str(run), "--data", f"text:{text_file}", "--steps", "2", "--seqlen", "32",
                     "--loss", "kd", "--out", str(out), *extra]) == 0
        rec = json.loads((out / "finetune.json").read_text())
        assert rec["teacher_model"] == str(tiny_dirs["llama"]) and rec["stats"]["teacher"] == kind
        assert rec["config"]["loss"] == "kd" and "kd from" in capsys.readouterr().err


def test_auto_distils_where_the_dense_model_is_known(tiny_dirs, tmp_path, capsys, text_file):
    """The default ``--loss auto``: kd+lm from the model itself with --drop; lm, said on stderr, for a model whose
    dense base nobody knows; in the library: kd+lm with a teacher, lm without."""
    from evoprune import load_model
    from evoprune.cli import main
    from evoprune.finetune import LoRAConfig, finetune_lora
    from evoprune.finetune.distill import Teacher

    lm, dense = load_model(str(tiny_dirs["llama"]), progress=False), load_model(str(tiny_dirs["llama"]), progress=False)
    cfg = LoRAConfig(steps=1, seqlen=32)
    assert finetune_lora(lm, TEXT, cfg)["loss"] == "lm"
    assert finetune_lora(lm, TEXT, cfg, teacher=Teacher.live(dense.model))["loss"] == "kd+lm"
    base = ["finetune", str(tiny_dirs["llama"]), "--data", f"text:{text_file}", "--steps", "1", "--seqlen", "32"]
    assert main([*base, "--drop", "1", "--out", str(tmp_path / "a")]) == 0
    rec = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert rec["stats"]["loss"] == "kd+lm" and rec["teacher_model"] == str(tiny_dirs["llama"])
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "b")]) == 0
    assert "recovering with --loss lm" in capsys.readouterr().err
    assert json.loads((tmp_path / "b" / "finetune.json").read_text())["stats"]["loss"] == "lm"
