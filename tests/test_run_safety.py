"""Run directories that cannot be corrupted: one writer, a full disk, SIGTERM / SIGINT, readers of a run in progress.

Every case compares the disturbed run with an undisturbed one of the same arguments: after the disturbance
(a second writer refused, a write failing with ENOSPC, a signal) and ``evoprune resume``, ``history.jsonl``
is byte-identical and ``result.json`` equal but for the wall time.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evoprune import cli
from evoprune.locking import holder, writer_lock
from tests.test_run import _cmd, _env, _search_args


def _args(model, calib, out):
    """A 12-block evop run of ~50 evaluations (long enough to disturb, a few seconds undisturbed)."""
    args = _search_args(model, calib, out)
    args[args.index("--drop-count") + 1] = "4"
    args[args.index("--generations") + 1] = "20"
    return args


def _result(run) -> dict:
    res = json.loads((Path(run) / "result.json").read_text())
    res.pop("wall_s")
    return res


def _same_run(a, b) -> None:
    assert (Path(a) / "history.jsonl").read_bytes() == (Path(b) / "history.jsonl").read_bytes()
    assert _result(a) == _result(b)
    assert (Path(a) / "calib.pt").read_bytes() == (Path(b) / "calib.pt").read_bytes()


def _lines(path) -> int:
    p = Path(path) / "history.jsonl"
    return p.read_text().count("\n") if p.exists() else 0


def _wait(cond, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def evo(capsys):
    """The CLI in-process -> (exit code, stdout, stderr lines)."""

    def run(*argv):
        capsys.readouterr()
        rc = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, [line for line in err.splitlines() if line.strip()]

    return run


@pytest.fixture(scope="module")
def reference(deep_model, calib_text, tmp_path_factory):
    """The undisturbed run every disturbed one must end as."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(_args(deep_model, calib_text, out)) == 0
    assert json.loads((out / "result.json").read_text())["evaluations"] > 40
    return out


def test_second_writer_refused_run_unchanged(deep_model, calib_text, reference, tmp_path, evo):
    """A search running in another process: resume and search of its directory are refused with its pid and
    change nothing; report reads the run in progress; the run ends as if undisturbed."""
    run = tmp_path / "run"
    p = subprocess.Popen(_cmd(*_args(deep_model, calib_text, run)), env=_env(0.1), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _lines(run) >= 3, "the first writer's evaluations")
        for argv in (["resume", run], _args(deep_model, calib_text, run)):
            rc, _, err = evo(*argv)
            assert rc == 2 and len(err) == 1, err
            assert err[0].startswith("evoprune: error: run directory") and f"pid {p.pid}" in err[0] and str(run) in err[0]
        assert holder(run) == p.pid
        rc, _, err = evo("report", run, "--out", tmp_path / "rep")
        assert rc == 0 and f"unfinished, in progress (pid {p.pid})" in (tmp_path / "rep" / "report.md").read_text()
        assert p.wait(timeout=300) == 0, p.stderr.read()
    finally:
        p.kill()
    assert holder(run) is None
    _same_run(run, reference)


def test_lock_in_process_changes_nothing(deep_model, calib_text, reference, tmp_path, evo):
    """A writer of this process holds the run: a second one is refused (naming this process) and writes nothing;
    a refused --out that did not exist is not left behind."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "result.json").unlink()
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    with writer_lock(run):
        rc, _, err = evo("resume", run)
        assert rc == 2 and len(err) == 1 and f"pid {os.getpid()}, this process" in err[0]
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before
    rc, _, err = evo(*_args(deep_model, calib_text, tmp_path / "new"), "--device", "nosuch")
    assert rc == 2 and not (tmp_path / "new").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_with_resume_line(deep_model, calib_text, reference, tmp_path, sig, evo):
    """SIGTERM (schedulers, systemd) stops a search as Ctrl-C does: one line naming the signal and the resume
    command, exit 128 + signal; resuming ends as the undisturbed run."""
    run = tmp_path / "run"
    # the child starts with default signal handling even when this test runs in a background job (`cmd &`), whose
    # shell leaves SIGINT ignored: an inherited ignore is honoured by evoprune, as it should be under nohup
    p = subprocess.Popen(_cmd(*_args(deep_model, calib_text, run)), env=_env(0.05), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait(lambda: _lines(run) >= 7, "evaluations to interrupt")
    p.send_signal(sig)
    err = [line for line in p.communicate(timeout=120)[1].splitlines() if line.strip()]
    assert p.returncode == 128 + sig
    assert err == [f"evoprune: interrupted ({sig.name}); continue with: evoprune resume {run}"]
    assert not (run / "result.json").exists() and holder(run) is None
    rc, _, _ = evo("resume", run)
    assert rc == 0
    _same_run(run, reference)


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell which file a write is for")
@pytest.mark.parametrize("target,at", [("history.jsonl", 7), ("env.jsonl", 1), ("state", 3)])
def test_full_disk_mid_run_then_resume(deep_model, calib_text, reference, tmp_path, monkeypatch, evo, target, at):
    """A write that fails with ENOSPC (a history row half-written, the environment record, a state save) ends the
    search with one line naming the file and the resume command, exit 1; the directory stays consistent (no torn
    line); once space is back, resume ends as the undisturbed run."""
    run = tmp_path / "run"
    calls = {"n": 0}
    real_write, real_fsync = os.write, os.fsync

    def full(fd):
        calls["n"] += 1
        return calls["n"] == at

    def write(fd, data):
        if _fd_path(fd) == os.path.realpath(run / target) and full(fd):
            real_write(fd, bytes(data)[: len(data) // 2])  # the disk fills up part-way through the row
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    def fsync(fd):  # a whole-file write (the state) fails when it is flushed to disk
        if Path(_fd_path(fd)).name.startswith(f".{target}.") and full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    rc, _, err = evo(*_args(deep_model, calib_text, run))
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith(f"evoprune: error: cannot write {run}/") and "No space left on device" in err[0]
    assert err[0].endswith(f"continue with: evoprune resume {run}")
    for name in ("history.jsonl", "env.jsonl"):  # every line whole
        if (run / name).exists():
            assert all(json.loads(line) for line in (run / name).read_text().splitlines())
            assert (run / name).read_bytes().endswith(b"\n") or not (run / name).read_bytes()
    assert not [f for f in run.iterdir() if f.name.startswith(".")]  # no temporary file left
    monkeypatch.undo()
    rc, _, err = evo("resume", run)
    assert rc == 0, err
    _same_run(run, reference)


def test_readers_of_an_unfinished_run(reference, tmp_path, evo):
    """ppl and export of a run in progress use its best full-fidelity candidate so far and say so; report and
    compare mark it; once no writer holds it, it is 'interrupted' with the command that continues it."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "result.json").unlink()
    state = json.loads((run / "state").read_text())
    key = state["strategy"]["best"][0]
    best = next(json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()
                if json.loads(line)["pattern"] == key)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    with writer_lock(run):
        rc, out, err = evo("ppl", "--model", run, "--dataset", f"text:{text}", "--seqlen", 32, "--max-windows", 2)
        assert rc == 0 and json.loads(out.splitlines()[-1])["dropped_layers"] == best["dropped"]
        assert any(f"unfinished, in progress (pid {os.getpid()})" in line for line in err)
        rc, out, _ = evo("export", run, "--out", tmp_path / "exp")
        rec = json.loads((tmp_path / "exp" / "pruning.json").read_text())
        assert rc == 0 and rec["dropped_layers"] == best["dropped"]
        assert rec["unfinished"] == {"status": f"in progress (pid {os.getpid()})",
                                     "evaluations": state["counters"]["evaluations"]}
    rc, out, err = evo("compare", run, "--out", tmp_path / "cmp")
    assert rc == 0 and err[0] == (f"note: run {run} is unfinished, interrupted (continue with: evoprune resume {run}): "
                                  f"showing its best candidate so far")


def test_worker_never_writes_the_run_directory(deep_model, calib_text, reference, tmp_path):
    """A Ray worker (its class, run in this process) builds its problem from copies of the run's files in a
    private scratch directory: it writes there, and opens nothing of the run directory for writing."""
    from evoprune.runner.config import SearchConfig
    from evoprune.runner.distributed import EvalWorker
    from evoprune.runner.rundir import RunDir

    cfg = SearchConfig.from_dict(RunDir(reference).read_config())
    files = {"calib.pt": (reference / "calib.pt").read_bytes()}
    written: list[str] = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
                written.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    try:
        before = {f.name: f.stat().st_mtime_ns for f in reference.iterdir()}
        worker = EvalWorker(cfg.to_dict(), files, threads=1, device="cpu")
        row = json.loads((reference / "history.jsonl").read_text().splitlines()[-1])
        genome = worker.problem.space.from_key(row["pattern"])
        loss = worker.evaluate(genome, row.get("stage"))[0]
    finally:
        active[0] = False
    assert loss == pytest.approx(row["loss"], abs=1e-6)
    assert any("evoprune-worker-" in w for w in written), written  # the hook saw the scratch copies
    assert not [w for w in written if os.path.realpath(w).startswith(os.path.realpath(reference))], written
    assert {f.name: f.stat().st_mtime_ns for f in reference.iterdir()} == before
