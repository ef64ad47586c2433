"""Self-Pruner's prompts and the parsing and repair of LLM replies: pure text and numbers.

Owns the prompt builders :func:`init_prompt` (Figure 2 of the Self-Pruner paper)
and :func:`variation_prompt` (Figure 3), the reply parser :func:`parse_reply`
(regular expressions only, never ``eval``) with its :class:`Proposal` and the
budget projection :func:`project_allocation`, the structured-output schema
:func:`reply_schema` and :data:`DECIMALS`; repairs use
:func:`evoprune.space.repair_rates` / :func:`~evoprune.space.snap_rates`. No I/O, no torch; used by
:mod:`evoprune.search.llm.operator`.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from ...spaces import SearchError, repair_rates, snap_rates

__all__ = ["DECIMALS", "init_prompt", "variation_prompt", "parse_reply", "Proposal", "project_allocation",
           "reply_schema", "repair_rates", "is_number"]

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


class Proposal(NamedTuple):
    """One configuration found in a reply: ``status`` (``valid``, ``repaired``, ``projected`` or ``invalid``), the
    feasible ``config`` it became (``None`` when invalid) and ``miss`` = ``|mean(reply) - beta|`` as the LLM sent
    it (``None`` when invalid): how far the LLM's own numbers were from the budget."""

    status: str
    config: tuple[float, ...] | None
    miss: float | None


def project_allocation(values: Sequence[float], beta: float) -> tuple[float, ...]:
    """``values`` (in ``[0, 1]``, mean > 0) scaled to mean ``beta``, keeping their ratios (the LLM's relative
    allocation across layers), then clipped into ``[0, 1]`` and placed on the budget and the 1e-5 grid."""
    scale = beta * len(values) / math.fsum(values)
    return snap_rates(repair_rates([v * scale for v in values], beta), beta)


def _classify(values: list[float], n_layers: int, beta: float, tol: float, repair_tol: float, project: bool,
              max_length_diff: int = 2) -> Proposal:
    if not values or not all(math.isfinite(v) for v in values) or abs(len(values) - n_layers) > max_length_diff:
        return Proposal("invalid", None, None)
    mean = math.fsum(values) / len(values)
    miss = abs(mean - beta)
    in_range = all(0.0 <= v <= 1.0 for v in values)
    if len(values) == n_layers and in_range and miss <= tol:
        return Proposal("valid", snap_rates(repair_rates(values, beta), beta), miss)
    fixed = values[:n_layers] + [beta] * (n_layers - len(values))
    if all(-repair_tol <= v <= 1 + repair_tol for v in fixed) and abs(math.fsum(fixed) / n_layers - beta) <= repair_tol:
        return Proposal("repaired", snap_rates(repair_rates(fixed, beta), beta), miss)
    if project and len(values) == n_layers and in_range and mean > 0:
        return Proposal("projected", project_allocation(values, beta), miss)
    return Proposal("invalid", None, None)


def parse_reply(text: str | None, n_layers: int, beta: float, *, tol: float = 1e-3, repair_tol: float = 0.05,
                project: bool = True) -> list[Proposal]:
    """A :class:`Proposal` for every bracketed number list in ``text``, in order.

    Only regular expressions, never ``eval``: the innermost ``[...]`` groups that contain a digit are
    proposals (text, code fences, ``Configuration 1:`` labels and a JSON reply's object around them are
    ignored; nested lists yield their inner lists). A group whose items are not all plain decimal numbers
    (``nan``, ``1/3``, ``...``, code) is ``invalid``. Then:

    - ``valid``: ``n_layers`` values in [0, 1] with mean within ``tol`` of ``beta``;
    - ``repaired``: off by at most 2 in length (padded with ``beta`` / truncated), values at most
      ``repair_tol`` outside [0, 1], mean at most ``repair_tol`` from ``beta``: the nearest feasible vector
      (:func:`repair_rates`);
    - ``projected`` (with ``project``): the right length and range but a mean further from ``beta``: scaled
      to mean ``beta`` keeping the ratios between layers (:func:`project_allocation`);
    - anything else ``invalid``.

    Configs are snapped to the 5-decimal grid with mean ``beta``.
    """
    out: list[Proposal] = []
    for m in _LIST_RE.finditer(text or ""):
        body = m.group(1)
        if not any(ch.isdigit() for ch in body):
            continue
        tokens = [t for t in _SEP_RE.split(body.strip()) if t]
        if not all(_NUM_RE.fullmatch(t) for t in tokens):
            out.append(Proposal("invalid", None, None))
            continue
        out.append(_classify([float(t) for t in tokens], n_layers, beta, tol, repair_tol, project))
    return out


def reply_schema(k: int, n_layers: int, decimals: int = 2) -> dict:
    """The JSON schema of a reply holding ``k`` configurations of ``n_layers`` rates each: an object
    ``{"configurations": [[...], ...]}``, every rate one of 0, 0.01, ..., 1 (``decimals`` places). The values
    are an ``enum``: servers that compile schemas into grammars (llama.cpp) enforce enums and array lengths
    but not numeric ``minimum``/``maximum``, so the range has to be spelled out."""
    step = 10 ** int(decimals)
    values = [round(i / step, int(decimals)) for i in range(step + 1)]
    rates = {"type": "array", "minItems": n_layers, "maxItems": n_layers, "items": {"enum": values}}
    return {"type": "object", "properties": {"configurations": {"type": "array", "minItems": k, "maxItems": k,
                                                                "items": rates}},
            "required": ["configurations"], "additionalProperties": False}
