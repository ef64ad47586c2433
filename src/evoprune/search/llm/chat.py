"""One chat request to an OpenAI-compatible endpoint, with or without a structured-output schema.

Owns :func:`response_format` (the two dialects servers speak), :func:`is_refusal` and :func:`chat`, which
never raises for endpoint trouble: it returns :class:`Reply` (text, or error and whether the error was
the server refusing the ``response_format``). The ``openai`` client is imported on the first request.

Dialects of ``response_format``:

- ``json_schema``: ``{"type": "json_schema", "json_schema": {"name", "schema", "strict": true}}``, the
  OpenAI form (OpenAI, vLLM, SGLang, Ollama >= 0.5);
- ``json_object``: ``{"type": "json_object", "schema": ...}``, the form llama-cpp-python's server takes
  (it rejects ``json_schema`` with HTTP 500, and ``transformers serve`` rejects any ``response_format``
  with HTTP 422).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["DIALECTS", "Reply", "response_format", "is_refusal", "chat"]

DIALECTS = ("json_schema", "json_object")
# words of a server's error that mean "I do not take this response_format" (not a transient failure)
_REFUSAL_WORDS = ("response_format", "json_schema", "json_object", "literal_error", "unsupported", "not supported")


@dataclass(frozen=True)
class Reply:
    """What one request gave: ``text`` (``None`` on failure), ``error`` (one line), ``refused`` (the server
    would not take the ``response_format``), ``status`` (the HTTP status of an error, when there was one),
    ``served`` (what the server said of itself: the reply's ``model``, ``system_fingerprint`` and token
    ``usage``, for the record)."""

    text: str | None
    error: str | None = None
    refused: bool = False
    status: int | None = None
    served: dict | None = None


def response_format(dialect: str | None, schema: dict | None) -> dict | None:
    """The ``response_format`` request field of ``dialect`` for ``schema`` (``None``: no field)."""
    if dialect is None or schema is None:
        return None
    if dialect == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "configurations", "schema": schema, "strict": True}}
    if dialect == "json_object":
        return {"type": "json_object", "schema": schema}
    raise ValueError(f"unknown response_format dialect {dialect!r} (known: {', '.join(DIALECTS)})")


def is_refusal(status: int | None, message: str) -> bool:
    """Whether an HTTP error answering a request with a ``response_format`` means the server does not take it:
    a client error (400, 422) or any error that names the field, not a timeout or an overload."""
    if status in (400, 415, 422):
        return True
    low = message.lower()
    return status is not None and any(w in low for w in _REFUSAL_WORDS)


def chat(client_box: dict, config, messages: list[dict], *, max_tokens: int, fmt: dict | None,
         seed: int | None) -> Reply:
    """One request of ``messages`` to ``config.url`` (``client_box`` caches the client between calls)."""
    try:
        if client_box.get("client") is None:
            import openai

            client_box["client"] = openai.OpenAI(base_url=config.url, timeout=config.timeout_s, max_retries=0,
                                                 api_key=os.environ.get(config.api_key_env) or "not-needed")
        kw = {"response_format": fmt} if fmt is not None else {}
        if seed is not None:
            kw["seed"] = int(seed)
        resp = client_box["client"].chat.completions.create(
            model=config.model, messages=messages, temperature=config.temperature, max_tokens=max_tokens,
            extra_body=config.extra_body, **kw)
        text = resp.choices[0].message.content if resp.choices else None
        usage = getattr(resp, "usage", None)
        served = {"model": getattr(resp, "model", None), "fingerprint": getattr(resp, "system_fingerprint", None),
                  "completion_tokens": getattr(usage, "completion_tokens", None),
                  "prompt_tokens": getattr(usage, "prompt_tokens", None)}
    except Exception as e:  # any failure of the endpoint or its reply: counted, logged, retried
        status = getattr(e, "status_code", None)
        message = f"{type(e).__name__}: {e}"[:500]
        return Reply(None, message, refused=fmt is not None and is_refusal(status, str(e)), status=status)
    if not isinstance(text, str) or not text.strip():
        return Reply(None, "empty reply", served=served)
    return Reply(text, served=served)
