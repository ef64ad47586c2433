"""What one fitness evaluation returns: :class:`Evaluation` (loss and cost). Torch-free."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Evaluation"]


@dataclass(frozen=True)
class Evaluation:
    """Result of scoring one pattern.

    - ``loss``: mean NLL (or KL to the dense model, ``metric="kl"``), nats per predicted token;
    - ``tokens``: predicted tokens, ``n_samples * (seqlen - 1)``;
    - ``token_layers``: input tokens x decoder blocks run (the prefix cache's setup not included);
    - ``batch_losses``: the loss total (nats) of each calibration batch scored, in order;
    - ``complete``: ``False`` when a :class:`~evoprune.fitness.racing.Race` stopped it early: then
      ``loss`` is the mean over the batches scored (``len(batch_losses)`` of them) and ``tokens``,
      ``token_layers`` count only those.
    """

    loss: float
    tokens: int
    token_layers: int
    batch_losses: tuple[float, ...] = ()
    complete: bool = True
