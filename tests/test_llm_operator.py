"""The Self-Pruner LLM operator: repair, parsing, prompts, faults of the endpoint, log replay, SmolLM2 serve."""
from __future__ import annotations

import builtins
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from evoprune.search.llm.operator import LLMOperator, OperatorConfig
from evoprune.search.llm.prompts import init_prompt, parse_reply, project_allocation, reply_schema, variation_prompt
from evoprune.search.llm.server import free_port
from evoprune.spaces import SearchError, repair_rates

L, BETA = 6, 0.3


# -- repair_rates ---------------------------------------------------------------------------


def test_repair_rates_projects_onto_mean_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        beta = float(rng.uniform(0, 1))
        r = rng.normal(beta, 0.6, size=n)
        x = np.array(repair_rates(r, beta))
        assert x.shape == (n,)
        assert abs(x.mean() - beta) < 1e-12
        assert x.min() >= 0 and x.max() <= 1
        assert repair_rates(x, beta) == tuple(x)  # idempotent
        # a projection: no feasible point we know of is closer than x
        y = np.array(repair_rates(np.clip(r, 0, 1), beta))
        assert np.linalg.norm(r - x) <= np.linalg.norm(r - y) + 1e-9


def test_repair_rates_keeps_valid_input_and_rejects_bad_args():
    v = (0.1, 0.5, 0.3, 0.3)
    assert repair_rates(v, 0.3) == v
    assert repair_rates([0.5, 0.5], 0.3) == pytest.approx((0.3, 0.3))  # uniform shift
    assert repair_rates([2.0, 0.0, 0.0], 0.5) == pytest.approx((1.0, 0.25, 0.25))
    assert repair_rates([1.0, 1.0], 1.0, 0, 1) == (1.0, 1.0)
    for bad in ([], [float("nan")], [[0.1]]):
        with pytest.raises(SearchError):
            repair_rates(bad, 0.3)
    with pytest.raises(SearchError):
        repair_rates([0.1], 1.5)


# -- parsing ----------------------------------------------------------------------------------


def good(i: int = 0) -> list[float]:
    """A valid 6-layer config of mean 0.3 (distinct for distinct i < 10)."""
    d = 0.01 * i
    return [0.1 + d, 0.2, 0.3, 0.4 - d, 0.5, 0.3]


def fmt(c) -> str:
    return "[" + ", ".join(f"{v:.5f}" for v in c) + "]"


def test_parse_messy_reply():
    text = ("Sure! Let's think step by step.\n```python\nConfiguration 1: " + fmt(good(0)) + "\n"
            "Configuration 2: " + fmt(good(1)).replace(", ", " ") + "  # spaces only\n```\n"
            "Nested: [" + fmt(good(2)) + ", " + fmt(good(3)) + "]\n"
            "too long by 1: [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]\n"
            "too long by 4: [0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]\n"
            "NaN: [0.3, nan, 0.3, 0.3, 0.3, 0.3]\n"
            "negative: [-0.01, 0.61, 0.3, 0.3, 0.3, 0.3]\n"
            "very negative: [-0.9, 0.5, 0.5, 0.5, 0.5, 0.5]\n"
            "mean off a little: [0.32, 0.32, 0.32, 0.32, 0.32, 0.32]\n"
            "mean off a lot: [0.6, 0.6, 0.6, 0.6, 0.6, 0.6]\n"
            "ellipsis: [0.1, 0.2, ..., 0.3]\nno digits: [see above] and a link [here](x)\n"
            "unterminated: [0.3, 0.3, 0.3")
    out = parse_reply(text, L, BETA)
    statuses = [p.status for p in out]
    assert statuses == ["valid"] * 4 + ["repaired", "invalid", "invalid", "repaired", "invalid", "repaired",
                                        "projected", "invalid"]
    assert [p.status for p in parse_reply(text, L, BETA, project=False)][10] == "invalid"
    assert out[10].miss == pytest.approx(0.3) and out[9].miss == pytest.approx(0.02)
    for _, c, _ in out:
        if c is not None:
            assert len(c) == L and min(c) >= 0 and max(c) <= 1
            assert abs(sum(c) / L - BETA) < 1e-9
            assert all(round(v, 5) == v for v in c)
    assert out[0][1] == pytest.approx(tuple(good(0)))
    assert out[4][1] == pytest.approx((0.3,) * 6)  # truncated
    assert parse_reply("", L, BETA) == [] and parse_reply(None, L, BETA) == []
    assert [p.status for p in parse_reply("[0.3, 0.3, 0.3, 0.3]", L, BETA)] == ["repaired"]  # padded with beta
    assert [p.status for p in parse_reply("[0.3, 0.3, 0.3]", L, BETA)] == ["invalid"]


def test_parse_never_evaluates_code(monkeypatch, tmp_path):
    marker = tmp_path / "pwned"

    def boom(*a, **k):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    text = (f"[__import__('os').system('touch {marker}')]\n[1+1, 0.3, 0.3, 0.3, 0.3, 0.3]\n"
            f"[0.3, 0.3, 0.3, 0.3, 0.3, float('0.3')]\n[1e999, 0.3, 0.3, 0.3, 0.3, 0.3]")
    out = parse_reply(text, L, BETA)
    assert len(out) >= 3 and all(p.status == "invalid" for p in out)
    assert not marker.exists()


def test_prompts_follow_the_paper():
    p = init_prompt("SmolLM2-135M", 30, 4, 0.3)
    assert "You are helping me prune the SmolLM2-135M" in p and "The model has 30 transformer layers" in p
    assert "generate 4 valid layer-wise pruning rate configurations" in p and "equals 0.30000" in p
    assert "accurate to 5 decimal places" in p and 'starting with "[" and ending with "]"' in p
    pop = [(good(0), 12.5), (good(1), float("inf"))]
    q = variation_prompt("crossover", "M", L, pop, 3, BETA)
    assert "perform the crossover operation" in q and "exactly 3 new configurations" in q
    assert "You will receive 2 lists" in q
    assert f"Configuration1: {fmt(good(0))}, Fitness1: 12.50000" in q and "Fitness2: inf" in q
    assert "perform the mutation operation" in variation_prompt("mutation", "M", L, pop, 3, BETA)


def test_config_validation():
    OperatorConfig(url="http://127.0.0.1:1/v1", model="m")
    for bad in (dict(url="127.0.0.1"), dict(model=""), dict(timeout_s=0), dict(max_retries=-1),
                dict(max_retries=True), dict(backoff_s=float("nan")), dict(call_budget=1.5), dict(temperature=3),
                dict(max_tokens=0), dict(tol=0), dict(repair_tol=-0.1), dict(api_key_env="A-B"),
                dict(extra_body={"model": "x"}), dict(extra_body={"a": float("nan")})):
        with pytest.raises(SearchError):
            OperatorConfig(**{"url": "http://x/v1", "model": "m", **bad})
    cfg = OperatorConfig(url="http://x/v1", model="m")
    with pytest.raises(SearchError):
        LLMOperator(cfg, n_layers=0, beta=0.3, model_name="M")
    op = LLMOperator(cfg, n_layers=L, beta=BETA, model_name="M")
    with pytest.raises(SearchError):
        op.mutate([(good(0)[:-1], 1.0)], 2)
    with pytest.raises(SearchError):
        op.crossover([], 2)
    with pytest.raises(SearchError):
        op.initialize(-1)


# -- a scripted fake endpoint ---------------------------------------------------------------


# how the servers users run answer a response_format they do not take (status, message), by dialect
DIALECTS = {
    "openai": {},  # OpenAI, vLLM, SGLang: json_schema (and json_object) accepted
    "llama.cpp": {"json_schema": (500, "1 validation error: {'type': 'literal_error', 'loc': ('body', "
                                       "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\"}")},
    "refuses": {"json_schema": (422, "Unsupported fields in the request: {'response_format'}"),
                "json_object": (422, "Unsupported fields in the request: {'response_format'}")},
    "ignores": {},  # transformers serve 5.x: takes the field and answers free text (see `free` below)
}


class FakeServer:
    """POST /v1/chat/completions answering from ``script`` (a list of actions, the last one repeats):
    ``("ok", text)``, ``("status", code)``, ``("sleep", seconds, text)``. Counts requests. ``dialect``: which
    ``response_format`` types it refuses, as the real server of that name does (:data:`DIALECTS`); a refused
    request consumes no script action."""

    def __init__(self, script, dialect="openai"):
        self.script, self.requests, self.bodies, self.refused = list(script), 0, [], 0
        refuse = DIALECTS[dialect]
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                outer.bodies.append(body)
                fmt = (body.get("response_format") or {}).get("type")
                if fmt in refuse:
                    outer.refused += 1
                    return self._send(refuse[fmt][0], {"error": {"message": refuse[fmt][1]}})
                action = outer.script[min(outer.requests, len(outer.script) - 1)]
                outer.requests += 1
                try:
                    if callable(action):  # a reply computed from the request
                        action = ("ok", action(body))
                    if action[0] == "status":
                        return self._send(action[1], {"error": {"message": "boom"}})
                    if action[0] == "sleep":
                        time.sleep(action[1])
                    text = action[-1]
                    self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body.get("model"),
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": text}}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    servers = []

    def make(script, dialect="openai"):
        servers.append(FakeServer(script, dialect))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def operator(url, log_path=None, **kw):
    cfg = OperatorConfig(url=url, model="fake", **{"timeout_s": 5, "max_retries": 2, "backoff_s": 0.01, **kw})
    return LLMOperator(cfg, n_layers=L, beta=BETA, model_name="TestLM", log_path=log_path)


def consistent(r):
    assert r.proposals == r.valid + r.repaired + r.projected + r.invalid
    assert r.valid + r.repaired + r.projected == len(r.configs) + r.duplicates + r.extra
    assert r.calls == r.replies + r.failed_calls
    assert r.missing == r.requested - len(r.configs) >= 0
    assert len(set(r.configs)) == len(r.configs)


def test_server_down_returns_empty_quickly():
    import openai  # noqa: F401  (its first import is slow on a loaded machine; not what is timed here)

    op = operator(f"http://127.0.0.1:{free_port()}/v1")
    t0 = time.monotonic()
    r = op.initialize(4)
    assert time.monotonic() - t0 < 10  # 3 refused connections + 0.03 s of backoff, not 3 timeouts of 5 s
    assert r.configs == [] and r.calls == r.failed_calls == 3 and r.missing == 4
    consistent(r)
    assert op.stats["failed_calls"] == 3


# the fault tests against both dialects: a llama.cpp server first refuses the json_schema form (one extra
# request, refused at once, consuming no script action), then takes json_object
BOTH = pytest.mark.parametrize("dialect", ["openai", "llama.cpp"])


def _refused(dialect):
    return 1 if dialect == "llama.cpp" else 0


@BOTH
def test_slow_server_times_out_then_gives_up(fake, dialect):
    srv = fake([("sleep", 3.0, fmt(good(0)))], dialect=dialect)
    op = operator(srv.url, timeout_s=0.3, max_retries=1)
    t0 = time.monotonic()
    r = op.initialize(2)
    assert time.monotonic() - t0 < 3
    assert r.configs == [] and r.failed_calls == 2 + _refused(dialect) and srv.requests == 2
    assert r.refused == _refused(dialect)


@BOTH
def test_http_500_then_good_reply(fake, dialect):
    srv = fake([("status", 500), ("ok", json_reply(good(0), good(1)))], dialect=dialect)
    op = operator(srv.url)
    r = op.initialize(2)
    assert r.configs == [pytest.approx(tuple(good(0))), pytest.approx(tuple(good(1)))]
    assert (r.calls, r.failed_calls, srv.requests) == (2 + _refused(dialect), 1 + _refused(dialect), 2)
    assert op.dialect == {"openai": "json_schema", "llama.cpp": "json_object"}[dialect]  # a 500 is not a refusal
    consistent(r)


@BOTH
def test_garbage_reply_counted_invalid(fake, dialect):
    srv = fake([("ok", "I cannot help with [that], but here: [0.1, 0.2] and [1, 2, 3, 4, 5, 6]")], dialect=dialect)
    r = operator(srv.url).initialize(3)
    x = _refused(dialect)
    assert r.configs == [] and r.valid == 0 and r.invalid == 6 and r.calls == 3 + x and r.failed_calls == x
    consistent(r)
    srv2 = fake([("ok", "   ")], dialect=dialect)  # empty content is a failed call
    r2 = operator(srv2.url, max_retries=0).initialize(3)
    assert r2.failed_calls == 1 + x and r2.proposals == 0


def test_good_reply_dedupes_and_caps(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-xyz")
    configs = [good(i) for i in range(5)]
    text = "```\n" + "\n".join(f"Configuration {i + 1}: {fmt(c)}" for i, c in enumerate(configs + [configs[1]])) + "\n```"
    srv = fake([("ok", text)])
    log = tmp_path / "llm.jsonl"
    op = operator(srv.url, log_path=log, extra_body={"seed": 7})
    key0 = "W6:" + ",".join(f"{v:.5f}" for v in good(0))
    r = op.mutate([(good(7), 10.0), (good(8), 11.0)], 3, seen=[key0])
    assert r.configs == [pytest.approx(tuple(c)) for c in configs[1:4]]
    assert r.counts["duplicates"] == 2 and r.counts["returned"] == 3
    with pytest.raises(SearchError):
        op.initialize(1, seen=["nope"])
    assert (r.proposals, r.valid, r.duplicates, r.extra, r.missing) == (6, 6, 2, 1, 0)
    consistent(r)
    body = srv.bodies[0]
    assert body["model"] == "fake" and "perform the mutation operation" in body["messages"][0]["content"]
    assert body["max_tokens"] == 3 * (9 * L + 16) + 64 and body["seed"] == 7
    assert "sk-secret" not in log.read_text()
    rec = json.loads(log.read_text())
    assert rec["call"] == 0 and rec["kind"] == "mutation" and rec["reply"] == text and rec["counts"]["valid"] == 6


@BOTH
def test_budget_exhausted_makes_no_call(fake, dialect):
    srv = fake([("ok", "garbage")], dialect=dialect)
    op = operator(srv.url, call_budget=2)
    r = op.initialize(2)
    assert r.calls == 2 and r.budget_exhausted and srv.requests == 2 - _refused(dialect)  # a refusal costs a call
    r2 = op.crossover([(good(0), 1.0)], 2)
    assert r2.calls == 0 and r2.configs == [] and r2.budget_exhausted and srv.requests == 2 - _refused(dialect)
    assert op.stats["budget_exhausted"] == 2 and op.stats["calls"] == 2


def test_replay_from_log(fake, tmp_path):
    pop = [(good(0), 5.0), (good(1), 6.0)]
    srv = fake([("status", 500), ("ok", fmt(good(2))), ("ok", fmt(good(3)) + fmt(good(4)))])
    log = tmp_path / "llm.jsonl"
    a = operator(srv.url, log_path=log)
    ra = a.initialize(1)
    state = a.state_dict()
    ma = a.mutate(pop, 2)
    assert srv.requests == 3 and len(log.read_text().splitlines()) == 3
    with open(log, "a") as f:
        f.write('{"call": 3, "kind": "torn')  # a kill mid-append

    b = operator(srv.url, log_path=log)  # fresh run on the same log: replays everything
    rb = b.initialize(1)
    mb = b.mutate(pop, 2)
    assert srv.requests == 3
    assert (rb.configs, mb.configs) == (ra.configs, ma.configs)
    assert (rb.failed_calls, rb.replayed, mb.replayed) == (1, 2, 1)
    assert log.read_text().endswith("\n") and len(log.read_text().splitlines()) == 3

    c = operator(srv.url, log_path=log)  # resumed from a saved state: continues at call 2
    c.load_state_dict(json.loads(json.dumps(state)))
    assert c.mutate(pop, 2).configs == ma.configs and srv.requests == 3
    assert c.stats == a.stats and c.stats["calls"] == 3  # as if never interrupted

    d = operator(srv.url, log_path=log)  # a different prompt at a logged index goes live
    d.load_state_dict(state)
    d.crossover(pop, 2)
    assert srv.requests == 4
    with pytest.raises(SearchError):
        d.load_state_dict({"calls": "x"})


# -- structured output ----------------------------------------------------------------------


def json_reply(*configs) -> str:
    return json.dumps({"configurations": [list(c) for c in configs]})


@pytest.mark.parametrize("dialect,used,requests", [("openai", "json_schema", 1), ("llama.cpp", "json_object", 2),
                                                   ("refuses", "plain", 3)])
def test_auto_finds_the_dialect_once_and_logs_it(fake, tmp_path, dialect, used, requests):
    srv = fake([("ok", json_reply(good(0), good(1)))], dialect=dialect)
    log = tmp_path / "llm.jsonl"
    op = operator(srv.url, log_path=log)
    r = op.initialize(2)
    assert len(r.configs) == 2 and op.dialect == used and len(srv.bodies) == requests
    assert (r.refused, r.failed_calls, r.replies) == (requests - 1, requests - 1, 1)
    consistent(r)
    sent = srv.bodies[-1].get("response_format")
    if used == "plain":
        assert sent is None
    else:
        assert sent["type"] == used
        schema = sent["json_schema"]["schema"] if used == "json_schema" else sent["schema"]
        assert schema == reply_schema(2, L)
        items = schema["properties"]["configurations"]
        assert (items["minItems"], items["items"]["minItems"], len(items["items"]["items"]["enum"])) == (2, L, 101)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r_["refused"] for r_ in rows] == [True] * (requests - 1) + [False]
    assert rows[-1]["request"]["dialect"] == used and rows[-1]["request"]["seed"] == requests - 1
    op.mutate([(good(3), 5.0)], 1)  # found once: the next call goes straight to the working dialect
    assert len(srv.bodies) == requests + 1 and srv.refused == requests - 1


def test_a_server_that_ignores_the_schema_is_found_out_from_its_answer(fake, tmp_path):
    free = "Sure: " + fmt(good(0)) + " and " + fmt(good(1))  # no JSON object: the schema was not enforced
    srv = fake([("ok", free)], dialect="ignores")
    log = tmp_path / "llm.jsonl"
    op = operator(srv.url, log_path=log)
    r = op.initialize(2)
    assert len(r.configs) == 2 and r.refused == 0 and op.dialect == "json_object"  # the reply still counted
    op.initialize(1, seen=r.configs)
    assert op.dialect == "plain" and "response_format" not in srv.bodies[-1] or op.dialect == "plain"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["request"]["dialect"], x["ignored"]) for x in rows[:2]] == [("json_schema", True), ("json_object", True)]
    op.initialize(1)
    assert "response_format" not in srv.bodies[-1]


def test_on_means_the_schema_or_nothing(fake):
    srv = fake([("ok", json_reply(good(0)))], dialect="refuses")
    op = operator(srv.url, structured="on")
    r = op.initialize(2)
    assert r.configs == [] and op.dialect == "refused" and srv.refused == 2 and r.refused == 2
    assert op.initialize(1).calls == 0 and op.stats["structured"] == "refused"  # no more requests
    srv2 = fake([("ok", fmt(good(0)))])
    off = operator(srv2.url, structured="off")
    assert len(off.initialize(1).configs) == 1 and "response_format" not in srv2.bodies[0]


def test_projection_keeps_the_llms_allocation(fake):
    """A reply of the right shape and range whose mean misses beta is scaled onto it, ratios kept."""
    raw = [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]  # mean 0.667
    srv = fake([("ok", json_reply(raw, [0.3] * 5 + [2.0], [0.0] * 6))])
    r = operator(srv.url, max_retries=0).initialize(3)
    assert (r.projected, r.invalid, len(r.configs)) == (1, 2, 1)  # out of range / all zero: not projected
    got = r.configs[0]
    assert sum(got) / L == pytest.approx(BETA, abs=1e-9) and got == project_allocation(raw, BETA)
    assert got[1] / got[0] == pytest.approx(2.0, rel=1e-3) and got[3] / got[1] == pytest.approx(2.0, rel=1e-3)
    assert r.miss_sum == pytest.approx(sum(raw) / L - BETA) and r.miss_max == r.miss_sum
    consistent(r)
    assert project_allocation([1.0] * 3 + [0.0] * 3, 0.6) == (1.0, 1.0, 1.0, 0.2, 0.2, 0.2)  # clipped, then on budget


def test_replay_matches_request_options(fake, tmp_path):
    srv = fake([("ok", json_reply(good(0)))], dialect="llama.cpp")
    log = tmp_path / "llm.jsonl"
    a = operator(srv.url, log_path=log)
    ra = a.initialize(1)
    b = operator(srv.url, log_path=log)  # the same run replayed: no request, same dialect path and result
    assert b.initialize(1).configs == ra.configs and len(srv.bodies) == 2 and b.dialect == "json_object"
    c = operator(srv.url, log_path=log, temperature=0.1)  # other options: not the logged request, goes live
    c.initialize(1)
    assert len(srv.bodies) > 2


# -- the real thing: transformers serve + SmolLM2-135M-Instruct ---------------------------------


@pytest.fixture(scope="module")
def smol_server():
    from evoprune.models.loading import cache_dir
    from evoprune.models.loading import load_pretrained as load_model
    from evoprune.search.llm.server import start_local_server

    d = cache_dir() / "models" / "smollm2-135m"  # where the alias is de-quantized once
    if not (d / "config.json").is_file():
        d = load_model("smollm2-135m", progress=False).path
    with start_local_server(d, startup_timeout_s=120) as srv:
        yield srv


def test_smollm2_serve_initialize(smol_server, tmp_path):
    cfg = OperatorConfig(url=smol_server.url, model=smol_server.model, max_tokens=96, max_retries=2, timeout_s=60)
    op = LLMOperator(cfg, n_layers=30, beta=0.3, model_name="SmolLM2-135M-Instruct", log_path=tmp_path / "llm.jsonl")
    r = op.initialize(4)
    consistent(r)
    # transformers serve takes response_format (5.2x) but answers free text: auto finds that out from the replies
    rows = [json.loads(x) for x in (tmp_path / "llm.jsonl").read_text().splitlines()]
    assert r.replies >= 1 and r.failed_calls == 0, rows
    assert [x["request"]["dialect"] for x in rows] == ["json_schema", "json_object", "plain"][:len(rows)]
    assert all(x["ignored"] or x["refused"] for x in rows[:2] if x["request"]["dialect"] != "plain")
    rec = rows[-1]
    assert rec["reply"] and rec["error"] is None
    print("\nSmolLM2 reply:", rec["reply"][:400], "\ncounts:", r.counts, "wall_s:", rec["wall_s"])
