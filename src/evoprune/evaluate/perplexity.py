"""Perplexity with the standard non-overlapping-window protocol.

Owns ``tokenize_text`` and ``perplexity``. Protocol: the evaluation text
(documents joined with ``"\\n\\n"``) is tokenized once without special tokens
added by us beyond what the tokenizer does by default, cut into
``floor(n_tokens / seqlen)`` non-overlapping windows of ``seqlen`` tokens
(optionally only the first ``max_windows``), and every window predicts its
``seqlen - 1`` next tokens. The reported NLL is the mean over *all predicted
tokens* (nats/token); ``ppl = exp(nll)``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["PPLResult", "tokenize_text", "windows", "window_nll", "perplexity"]


@dataclass(frozen=True)
class PPLResult:
    ppl: float
    nll: float  # mean nats per predicted token
    tokens: int  # predicted tokens = windows * (seqlen - 1)
    windows: int
    seqlen: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor."""
    if tokenizer is None:
        raise UserError("this model has no tokenizer; cannot evaluate text with it")
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "sequence longer than model max length"
    try:
        ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(prev)
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows, shape ``[n_windows, seqlen]``; :class:`UserError` if none fits."""
    if seqlen < 2:
        raise UserError(f"seqlen must be >= 2, got {seqlen}")
    n = ids.numel() // seqlen
    if n == 0:
        raise UserError(f"seqlen {seqlen} is longer than the text ({ids.numel()} tokens)")
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"--max-windows must be >= 1, got {max_windows}")
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed NLL (nats) of each row of ``ids`` [B, T] given ``logits`` [B, T, V]; shape [B]."""
    b, t, v = logits.shape
    # [B*T, V] rows: the class-dim-1 layout of a transposed view loses ~1e-4 nats per token
    lp = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1), reduction="none")
    return lp.view(b, t - 1).double().sum(dim=1)


@torch.no_grad()
def perplexity(model, tokenizer=None, text: str | None = None, *, ids: torch.Tensor | None = None,
               seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1,
               progress: bool = True, desc: str = "ppl") -> PPLResult:
    """Perplexity of ``model`` on ``text`` (or pre-tokenized 1-D ``ids``).

    Runs on the model's device; the model is put in eval mode by the caller.
    """
    if ids is None:
        ids = tokenize_text(tokenizer, text)
    w = windows(ids, seqlen, max_windows)
    device = next(model.parameters()).device
    total = 0.0
    from tqdm.auto import tqdm

    bar = tqdm(total=w.shape[0], desc=desc, unit="win", disable=not progress, leave=False)
    for i in range(0, w.shape[0], batch_size):
        batch = w[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += float(window_nll(logits, batch).sum())
        bar.update(batch.shape[0])
    bar.close()
    n_pred = w.shape[0] * (seqlen - 1)
    nll = total / n_pred
    return PPLResult(ppl=math.exp(nll), nll=nll, tokens=n_pred, windows=int(w.shape[0]), seqlen=seqlen)
