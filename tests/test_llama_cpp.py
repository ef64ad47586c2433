"""Self-Pruner against a real schema-enforcing endpoint: llama.cpp's server on the bundled SmolLM2-135M-Instruct GGUF.

The server (``llama-cpp-python[server]``, built by ``make setup``) is started once for the module. The
model being pruned is a tiny llama (6 blocks), so a run is a few LLM calls of ~3-5 s each. Skipped, with
the reason, only where llama-cpp-python is not installed (``make setup LLAMA_CPP=0``).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest

from tests.test_llm_operator import FakeServer
from tests.test_run import _cmd, _env, _kill_resume
from tests.test_width_search import _width_args

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                reason="llama-cpp-python not installed (make setup LLAMA_CPP=0 skips it)")


@pytest.fixture(scope="module")
def llama_server():
    from evoprune.models.loading import gguf_file
    from evoprune.search.llm.server import start_llama_cpp_server

    with start_llama_cpp_server(gguf_file("smollm2-135m"), threads=1, startup_timeout_s=300) as srv:
        yield srv


def _run(args, timeout=600):
    r = subprocess.run(_cmd(*args), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_llama_cpp_schema_makes_the_llm_contribute(llama_server, tiny_dirs, calib_text, tmp_path):
    """Schema on: every proposal is usable, the LLM's children are evaluated, and the run is not evo's run."""
    model = tiny_dirs["llama"]
    op = ["--operator-url", llama_server.url, "--operator-model", llama_server.model, "--operator-structured", "on"]
    _run(_width_args(model, calib_text, tmp_path / "sp", "self-pruner", op))
    _run(_width_args(model, calib_text, tmp_path / "evo", "evo", ["--probe", "0", "--tokens-per-stage", "none"]))
    res = json.loads((tmp_path / "sp" / "result.json").read_text())
    llm = res["llm"]
    assert llm["structured"] == "json_object" and llm["refused"] == 1  # json_schema refused once, then json_object
    assert llm["proposals"] >= 4 + 2 * 3 * 2 and llm["usable_share"] >= 0.95, llm
    assert llm["valid"] + llm["repaired"] + llm["projected"] + llm["invalid"] == llm["proposals"]
    assert llm["used"] >= 8 and llm["evaluated"] == llm["used"]
    for kind in ("init", "mutation", "crossover"):
        assert llm["by_kind"][kind]["replies"] >= 1, kind
    sp, evo = _rows(tmp_path / "sp" / "history.jsonl"), _rows(tmp_path / "evo" / "history.jsonl")
    assert len(sp) == len(evo) == 4 + 3 * 4
    assert [r["pattern"] for r in sp] != [r["pattern"] for r in evo]  # same seed: the LLM's proposals were used
    assert sum(r["origin"].startswith("llm-") for r in sp) == llm["used"]
    calls = _rows(tmp_path / "sp" / "llm_calls.jsonl")
    took = [c for c in calls if c["reply"] is not None]
    assert all(c["request"]["response_format"]["type"] == "json_object" and "schema" in c["request"]["response_format"]
               and isinstance(c["request"]["seed"], int) for c in took)
    assert all(c["served"]["model"] and c["served"]["completion_tokens"] > 0 for c in took)
    for c in took:  # the grammar held: exactly the requested shape, every value on the 0.01 grid in [0, 1]
        conf = json.loads(c["reply"])["configurations"]
        assert all(len(x) == 6 and all(0 <= v <= 1 for v in x) for x in conf)


def test_llama_cpp_kill_and_resume_replays(llama_server, tiny_dirs, calib_text, tmp_path):
    """kill -9 after the last LLM call / resume == uninterrupted; an earlier kill resumes and replays what was logged."""
    model = tiny_dirs["llama"]
    op = ["--operator-url", llama_server.url, "--operator-model", llama_server.model]
    ref = tmp_path / "ref"
    _run(_width_args(model, calib_text, ref, "self-pruner", op))
    late = tmp_path / "late"  # killed in the last generation: every reply comes from the log on resume
    _kill_resume(_width_args(model, calib_text, late, "self-pruner", op), late, [14])
    assert (late / "history.jsonl").read_text() == (ref / "history.jsonl").read_text()
    a, b = (json.loads((d / "result.json").read_text()) for d in (ref, late))
    assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}
    early = tmp_path / "early"  # killed in generation 1: later calls are new requests (llama.cpp is seeded)
    _kill_resume(_width_args(model, calib_text, early, "self-pruner", op), early, [5])
    calls = _rows(early / "llm_calls.jsonl")
    assert [c["call"] for c in calls] == list(range(len(calls))) == list(range(a["llm"]["calls"]))
    assert (early / "history.jsonl").read_text() == (ref / "history.jsonl").read_text()


def test_llama_cpp_timeouts_fall_back_and_say_so(llama_server, tiny_dirs, calib_text, tmp_path):
    """A real server too slow for --operator-timeout-s: the run completes on the fallback operators and says so."""
    op = ["--operator-url", llama_server.url, "--operator-model", llama_server.model, "--operator-timeout-s", "0.05",
          "--operator-retries", "0"]
    r = _run(_width_args(tiny_dirs["llama"], calib_text, tmp_path / "t", "self-pruner", op))
    llm = json.loads(r.stdout.strip().splitlines()[-1])["llm"]
    assert llm["used"] == 0 and llm["fallback"] == 4 + 3 * 4 and llm["failed_calls"] >= 7
    assert "note: the LLM operator gave 0 of 16 children" in r.stderr and "failed calls" in llm["note"]


@pytest.mark.parametrize("dialect", ["openai", "llama.cpp", "refuses"])
def test_run_completes_on_fallback_for_every_fault(tiny_dirs, calib_text, tmp_path, dialect):
    """HTTP 500, a garbage reply and a timeout (and, for ``refuses``, the schema refused): a complete run, on the
    fallback operators, with the reason in result.json and on stderr."""
    srv = FakeServer([("status", 500), ("ok", "no numbers here"), ("sleep", 2.0, "[0.4]")], dialect=dialect)
    try:
        op = ["--operator-url", srv.url, "--operator-model", "fake", "--operator-timeout-s", "0.5",
              "--operator-retries", "2", "--operator-backoff-s", "0"]
        r = _run(_width_args(tiny_dirs["llama"], calib_text, tmp_path / "f", "self-pruner", op))
    finally:
        srv.close()
    llm = json.loads(r.stdout.strip().splitlines()[-1])["llm"]
    assert llm["used"] == 0 and llm["fallback"] == 16 and r.stderr.count("note: ") == 1
    assert llm["failed_calls"] >= 2 and "failed calls" in llm["note"]
    # the garbage reply to a schema request counts as the schema ignored: the next dialect (openai: json_schema ->
    # json_object; llama.cpp: json_schema refused, json_object ignored -> plain text; refuses: both refused)
    assert llm["structured"] == {"openai": "json_object", "llama.cpp": "plain", "refuses": "plain"}[dialect]
    assert (llm["refused"] > 0) == (dialect != "openai")


def test_dead_endpoint_run_completes(tiny_dirs, calib_text, tmp_path):
    from evoprune.search.llm.server import free_port

    op = ["--operator-url", f"http://127.0.0.1:{free_port()}/v1", "--operator-model", "x", "--operator-retries", "0"]
    r = _run(_width_args(tiny_dirs["llama"], calib_text, tmp_path / "d", "self-pruner", op))
    llm = json.loads(r.stdout.strip().splitlines()[-1])["llm"]
    assert llm["used"] == 0 and llm["failed_calls"] == llm["calls"] >= 7 and "gave 0 of 16" in r.stderr
