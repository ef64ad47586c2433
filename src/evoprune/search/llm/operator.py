"""The LLM evolutionary operator of Self-Pruner: structured requests, retries, budget, counts, replay log.

Owns :class:`LLMOperator` (``initialize`` / ``mutate`` / ``crossover``, Figures 2-3 and Algorithm 1 of the
Self-Pruner paper). Its configuration and results are :mod:`.config`'s, the prompts, the reply parsing
and the budget projection :mod:`.prompts`', one HTTP request :mod:`.chat`'s. Torch-free.

A *configuration* is a tuple of ``n_layers`` per-layer pruning rates in ``[0, 1]`` whose mean is
``beta``, on the 5-decimal grid (:data:`DECIMALS`).

Structured output (``structured``): the prompt is the paper's; with ``auto`` or ``on`` the request also
carries a ``response_format`` holding :func:`~.prompts.reply_schema` (``k`` configurations of exactly
``n_layers`` rates in 0, 0.01, ..., 1). The dialect is found once per operator: ``json_schema`` (the
OpenAI form) first, then ``json_object`` + ``schema`` (llama-cpp-python's server) when the first is
refused (an HTTP error naming the field, or 400/422) or ignored (a reply that is not the schema's JSON
object: ``transformers serve`` 5.x accepts the field and answers free text); when both fail, ``auto``
continues with plain requests (today's prompt-and-parse) and ``on`` with none (the search's fallback
operators make the configurations). A refusal is one logged request and is not retried; an ignored
request's reply is still parsed. The first dialect whose reply conforms is kept for the run. The dialect
in use is :attr:`dialect` (``None`` before the first request, ``"plain"``, ``"refused"``), saved in
:meth:`state_dict`.

Contract of every operator call:

- It never raises on LLM misbehaviour. Timeouts, connection errors, HTTP errors and replies with no new
  usable configuration are retried up to ``max_retries`` times with backoff ``backoff_s * 2**i``; then the
  result just holds fewer configurations (the caller fills the rest with a non-LLM operator). Bad
  *arguments* (a population of the wrong shape, k < 0) raise ``SearchError``.
- Every chat request counts against ``call_budget``; when it is spent no request is made and the result
  has ``budget_exhausted=True``.
- Returned configurations are usable (valid, repaired or projected; see :func:`~.prompts.parse_reply`),
  distinct from each other and from ``seen``, at most the number requested.
- Request ``n`` carries ``seed = seed * 1_000_003 + n`` (servers that honour it sample reproducibly).

Log and replay (resume): with ``log_path`` every request appends one JSON line (``call`` index, ``kind``,
``attempt``, ``model``, ``messages``, ``request`` (the options sent: temperature, max_tokens, seed,
``response_format``), ``reply`` or ``error``, ``refused``, ``wall_s``, parse ``counts``; never the API
key), flushed and fsynced; a torn last line left by a kill is cut off on the next construction. A new
operator on the same ``log_path`` reuses logged request ``n`` when request ``n`` has identical messages and
options: the logged reply is parsed again, a logged error counts again (without the backoff sleep), so a
killed-and-resumed search sees exactly the same replies. Request numbers continue from
:meth:`state_dict`, which the caller stores with its own state.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Iterable, Sequence

from ...files import append_jsonl, read_jsonl
from ...spaces import SearchError
from .chat import chat, response_format
from .config import COUNTS, STATS, OperatorConfig, OperatorResult, is_int
from .prompts import DECIMALS, init_prompt, is_number, parse_reply, reply_schema, variation_prompt

__all__ = ["LLMOperator", "OperatorConfig", "OperatorResult", "DIALECT_ORDER"]

_KEY_RE = re.compile(r"W\d+:([0-9.,]*)")
DIALECT_ORDER = ("json_schema", "json_object")


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


def _conforms(reply: str | None) -> bool:
    """Whether ``reply`` is the schema's JSON object (``{"configurations": [[...], ...]}``), i.e. the server
    enforced the ``response_format``; parsed as data only."""
    try:
        obj = json.loads(reply or "")
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("configurations"), list)


class LLMOperator:
    """Self-Pruner's LLM initialization, mutation and crossover for ``n_layers`` rates of mean ``beta``.

    ``model_name`` is the pruned model named in the prompts (``{model}``); ``seed`` seeds the requests. See
    the module docstring for structured output and the never-raise, budget and log/replay contract.
    :attr:`stats` are the cumulative counts over the operator's life (:data:`~.config.STATS`).
    """

    def __init__(self, config: OperatorConfig, *, n_layers: int, beta: float, model_name: str,
                 log_path: str | os.PathLike | None = None, seed: int = 0) -> None:
        if not isinstance(config, OperatorConfig):
            raise SearchError(f"config must be an OperatorConfig, got {type(config).__name__}")
        if config.url is None or config.model is None:
            raise SearchError("the LLM operator needs --operator-url and --operator-model (an OpenAI-compatible chat "
                              "endpoint; the API key is read from $OPENAI_API_KEY)")
        if not (is_int(n_layers) and n_layers >= 1):
            raise SearchError(f"n_layers must be an int >= 1, got {n_layers!r}")
        if not (is_number(beta) and 0.0 <= beta <= 1.0):
            raise SearchError(f"beta must be in [0, 1], got {beta!r}")
        if not (isinstance(model_name, str) and model_name.strip()):
            raise SearchError(f"model_name must be a non-empty name, got {model_name!r}")
        self.config, self.n_layers, self.beta, self.model_name = config, int(n_layers), float(beta), model_name
        self.seed = int(seed)
        self.log_path = None if log_path is None else Path(log_path)
        self._calls = 0
        self._stats = {k: 0 for k in STATS}
        self.dialect: str | None = "plain" if config.structured == "off" else None
        self._confirmed = config.structured == "off"  # a dialect is kept once a reply conforms to the schema
        self._client: dict = {}
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
        """Cumulative counts (replayed requests count like live ones, so a resumed run ends with the stats of an
        uninterrupted one) and the ``structured`` dialect in use."""
        return {**self._stats, "structured": self.dialect}

    def state_dict(self) -> dict:
        """JSON-serializable: the request counter (replay index), :attr:`stats` and the dialect."""
        return {"calls": self._calls, "stats": dict(self._stats), "dialect": self.dialect, "confirmed": self._confirmed}

    def load_state_dict(self, d: dict) -> None:
        try:
            calls, stats = int(d["calls"]), {k: int(d["stats"].get(k, 0)) for k in STATS}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SearchError(f"corrupted LLM operator state ({type(e).__name__}: {e})") from e
        self._calls, self._stats = calls, stats
        self.dialect = d.get("dialect", self.dialect)
        self._confirmed = bool(d.get("confirmed", self._confirmed))

    def close(self) -> None:
        if self._client.get("client") is not None:
            self._client.pop("client").close()

    # -- internals ------------------------------------------------------------------------

    @staticmethod
    def _check_count(k, name: str) -> None:
        if not (is_int(k) and k >= 0):
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
        counts = dict.fromkeys(COUNTS + ("calls", "replies", "failed_calls", "refused", "replayed"), 0)
        counts.update(miss_sum=0.0, miss_max=0.0)
        configs: list[tuple[float, ...]] = []
        exhausted, attempt = False, 0
        while k > 0 and attempt <= self.config.max_retries:
            if self._calls >= self.config.call_budget:
                exhausted = True
                break
            if self.dialect == "refused":  # structured output required, and the endpoint takes none
                break
            new, refused = self._attempt(kind, attempt, messages, k, taken, configs, counts)
            if refused:  # the next dialect, not a retry
                continue
            if new > 0 or len(configs) >= k:
                break
            attempt += 1
        if exhausted:
            self._stats["budget_exhausted"] += 1
        return OperatorResult(kind=kind, requested=k, configs=configs, budget_exhausted=exhausted, **counts)

    def _request(self, n: int, k: int) -> dict:
        """The options of request ``n`` (logged with it, and compared on replay)."""
        dialect = DIALECT_ORDER[0] if self.dialect is None else self.dialect
        fmt = response_format(dialect, reply_schema(k, self.n_layers)) if dialect in DIALECT_ORDER else None
        return {"temperature": self.config.temperature, "max_tokens": self._max_tokens(k),
                "seed": self.seed * 1_000_003 + n, "response_format": fmt, "dialect": dialect}

    def _attempt(self, kind, attempt, messages, k, taken, configs, counts) -> tuple[int, bool]:
        """One request (live or replayed), parsed into ``configs``: ``(configurations added, refused)``."""
        n = self._calls
        self._calls += 1
        req = self._request(n, k)
        logged = self._logged.get(n)
        t0 = time.monotonic()
        if (logged is not None and logged.get("messages") == messages and logged.get("request") == req
                and (isinstance(logged.get("reply"), str) or isinstance(logged.get("error"), str))):
            reply, error, refused, replayed = logged.get("reply"), logged.get("error"), bool(logged.get("refused")), True
            served = logged.get("served")
        else:
            if attempt > 0 and self.config.backoff_s > 0:
                self._sleep(self.config.backoff_s * 2 ** (attempt - 1))
                t0 = time.monotonic()
            r = chat(self._client, self.config, messages, max_tokens=req["max_tokens"], fmt=req["response_format"],
                     seed=req["seed"])
            reply, error, refused, replayed, served = r.text, r.error, r.refused, False, r.served
        local = self._parse(reply, k, taken, configs) if error is None else dict.fromkeys(COUNTS, 0)
        added = local.pop("added", 0)
        miss = local.pop("miss", [])
        for d in (counts, self._stats):
            for key, v in local.items():
                d[key] += v
            d["calls"] += 1
            d["replies"] += int(error is None)
            d["failed_calls"] += int(error is not None)
            d["refused"] += int(refused)
        counts["replayed"] += int(replayed)
        counts["miss_sum"] += sum(miss)
        counts["miss_max"] = max([counts["miss_max"], *miss])
        ignored = False
        if refused:
            self._next_dialect(req["dialect"])
        elif error is None and req["dialect"] in DIALECT_ORDER and not self._confirmed:
            ignored = not _conforms(reply)
            if ignored:  # accepted but not enforced: the next dialect (the reply itself was parsed above)
                self._next_dialect(req["dialect"])
            else:
                self.dialect, self._confirmed = req["dialect"], True
        if not replayed:
            self._log({"call": n, "kind": kind, "attempt": attempt, "model": self.config.model, "messages": messages,
                       "request": req, "reply": reply, "error": error, "refused": refused, "ignored": ignored,
                       "served": served, "wall_s": round(time.monotonic() - t0, 3), "counts": {**local, "added": added}})
        return added, refused

    def _next_dialect(self, failed: str) -> None:
        """After the endpoint refused or ignored ``failed``: the next dialect, then plain text (``auto``) or none
        (``on``)."""
        later = DIALECT_ORDER[DIALECT_ORDER.index(failed) + 1:] if failed in DIALECT_ORDER else ()
        self.dialect = later[0] if later else ("plain" if self.config.structured == "auto" else "refused")
        self._confirmed = not later

    def _parse(self, reply: str, k: int, taken: set, configs: list) -> dict:
        """Counts of one reply's proposals; usable new ones are appended to ``configs``."""
        local = dict.fromkeys(COUNTS, 0)
        local.update(added=0, miss=[])
        for p in parse_reply(reply, self.n_layers, self.beta, tol=self.config.tol, repair_tol=self.config.repair_tol,
                             project=self.config.project):
            local["proposals"] += 1
            local[p.status] += 1
            if p.status == "projected":
                local["miss"].append(p.miss)
            if p.config is None:
                continue
            if p.config in taken:
                local["duplicates"] += 1
            elif len(configs) >= k:
                local["extra"] += 1
            else:
                taken.add(p.config)
                configs.append(p.config)
                local["added"] += 1
        return local

    def _load_log(self) -> dict[int, dict]:
        """Logged requests by call index (the last line for an index wins); a torn tail is cut off the file."""
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
