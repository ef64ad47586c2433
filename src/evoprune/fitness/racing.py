"""Racing: stop scoring a candidate once its partial loss is clearly worse than enough references.

Owns :class:`Race`. An evaluator scores a candidate batch by batch (one calibration batch after
another, the same batches for every candidate of a stage). A race holds the per-batch loss totals
of reference candidates already fully scored on those same batches and stops the candidate after
batch ``b`` (before the last) once it is *clearly worse* than at least ``rank`` of them: its summed
loss over the batches seen so far exceeds the reference's over the same batches by more than
``margin`` nats times the predicted tokens still to come, i.e. it would stay worse even if it beat
the reference by ``margin`` nats per token on every remaining token (a paired comparison: both see
the same tokens, so most of the per-batch noise cancels). With 4 batches that is a mean deficit of
``3 margin`` after one batch, ``margin`` after two, ``margin / 3`` after three. On SmolLM2-135M (4 x
512 wikitext2 tokens, SLEB's near-tie candidates) the largest such reversal seen was 0.036 nats per
token; the default ``margin`` (0.05) leaves room above it. A stopped candidate's score is partial and
never compared with complete ones; a candidate that finishes scores exactly as without racing.
Torch-free; pure.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Race"]


@dataclass(frozen=True)
class Race:
    """``refs``: per-batch loss totals (nats, one tuple per reference, one entry per batch);
    ``batch_tokens``: predicted tokens of each batch; ``rank``: how many references the candidate
    must be clearly worse than; ``margin``: nats per predicted token."""

    refs: tuple[tuple[float, ...], ...]
    batch_tokens: tuple[int, ...]
    rank: int = 1
    margin: float = 0.05

    def __post_init__(self) -> None:
        if self.rank < 1 or self.margin < 0:
            raise ValueError(f"a race needs rank >= 1 and margin >= 0, got {self.rank}, {self.margin}")
        if any(len(r) != len(self.batch_tokens) for r in self.refs):
            raise ValueError("every race reference needs one loss total per batch")

    @property
    def active(self) -> bool:
        """Can this race stop anything (enough references, more than one batch)?"""
        return len(self.refs) >= self.rank and len(self.batch_tokens) > 1

    def stop(self, done: int, total: float) -> bool:
        """After the first ``done`` batches (``total``: the candidate's loss sum over them), stop now?
        Never after the last batch."""
        if not self.active or done >= len(self.batch_tokens):
            return False
        rest = sum(self.batch_tokens[done:])
        worse = sum(1 for r in self.refs if total - sum(r[:done]) > self.margin * rest)
        return worse >= self.rank
