"""Training text for recovery fine-tuning: data specs, the Alpaca template, packing.

Owns :func:`train_documents` (a ``--data`` spec -> list of documents),
:func:`alpaca_documents` and :func:`pack_windows`. Fine-tuning always reads the
*calibration* side of :mod:`evoprune.data.sources`, never the held-out one, so
``evoprune ppl`` on the ``eval`` side stays a fair measurement:

=================  ===============================================================
spec               training documents
=================  ===============================================================
wikitext2          the validation split (``wiki.valid.raw``) as one document — the
                   local data has no train split; held-out ppl uses the test split
c4                 documents 1000–1999 of the local C4 validation sample (held-out:
                   0–999)
text:PATH          the whole file, one document
jsonl:PATH[:f]     field ``f`` (default ``text``) of every line, one document each
alpaca:PATH        JSON array or JSONL of ``{instruction, input, output}`` records,
                   each formatted with the Stanford Alpaca template (below)
=================  ===============================================================

``text:``/``jsonl:``/``alpaca:`` files are the user's choice: nothing keeps them
apart from an evaluation on the same file.

Packing: every document is tokenized without special tokens, followed by the
tokenizer's EOS token (when it has one), all concatenated into one stream and
cut into ``floor(n / seqlen)`` non-overlapping windows; the tail is dropped.
The loss covers every token (Alpaca prompts included: LLM-Pruner's
``train_on_inputs`` default).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UserError
from .options import TRAIN_SOURCES, check_train_source

__all__ = ["TRAIN_SOURCES", "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "alpaca_text", "alpaca_documents",
           "train_documents", "pack_windows"]


# Stanford Alpaca (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT); the response follows the prompt directly.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_text(record: dict) -> str:
    """One Alpaca record as training text: the template (with or without input) + ``output``."""
    inp = str(record.get("input") or "")
    tmpl = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
    return tmpl.format(instruction=str(record["instruction"]), input=inp) + str(record["output"])


def _alpaca_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        return [obj]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: neither a JSON array nor JSON lines") from None
    return records


def alpaca_documents(path: str | Path) -> list[str]:
    """The records of an Alpaca file (JSON array or JSONL) formatted with :func:`alpaca_text`.

    Raises :class:`UserError` for a missing file, a record without ``instruction``
    or ``output``, or a file without records.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"data file not found: {path}")
    docs = []
    for i, rec in enumerate(_alpaca_records(p)):
        if not isinstance(rec, dict) or "instruction" not in rec or "output" not in rec:
            raise UserError(f"{path}: record {i} is not an object with 'instruction' and 'output'")
        docs.append(alpaca_text(rec))
    if not docs:
        raise UserError(f"{path}: no Alpaca records")
    return docs


def train_documents(spec: str) -> list[str]:
    """The training documents of a ``--data`` spec (see the module table).

    Raises :class:`UserError` for an unknown spec, missing data or empty text.
    """
    from ..data.sources import get_documents, get_text

    spec = str(spec)
    check_train_source(spec)
    if spec == "wikitext2":
        docs = [get_text("wikitext2", "calib")]  # rows are lines, not documents: keep the text whole
    elif spec == "c4" or spec.startswith(("text:", "jsonl:")):
        docs = get_documents(spec, "calib")
    elif spec.startswith("alpaca:"):
        docs = alpaca_documents(spec[len("alpaca:"):])
    else:
        raise UserError(f"unknown training data {spec!r} (choose from {', '.join(TRAIN_SOURCES)})")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"training data {spec!r} is empty")
    return docs


def pack_windows(tokenizer, documents: str | Sequence[str], seqlen: int) -> torch.Tensor:
    """Token windows ``[n, seqlen]`` (long) of ``documents`` packed as the module docstring says.

    Raises :class:`UserError` when the model has no tokenizer or the text is
    shorter than one window.
    """
    if tokenizer is None:
        raise UserError("this model has no tokenizer; pass token ids to finetune_lora instead of text")
    if isinstance(documents, str):
        documents = [documents]
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than the model's max length" is expected here
    try:
        rows = tokenizer(list(documents), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(prev)
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for r in rows:
        stream.extend(r)
        if eos is not None:
            stream.append(int(eos))
    n = len(stream) // seqlen
    if n == 0:
        raise UserError(f"training text has {len(stream)} tokens, fewer than one window of seqlen {seqlen}")
    return torch.tensor(stream[: n * seqlen], dtype=torch.long).view(n, seqlen)
