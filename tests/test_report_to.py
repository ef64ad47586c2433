"""``--report-to tensorboard|wandb|none``: per-generation metrics streamed beside the run directory.

Tiny evop runs in-process (12 blocks, drop 4: the best loss improves over the 5 generations; ~1 s each); what the reporters wrote is read back and compared with
the run directory (``wall.jsonl``: one row per checkpoint; ``history.jsonl``; ``result.json``).
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from evoprune.cli import main
from evoprune.errors import UserError
from evoprune.runner.reporting import Reporter, Reporters, reporters, wandb_run_id
from evoprune.runner.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tests.conftest import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("report") / "llama12", "llama", n_layers=12)


def _search(model, calib, out, *extra) -> list[str]:
    return ["search", "--model", str(model), "--method", "evop", "--drop-count", "4", "--calib", f"text:{calib}",
            "--sampling", "random", "--nsamples", "3", "--seqlen", "48", "--seed", "3", "--population", "8",
            "--generations", "5", "--out", str(out), *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _interrupt_after(monkeypatch, n: int) -> None:
    """The next run stops (as if killed) right after its ``n``-th checkpoint was saved, logged and timed."""
    real, calls = RunDir.append_wall, []

    def append_wall(self, row):
        real(self, row)
        calls.append(row)
        if len(calls) == n:
            monkeypatch.setattr(RunDir, "append_wall", real)
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "append_wall", append_wall)


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(run: Path) -> list[tuple[int, float, int, int]]:
    """``(step, best loss so far, evaluations, token-layers)`` of every checkpoint of ``run``."""
    hist, out = _rows(run / "history.jsonl"), []
    for w in _rows(run / "wall.jsonl"):
        done = hist[: w["evaluations"]]
        out.append((w["generation"], min(r["loss"] for r in done), w["evaluations"], done[-1]["token_layers"]))
    return out


def _check_tensorboard(run: Path) -> None:
    res, want = json.loads((run / "result.json").read_text()), _expected(run)
    got = _scalars(run / "tensorboard")
    assert set(got) == {"search/best_calib_loss", "search/evaluations", "search/token_layers"}
    assert [s for s, _ in got["search/evaluations"]] == [w[0] for w in want]  # one step per checkpoint, once
    assert len({w[0] for w in want}) == len(want) and want[-1][1] < want[0][1]  # the best improved meanwhile
    for (step, best, evals, tl), b, e, t in zip(want, *(got[k] for k in sorted(got))):
        assert b == (step, pytest.approx(best, rel=1e-6))  # TensorBoard scalars are float32
        assert e == (step, evals) and t == (step, tl)
    assert got["search/best_calib_loss"][-1][1] == pytest.approx(res["calib_loss"], rel=1e-6)
    assert got["search/token_layers"][-1][1] == res["token_layers"]
    assert got["search/evaluations"][-1][1] == res["evaluations"]


def test_tensorboard_scalars_equal_the_run(llama, calib_text, tmp_path):
    run = tmp_path / "run"
    assert main(_search(llama, calib_text, run, "--report-to", "tensorboard")) == 0
    assert json.loads((run / "config.json").read_text())["execution"]["report_to"] == "tensorboard"
    _check_tensorboard(run)
    assert not (run / "wandb").exists()


def test_tensorboard_resume_logs_each_step_once(llama, calib_text, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _interrupt_after(monkeypatch, 2)
    assert main(_search(llama, calib_text, run, "--report-to", "tensorboard")) == 130
    first = _scalars(run / "tensorboard")["search/evaluations"]
    assert len(first) == 2 and not (run / "result.json").exists()
    assert main(["resume", str(run)]) == 0  # report_to as the run was started (its config.json)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per process
    _check_tensorboard(run)
    assert _scalars(run / "tensorboard")["search/evaluations"][:2] == first


def _wandb_records(path: Path) -> list:
    """The records of an offline ``.wandb`` file (a LevelDB-style log of protobuf ``Record``s)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, out, buf = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _wandb_history(files: list[Path]) -> list[dict] | None:
    """History rows (``_step`` and the metrics) of offline run files, or ``None`` when the format is unknown."""
    try:
        recs = [r for f in files for r in _wandb_records(f)]
    except Exception:  # another wandb's file format: only the files' existence is checked
        return None
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in recs if r.WhichOneof("record_type") == "history"]


def test_wandb_offline_resumes_the_same_run(llama, calib_text, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb_dir"),
                 "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
                 "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    _interrupt_after(monkeypatch, 2)
    assert main(_search(llama, calib_text, run, "--report-to", "wandb")) == 130
    monkeypatch.delenv("WANDB_MODE")  # no API key: offline by default, no network either way
    assert main(["resume", str(run)]) == 0
    res, want = json.loads((run / "result.json").read_text()), _expected(run)
    dirs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and all(d.name.endswith("-" + wandb_run_id(run)) for d in dirs)  # the same wandb run
    files = [f for d in dirs for f in d.glob("run-*.wandb")]
    assert len(files) == 2
    rows = _wandb_history(files)
    if rows is not None:
        assert [r["_step"] for r in rows] == [w[0] for w in want]
        assert [r["search/evaluations"] for r in rows] == [w[2] for w in want]
        assert [r["search/token_layers"] for r in rows] == [w[3] for w in want]
        assert rows[-1]["search/best_calib_loss"] == res["calib_loss"]  # JSON: the exact double
    assert not (run / "tensorboard").exists()


def test_default_none_writes_neither(llama, calib_text, tmp_path):
    run = tmp_path / "run"
    assert main(_search(llama, calib_text, run)) == 0
    assert json.loads((run / "config.json").read_text())["execution"]["report_to"] == "none"
    assert not (run / "tensorboard").exists() and not (run / "wandb").exists()


def test_unknown_value_exits_2_with_one_line(llama, calib_text, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_search(llama, calib_text, run, "--report-to", "tensorboard,mlflow")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["evoprune: error: unknown --report-to 'mlflow' (choose from tensorboard, wandb, none, or a comma "
                   "list like tensorboard,wandb)"]
    assert not run.exists()
    assert main(_search(llama, calib_text, run)) == 0
    capsys.readouterr()
    assert main(["resume", str(run), "--report-to", "none,wandb"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_missing_package_is_one_line(llama, calib_text, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(UserError, match=r"^--report-to tensorboard needs the tensorboard package: pip install "
                                        r"'evoprune\[report\]'$"):
        reporters("tensorboard", tmp_path, {})
    run = tmp_path / "run"
    assert main(_search(llama, calib_text, run, "--report-to", "tensorboard")) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "evoprune: error: --report-to tensorboard needs the tensorboard package: pip install 'evoprune[report]'"]
    assert not run.exists()  # refused before the run directory was written


def test_names_normalized_and_combined(tmp_path):
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.reporting import TensorBoardReporter, WandbReporter

    cfg = SearchConfig.from_dict({"drop_count": 2, "report_to": ["TensorBoard", "wandb", "tensorboard"]})
    assert cfg.execution.report_to == "tensorboard,wandb"
    assert SearchConfig.from_dict(cfg.to_dict()).execution.report_to == "tensorboard,wandb"  # config.json round trip
    assert cfg.replace_execution(report_to="none").execution.report_to == "none"  # may change on resume
    both = reporters(cfg.execution.report_to, tmp_path, cfg.to_dict())
    assert isinstance(both, Reporters)
    assert [type(r) for r in both.parts] == [TensorBoardReporter, WandbReporter]
    assert type(reporters("none", tmp_path)) is Reporter
    assert wandb_run_id(tmp_path) == wandb_run_id(tmp_path / "." / "x" / "..")
    assert wandb_run_id(tmp_path) != wandb_run_id(tmp_path / "other")
    assert list(tmp_path.iterdir()) == []  # nothing opened
