"""The LLM evolutionary operator of Self-Pruner: calls, retries, budget, counts, replay log.

Owns :class:`OperatorConfig` (the endpoint and its limits), :class:`LLMOperator`
(``initialize`` / ``mutate`` / ``crossover``, Figures 2-3 and Algorithm 1 of the
Self-Pruner paper) and :class:`OperatorResult`; the prompts, reply parsing and
:func:`repair_rates` live in :mod:`evoprune.search.llm.prompts` (re-exported here).
Torch-free; talks to any OpenAI-compatible chat endpoint through the ``openai``
client (imported lazily, on the first live request).

A *configuration* is a tuple of ``n_layers`` per-layer pruning rates in
``[0, 1]`` whose mean is ``beta``; returned ones are rounded to 5 decimals
(:data:`DECIMALS`, as in the prompt) with the mean kept at ``beta`` on that grid.

Contract of every operator call (``initialize``, ``mutate``, ``crossover``):

- It never raises on LLM misbehaviour. Timeouts, connection errors, HTTP errors
  and replies with no new usable configuration are retried up to
  ``max_retries`` times with backoff ``backoff_s * 2**i``; then the result just
  holds fewer configurations (the caller fills the rest with a non-LLM operator).
  Bad *arguments* (a population of the wrong shape, k < 0) raise ``SearchError``.
- Every chat request (attempt) counts against ``call_budget``; when it is spent
  no request is made and the result has ``budget_exhausted=True``.
- Returned configurations are valid, distinct from each other and from ``seen``
  (compared rounded to 5 decimals; ``seen`` holds rate sequences, objects with
  ``.rates`` or ``RateVector`` keys), at most the number requested.

Log and replay (resume): with ``log_path`` every attempt appends one JSON line
(``call`` index, ``kind``, ``attempt``, ``messages``, ``reply`` or ``error``,
``wall_s``, parse ``counts``; never the API key), flushed and fsynced; a torn last
line left by a kill is dropped on the next construction. A new operator on the
same ``log_path`` loads the logged attempts: when attempt number ``n`` is made
with messages identical to the logged attempt ``n``, the logged outcome is
reused without contacting the server (a logged reply is parsed again; a logged
error counts as a failed attempt again, without the backoff sleep), so a
killed-and-resumed search sees exactly the same replies. Attempt numbers
continue from :meth:`LLMOperator.state_dict`, which the caller stores with its own
search state and restores with :meth:`LLMOperator.load_state_dict`. A mismatching
prompt is sent live and its new line supersedes the logged one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ...files import append_jsonl, read_jsonl
from ...options import opt
from ...spaces import SearchError
from .prompts import DECIMALS, init_prompt, is_number, parse_reply, repair_rates, variation_prompt

__all__ = ["OperatorConfig", "OperatorResult", "LLMOperator", "repair_rates", "parse_reply",
           "init_prompt", "variation_prompt", "DECIMALS"]

_KEY_RE = re.compile(r"W\d+:([0-9.,]*)")
_COUNTS = ("proposals", "valid", "repaired", "invalid", "duplicates", "extra")
_STATS = ("calls", "failed_calls") + _COUNTS + ("budget_exhausted",)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _json_ok(x) -> bool:
    try:
        json.dumps(x, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _seen_key(c) -> tuple[float, ...]:
    """A seen configuration as rates rounded to ``DECIMALS``: a sequence of numbers, an object with
    ``.rates`` (``RateVector``) or a ``RateVector`` key ``"W3:0.10000,0.20000,0.30000"``."""
    if isinstance(c, str):
        m = _KEY_RE.fullmatch(c)
        c = m.group(1).split(",") if m else [c]
    c = getattr(c, "rates", c)
    try:
        return tuple(round(float(v), DECIMALS) for v in c)
    except (TypeError, ValueError):
        raise SearchError(f"seen must hold configurations (sequences of numbers or rate keys), got {c!r}") from None


@dataclass(frozen=True)
class OperatorConfig:
    """The chat endpoint and the operator's limits; validated on construction (``SearchError``).

    ``url``: OpenAI-compatible base URL (``http://127.0.0.1:8000/v1``); ``model``: the
    name sent to it; both may be ``None`` in a search configuration whose every LLM step is
    ablated (:class:`LLMOperator` needs them). The key is read from ``$api_key_env`` at call time and never
    stored; unset means ``"not-needed"`` (local servers do not check it).
    ``max_tokens=None`` sizes the reply limit per call for the number requested.
    ``tol``: accepted deviation of a reply's mean from ``beta``; ``repair_tol``: how
    far a reply may be off (mean, or values outside [0, 1]) and still be repaired.
    ``dataset`` is named in the initialization prompt. ``extra_body``: extra JSON fields
    sent with every request (server-specific; e.g. ``transformers serve`` samples only
    with ``{"generation_config": '{"do_sample": true}'}``, its models default to greedy).
    """

    url: str | None = opt(None, "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1", flag="operator_url")
    model: str | None = opt(None, "model name the endpoint serves", flag="operator_model")
    api_key_env: str = opt("OPENAI_API_KEY", "environment variable holding the API key (never stored)",
                           flag="operator_api_key_env")
    timeout_s: float = opt(120.0, "seconds per LLM request", flag="operator_timeout_s")
    max_retries: int = opt(3, "retries per LLM call", flag="operator_retries")
    backoff_s: float = opt(1.0, "first retry backoff in seconds (doubles per retry)", flag="operator_backoff_s")
    call_budget: int = opt(200, "most LLM requests per run", flag="operator_call_budget")
    temperature: float = opt(0.7, "sampling temperature", flag="operator_temperature")
    max_tokens: int | None = opt(None, "reply token cap (default: sized to the request)", flag="operator_max_tokens")
    tol: float = opt(1e-3, "accepted deviation of a reply's mean from the sparsity", flag="operator_tol")
    repair_tol: float = opt(0.05, "how far a reply may be off and still be repaired", flag="operator_repair_tol")
    dataset: str = opt("WikiText-2", "dataset named in the initialization prompt", flag="operator_dataset")
    extra_body: dict | None = opt(None, "extra JSON fields sent with every request (server-specific)", cli=False)

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise SearchError(f"LLM operator: {what}")

        need(self.url is None or (isinstance(self.url, str) and self.url.startswith(("http://", "https://"))),
             f"url must be an http(s) base URL, got {self.url!r}")
        need(self.model is None or (isinstance(self.model, str) and bool(self.model.strip())),
             f"model must be a non-empty name, got {self.model!r}")
        need(isinstance(self.api_key_env, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env or "") is not None,
             f"api_key_env must be an environment variable name, got {self.api_key_env!r}")
        need(is_number(self.timeout_s) and self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s!r}")
        need(_is_int(self.max_retries) and self.max_retries >= 0, f"max_retries must be an int >= 0, got {self.max_retries!r}")
        need(is_number(self.backoff_s) and self.backoff_s >= 0, f"backoff_s must be >= 0, got {self.backoff_s!r}")
        need(_is_int(self.call_budget) and self.call_budget >= 0, f"call_budget must be an int >= 0, got {self.call_budget!r}")
        need(is_number(self.temperature) and 0 <= self.temperature <= 2, f"temperature must be in [0, 2], got {self.temperature!r}")
        need(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
             f"max_tokens must be None or an int >= 1, got {self.max_tokens!r}")
        need(is_number(self.tol) and 0 < self.tol < 1, f"tol must be in (0, 1), got {self.tol!r}")
        need(is_number(self.repair_tol) and 0 <= self.repair_tol < 1, f"repair_tol must be in [0, 1), got {self.repair_tol!r}")
        need(isinstance(self.dataset, str) and bool(self.dataset.strip()), f"dataset must be a non-empty name, got {self.dataset!r}")
        need(self.extra_body is None or (isinstance(self.extra_body, dict) and _json_ok(self.extra_body)
                                         and not {"model", "messages"} & set(self.extra_body)),
             f"extra_body must be a JSON object without model/messages, got {self.extra_body!r}")

    def to_dict(self) -> dict:
        """JSON-serializable (holds the key's variable name, never the key)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OperatorResult:
    """What one operator call produced.

    ``configs``: at most ``requested`` valid, distinct configurations. Parse counts,
    summed over attempts: ``proposals`` (bracketed number lists found) =
    ``valid`` (accepted as given) + ``repaired`` + ``invalid``; ``valid + repaired``
    = ``len(configs)`` + ``duplicates`` (of each other or of ``seen``) + ``extra``
    (beyond the number requested). ``calls``: chat requests made or replayed,
    ``failed_calls``: those that errored or came back empty, ``replayed``: those
    answered from the log.
    """

    kind: str
    requested: int
    configs: list[tuple[float, ...]] = field(default_factory=list)
    proposals: int = 0
    valid: int = 0
    repaired: int = 0
    invalid: int = 0
    duplicates: int = 0
    extra: int = 0
    calls: int = 0
    failed_calls: int = 0
    replayed: int = 0
    budget_exhausted: bool = False

    @property
    def missing(self) -> int:
        """How many of the requested configurations the caller must make otherwise."""
        return self.requested - len(self.configs)

    @property
    def counts(self) -> dict:
        """All counts as a dict (plus ``kind``, ``requested``, ``returned``, ``missing``), for logs."""
        d = {k: getattr(self, k) for k in _STATS + ("replayed",)}
        return {"kind": self.kind, "requested": self.requested, "returned": len(self.configs), "missing": self.missing, **d}


# -- the operator -------------------------------------------------------------------------


class LLMOperator:
    """Self-Pruner's LLM initialization, mutation and crossover for ``n_layers`` rates of mean ``beta``.

    ``model_name`` is the pruned model named in the prompts (``{model}``). See the
    module docstring for the never-raise, budget and log/replay contract. The
    caller persists :meth:`state_dict` with its own state; :attr:`stats` are the
    cumulative counts over the operator's life (for ``result.json``).
    """

    def __init__(self, config: OperatorConfig, *, n_layers: int, beta: float, model_name: str,
                 log_path: str | os.PathLike | None = None) -> None:
        if not isinstance(config, OperatorConfig):
            raise SearchError(f"config must be an OperatorConfig, got {type(config).__name__}")
        if config.url is None or config.model is None:
            raise SearchError("the LLM operator needs --operator-url and --operator-model (an OpenAI-compatible chat "
                              "endpoint; the API key is read from $OPENAI_API_KEY)")
        if not (_is_int(n_layers) and n_layers >= 1):
            raise SearchError(f"n_layers must be an int >= 1, got {n_layers!r}")
        if not (is_number(beta) and 0.0 <= beta <= 1.0):
            raise SearchError(f"beta must be in [0, 1], got {beta!r}")
        if not (isinstance(model_name, str) and model_name.strip()):
            raise SearchError(f"model_name must be a non-empty name, got {model_name!r}")
        self.config, self.n_layers, self.beta, self.model_name = config, int(n_layers), float(beta), model_name
        self.log_path = None if log_path is None else Path(log_path)
        self._calls = 0
        self._stats = {k: 0 for k in _STATS}
        self._client = None
        self._sleep = time.sleep
        self._logged: dict[int, dict] = self._load_log() if self.log_path is not None else {}

    # -- public API --------------------------------------------------------------------

    def initialize(self, k: int, seen: Iterable[Sequence[float]] = ()) -> OperatorResult:
        """Ask for ``k`` initial configurations (Figure 2)."""
        self._check_count(k, "k")
        prompt = init_prompt(self.model_name, self.n_layers, k, self.beta, self.config.dataset)
        return self._run("init", prompt, k, seen)

    def mutate(self, population: Sequence[tuple[Sequence[float], float]], m: int,
               seen: Iterable[Sequence[float]] = ()) -> OperatorResult:
        """Ask for ``m`` mutants of ``population`` (``[(config, fitness), ...]``, lower fitness is better; Figure 3)."""
        return self._variation("mutation", population, m, seen)

    def crossover(self, population: Sequence[tuple[Sequence[float], float]], s: int,
                  seen: Iterable[Sequence[float]] = ()) -> OperatorResult:
        """Ask for ``s`` crossover offspring of ``population`` (Figure 3)."""
        return self._variation("crossover", population, s, seen)

    @property
    def stats(self) -> dict:
        """Cumulative counts: calls, failed_calls, proposals, valid, repaired, invalid, duplicates,
        extra, budget_exhausted (operator calls refused for lack of budget). Replayed attempts
        count like live ones, so a resumed run ends with the stats of an uninterrupted one."""
        return dict(self._stats)

    def state_dict(self) -> dict:
        """JSON-serializable: the attempt counter (replay index) and :attr:`stats`."""
        return {"calls": self._calls, "stats": dict(self._stats)}

    def load_state_dict(self, d: dict) -> None:
        try:
            calls, stats = int(d["calls"]), {k: int(d["stats"].get(k, 0)) for k in _STATS}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SearchError(f"corrupted LLM operator state ({type(e).__name__}: {e})") from e
        self._calls, self._stats = calls, stats

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- internals ------------------------------------------------------------------------

    @staticmethod
    def _check_count(k, name: str) -> None:
        if not (_is_int(k) and k >= 0):
            raise SearchError(f"{name} must be an int >= 0, got {k!r}")

    def _variation(self, op: str, population, m: int, seen) -> OperatorResult:
        self._check_count(m, "m" if op == "mutation" else "s")
        pop = []
        for item in population:
            try:
                c, f = item
                c = [float(v) for v in c]
                f = float(f)
            except (TypeError, ValueError):
                raise SearchError(f"population items must be (config, fitness) pairs, got {item!r}") from None
            if len(c) != self.n_layers or not all(math.isfinite(v) for v in c):
                raise SearchError(f"population configs need {self.n_layers} finite rates, got {c!r}")
            pop.append((c, f))
        if not pop:
            raise SearchError(f"{op} needs a non-empty population")
        return self._run(op, variation_prompt(op, self.model_name, self.n_layers, pop, m, self.beta), m, seen)

    def _max_tokens(self, k: int) -> int:
        # a cap, not a cost: "0.12345, " is ~4 tokens for GPT-4o, ~9 for digit-wise tokenizers
        # (SmolLM2, Llama); plus a label per list and the reply's framing
        return self.config.max_tokens or k * (9 * self.n_layers + 16) + 64

    def _run(self, kind: str, prompt: str, k: int, seen) -> OperatorResult:
        taken = {_seen_key(c) for c in seen}
        messages = [{"role": "user", "content": prompt}]
        counts = dict.fromkeys(_COUNTS + ("calls", "failed_calls", "replayed"), 0)
        configs: list[tuple[float, ...]] = []
        exhausted = False
        if k > 0:
            for attempt in range(self.config.max_retries + 1):
                if self._calls >= self.config.call_budget:
                    exhausted = True
                    break
                new = self._attempt(kind, attempt, messages, k, taken, configs, counts)
                if new > 0 or len(configs) >= k or attempt == self.config.max_retries:
                    break
        if exhausted:
            self._stats["budget_exhausted"] += 1
        return OperatorResult(kind=kind, requested=k, configs=configs, budget_exhausted=exhausted, **counts)

    def _attempt(self, kind, attempt, messages, k, taken, configs, counts) -> int:
        """One chat request (live or replayed); parses into ``configs``; returns how many it added."""
        n = self._calls
        self._calls += 1
        logged = self._logged.get(n)
        t0 = time.monotonic()
        if (logged is not None and logged.get("messages") == messages
                and (isinstance(logged.get("reply"), str) or isinstance(logged.get("error"), str))):
            reply, error, replayed = logged.get("reply"), logged.get("error"), True
        else:
            if attempt > 0 and self.config.backoff_s > 0:
                self._sleep(self.config.backoff_s * 2 ** (attempt - 1))
                t0 = time.monotonic()
            reply, error = self._chat(messages, self._max_tokens(k))
            replayed = False
        wall = time.monotonic() - t0
        local = dict.fromkeys(_COUNTS, 0)
        added = 0
        if error is None:
            for status, cfg in parse_reply(reply, self.n_layers, self.beta, tol=self.config.tol,
                                           repair_tol=self.config.repair_tol):
                local["proposals"] += 1
                local[status] += 1
                if cfg is None:
                    continue
                if cfg in taken:
                    local["duplicates"] += 1
                elif len(configs) >= k:
                    local["extra"] += 1
                else:
                    taken.add(cfg)
                    configs.append(cfg)
                    added += 1
        failed = int(error is not None)
        for d in (counts, self._stats):
            for key, v in local.items():
                d[key] += v
            d["calls"] += 1
            d["failed_calls"] += failed
        counts["replayed"] += int(replayed)
        if not replayed:
            self._log({"call": n, "kind": kind, "attempt": attempt, "model": self.config.model,
                       "messages": messages, "reply": reply, "error": error, "wall_s": round(wall, 3),
                       "counts": {**local, "added": added}})
        return added

    def _chat(self, messages: list[dict], max_tokens: int) -> tuple[str | None, str | None]:
        """``(reply, None)`` or ``(None, error)``; never raises for endpoint trouble."""
        try:
            if self._client is None:
                import openai

                self._client = openai.OpenAI(base_url=self.config.url, timeout=self.config.timeout_s, max_retries=0,
                                             api_key=os.environ.get(self.config.api_key_env) or "not-needed")
            resp = self._client.chat.completions.create(model=self.config.model, messages=messages,
                                                        temperature=self.config.temperature, max_tokens=max_tokens,
                                                        extra_body=self.config.extra_body)
            text = resp.choices[0].message.content if resp.choices else None
        except Exception as e:  # any failure of the endpoint or its reply: counted, logged, retried
            return None, f"{type(e).__name__}: {e}"[:500]
        if not isinstance(text, str) or not text.strip():
            return None, "empty reply"
        return text, None

    def _load_log(self) -> dict[int, dict]:
        """Logged attempts by call index (the last line for an index wins); a torn tail is cut off the file."""
        try:
            rows = read_jsonl(self.log_path, cut_torn_tail=True)
        except ValueError as e:
            raise SearchError(f"corrupted LLM call log: {e}") from None
        out: dict[int, dict] = {}
        for rec in rows:
            try:
                out[int(rec["call"])] = rec
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def _log(self, rec: dict) -> None:
        if self.log_path is None:
            return
        self._logged[rec["call"]] = rec
        append_jsonl(self.log_path, rec)
