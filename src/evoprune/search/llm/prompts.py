"""Self-Pruner's prompts and the parsing and repair of LLM replies: pure text and numbers.

Owns the prompt builders :func:`init_prompt` (Figure 2 of the Self-Pruner paper)
and :func:`variation_prompt` (Figure 3), the reply parser :func:`parse_reply`
(regular expressions only, never ``eval``) and :data:`DECIMALS`; repairs use
:func:`evoprune.space.repair_rates` / :func:`~evoprune.space.snap_rates`. No I/O, no torch; used by
:mod:`evoprune.search.llm.operator`.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np

from ...spaces import SearchError, repair_rates, snap_rates

__all__ = ["DECIMALS", "init_prompt", "variation_prompt", "parse_reply", "repair_rates", "is_number"]

DECIMALS = 5
_Q = 10 ** DECIMALS
_LIST_RE = re.compile(r"\[([^\[\]]*)\]")  # innermost bracketed groups
_NUM_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_SEP_RE = re.compile(r"[,;\s]+")


def is_number(x) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.{DECIMALS}f}" for v in values) + "]"


def _attributes(n_layers: int, beta: float) -> str:
    return ("### Solution attributes ###\n"
            f"- Contain {n_layers} decimals between 0 and 1, accurate to {DECIMALS} decimal places.\n"
            f"- Ensure the average of these numbers equals {beta:.{DECIMALS}f}.\n"
            '- Be distinct, starting with "[" and ending with "]".\n')


def init_prompt(model: str, n_layers: int, k: int, beta: float, dataset: str = "WikiText-2") -> str:
    """The population-initialization prompt (Figure 2 of the paper)."""
    return ("### Problem description and task instruction ###\n"
            f"Let's think step by step! You are helping me prune the {model}, aiming to minimize perplexity on the "
            f"{dataset} dataset. The model has {n_layers} transformer layers. Layer-wise pruning rate measures how many "
            "parameters are pruned from each layer of the model. Different layers may have different pruning rates "
            "based on their importance and contribution to the performance of model. You need to generate "
            f"{k} valid layer-wise pruning rate configurations. Each configuration should:\n"
            + _attributes(n_layers, beta)
            + f"Your response should only contain the {k} configurations without any additional text.")


def variation_prompt(operation: str, model: str, n_layers: int, population: Sequence[tuple[Sequence[float], float]],
                     m: int, beta: float) -> str:
    """The mutation / crossover prompt (Figure 3), listing ``population`` as ``ConfigurationI: [..], FitnessI: f``."""
    if operation not in ("mutation", "crossover"):
        raise SearchError(f"operation must be 'mutation' or 'crossover', got {operation!r}")
    rows = "\n".join(f"Configuration{i}: {_fmt(c)}, Fitness{i}: {float(f):.{DECIMALS}f}"
                     for i, (c, f) in enumerate(population, 1))
    return ("### Problem description and task instruction ###\n"
            f"Let's think step by step! You will receive {len(population)} lists representing the layer-wise pruning "
            f"rates of the {model} and a fitness value for each list. The lower the fitness value, the better. Your "
            f"task is to perform the {operation} operation in the evolutionary algorithm to generate new "
            "configurations. Each new pruning rate configuration list should:\n"
            + _attributes(n_layers, beta)
            + f"Please provide exactly {m} new configurations based on the existing data provided below without any "
            "additional text.\n"
            "### Current Population and Fitnesses ###\n"
            "Here are the existing layer-wise pruning rate configurations and their fitness values:\n" + rows)


def _classify(values: list[float], n_layers: int, beta: float, tol: float, repair_tol: float,
              max_length_diff: int = 2) -> tuple[str, tuple[float, ...] | None]:
    if not values or not all(math.isfinite(v) for v in values) or abs(len(values) - n_layers) > max_length_diff:
        return "invalid", None
    mean = math.fsum(values) / len(values)
    if len(values) == n_layers and all(0.0 <= v <= 1.0 for v in values) and abs(mean - beta) <= tol:
        return "valid", snap_rates(repair_rates(values, beta), beta)
    fixed = values[:n_layers] + [beta] * (n_layers - len(values))
    if all(-repair_tol <= v <= 1 + repair_tol for v in fixed) and abs(math.fsum(fixed) / n_layers - beta) <= repair_tol:
        return "repaired", snap_rates(repair_rates(fixed, beta), beta)
    return "invalid", None


def parse_reply(text: str | None, n_layers: int, beta: float, *, tol: float = 1e-3, repair_tol: float = 0.05,
                ) -> list[tuple[str, tuple[float, ...] | None]]:
    """``(status, config)`` for every bracketed number list in ``text``, in order.

    Only regular expressions, never ``eval``: the innermost ``[...]`` groups that
    contain a digit are proposals (text, code fences and ``Configuration 1:``
    labels around them are ignored; nested lists yield their inner lists). A
    group whose items are not all plain decimal numbers (``nan``, ``1/3``,
    ``...``, code) is ``"invalid"``. A list of ``n_layers`` values in [0, 1] with
    mean within ``tol`` of ``beta`` is ``"valid"``; one off by at most 2 in length
    (padded with ``beta`` / truncated), with values at most ``repair_tol`` outside
    [0, 1] and mean at most ``repair_tol`` from ``beta`` is ``"repaired"`` by
    :func:`repair_rates`; anything else is ``"invalid"`` (config ``None``).
    Configs are snapped to the 5-decimal grid with mean ``beta``.
    """
    out: list[tuple[str, tuple[float, ...] | None]] = []
    for m in _LIST_RE.finditer(text or ""):
        body = m.group(1)
        if not any(ch.isdigit() for ch in body):
            continue
        tokens = [t for t in _SEP_RE.split(body.strip()) if t]
        if not all(_NUM_RE.fullmatch(t) for t in tokens):
            out.append(("invalid", None))
            continue
        out.append(_classify([float(t) for t in tokens], n_layers, beta, tol, repair_tol))
    return out
