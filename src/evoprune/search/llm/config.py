"""The LLM operator's configuration (the endpoint and its limits) and what one operator call returns.

Owns :class:`OperatorConfig` (the ``operator`` section of a Self-Pruner search; validated on construction,
``SearchError``) and :class:`OperatorResult`. Pure Python.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

import numpy as np

from ...options import opt
from ...spaces import SearchError
from .prompts import is_number

__all__ = ["OperatorConfig", "OperatorResult", "STRUCTURED", "COUNTS", "STATS"]

STRUCTURED = ("auto", "on", "off")
COUNTS = ("proposals", "valid", "repaired", "projected", "invalid", "duplicates", "extra")
STATS = ("calls", "replies", "failed_calls", "refused") + COUNTS + ("budget_exhausted",)


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _json_ok(x) -> bool:
    try:
        json.dumps(x, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


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
    structured: str = opt("auto", "structured output: auto (ask for the JSON schema, fall back to plain text when "
                                  "the endpoint refuses it) | on (schema or nothing) | off (plain text)",
                          flag="operator_structured", choices=STRUCTURED)
    project: bool = opt(True, "project a reply of the right shape and range whose mean misses the sparsity onto "
                              "it, keeping the LLM's ratios between layers", flag="operator_project")

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
        need(is_int(self.max_retries) and self.max_retries >= 0, f"max_retries must be an int >= 0, got {self.max_retries!r}")
        need(is_number(self.backoff_s) and self.backoff_s >= 0, f"backoff_s must be >= 0, got {self.backoff_s!r}")
        need(is_int(self.call_budget) and self.call_budget >= 0, f"call_budget must be an int >= 0, got {self.call_budget!r}")
        need(is_number(self.temperature) and 0 <= self.temperature <= 2, f"temperature must be in [0, 2], got {self.temperature!r}")
        need(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1),
             f"max_tokens must be None or an int >= 1, got {self.max_tokens!r}")
        need(is_number(self.tol) and 0 < self.tol < 1, f"tol must be in (0, 1), got {self.tol!r}")
        need(is_number(self.repair_tol) and 0 <= self.repair_tol < 1, f"repair_tol must be in [0, 1), got {self.repair_tol!r}")
        need(isinstance(self.dataset, str) and bool(self.dataset.strip()), f"dataset must be a non-empty name, got {self.dataset!r}")
        need(self.structured in STRUCTURED, f"structured must be one of {', '.join(STRUCTURED)}, got {self.structured!r}")
        need(self.extra_body is None or (isinstance(self.extra_body, dict) and _json_ok(self.extra_body)
                                         and not {"model", "messages"} & set(self.extra_body)),
             f"extra_body must be a JSON object without model/messages, got {self.extra_body!r}")

    def to_dict(self) -> dict:
        """JSON-serializable (holds the key's variable name, never the key)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OperatorResult:
    """What one operator call produced.

    ``configs``: at most ``requested`` usable, distinct configurations. Parse counts,
    summed over attempts: ``proposals`` (configurations found) = ``valid`` (accepted as
    given) + ``repaired`` + ``projected`` + ``invalid``; ``valid + repaired + projected``
    = ``len(configs)`` + ``duplicates`` (of each other or of ``seen``) + ``extra``
    (beyond the number requested). ``calls``: chat requests made or replayed,
    ``replies``: those that gave text, ``failed_calls``: those that errored or came back
    empty, ``refused``: requests the server refused for their ``response_format``,
    ``replayed``: those answered from the log. ``miss_sum`` / ``miss_max``: the distance
    ``|mean - beta|`` of the projected replies, as the LLM sent them.
    """

    kind: str
    requested: int
    configs: list[tuple[float, ...]] = field(default_factory=list)
    proposals: int = 0
    valid: int = 0
    repaired: int = 0
    projected: int = 0
    invalid: int = 0
    duplicates: int = 0
    extra: int = 0
    calls: int = 0
    replies: int = 0
    failed_calls: int = 0
    refused: int = 0
    replayed: int = 0
    miss_sum: float = 0.0
    miss_max: float = 0.0
    budget_exhausted: bool = False

    @property
    def missing(self) -> int:
        """How many of the requested configurations the caller must make otherwise."""
        return self.requested - len(self.configs)

    @property
    def counts(self) -> dict:
        """All counts as a dict (plus ``kind``, ``requested``, ``returned``, ``missing``), for logs."""
        d = {k: getattr(self, k) for k in STATS + ("replayed", "miss_sum", "miss_max")}
        return {"kind": self.kind, "requested": self.requested, "returned": len(self.configs), "missing": self.missing, **d}
