"""Resumable recovery training: kill -9 of a distillation fine-tune, then the same command, ends exactly as an
uninterrupted one (losses, exported weights); a checkpoint of other arguments is refused before any load."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch

from tests.test_run import _cmd, _env

TEXT = "the quick brown fox jumps over the lazy dog. a cat sat on the mat by the door. " * 200


def _args(model, data, out, extra=()):
    # --drop prunes here, so the dense model is MODEL itself: --loss auto distils (kd+lm, live teacher)
    return ["finetune", str(model), "--drop", "1,4", "--data", f"text:{data}", "--steps", "150", "--seqlen", "32",
            "--rank", "2", "--dropout", "0.1", "--lr", "0.005", "--out", str(out), *extra]


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(next(out.glob("*.safetensors"))))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_kill_and_rerun_equals_uninterrupted(tiny_dirs, tmp_path, mode):
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    env = {**_env(), "EVOPRUNE_CHECKPOINT_S": "0"}  # a checkpoint after every step
    extra = ["--mode", mode]
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(*_args(tiny_dirs["llama"], data, ref, extra)), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    want = json.loads((ref / "finetune.json").read_text())
    assert want["stats"]["loss"] == "kd+lm" and want["stats"]["resumed_at"] == 0
    assert not (ref / "finetune-checkpoint.pt").exists()

    out = tmp_path / "run"
    p = subprocess.Popen(_cmd(*_args(tiny_dirs["llama"], data, out, extra)), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    ckpt = out / "finetune-checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.005)
    time.sleep(0.3)
    p.kill()
    p.wait()
    assert ckpt.exists() and not (out / "finetune.json").exists(), "the fine-tune ended before it was killed"
    step = len(torch.load(ckpt, weights_only=False)["losses"])
    assert 0 < step < 150
    r = subprocess.run(_cmd(*_args(tiny_dirs["llama"], data, out, extra)), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "continuing the unfinished fine-tune" in r.stderr and not ckpt.exists()
    got = json.loads((out / "finetune.json").read_text())
    assert got["stats"]["resumed_at"] >= step and got["stats"]["losses"] == want["stats"]["losses"]
    a, b = _weights(ref), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_other_arguments_is_refused(tiny_dirs, tmp_path, capsys):
    from evoprune.cli import main
    from evoprune.finetune.checkpoint import TrainCheckpoint

    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    out.mkdir()
    TrainCheckpoint(out / "finetune-checkpoint.pt", {"model": "other"}).save(
        {}, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), None, [1.0], steps=1)
    assert main(_args(tiny_dirs["llama"], data, out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unfinished fine-tune with other arguments" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["finetune-checkpoint.pt"]  # nothing lost
    assert main(_args(tiny_dirs["llama"], data, out, ["--steps", "3", "--overwrite"])) == 0  # starts afresh
    assert json.loads((out / "finetune.json").read_text())["stats"]["resumed_at"] == 0
