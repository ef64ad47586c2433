"""KL divergence of a candidate's next-token distribution from the dense model's.

Owns :class:`KLTarget` (the dense model's next-token log-probabilities of one
calibration batch, full or top-k compressed), :func:`kl_divergence` (the summed KL as a
differentiable tensor: the distillation loss of recovery training) and :func:`kl_sum` (its value).

``KL(P || Q) = sum_v P(v) (log P(v) - log Q(v))`` per predicted position, ``P``
the dense model, ``Q`` the candidate; positions are those the NLL predicts
(every token but the last of each sample), and the fitness is the mean over
them (nats per predicted token).

Top-k variant (``topk=K``): only the dense model's ``K`` most likely tokens per
position are stored (their log-probabilities and ids) plus ``log P(rest)``, the
log-sum-exp of the remaining log-probabilities. The divergence is then computed
between the *coarse-grained* distributions over ``K + 1`` outcomes (the top-k
tokens and one "rest" bucket): ``sum_top P (log P - log Q) + P(rest) (log
P(rest) - log Q(rest))`` with ``Q(rest) = 1 - sum_top Q``. By the data-processing
inequality this is a lower bound on the full KL, exact when the dense model puts
(almost) all mass on its top-k tokens or the candidate's distribution over the
rest is proportional to the dense one's. Memory: ``K * (4 + 8) + 4`` bytes per
position instead of ``4 * vocab``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KLTarget", "kl_divergence", "kl_sum"]


@dataclass(frozen=True)
class KLTarget:
    """Dense next-token log-probabilities of one batch, ``[B, T-1, ...]``.

    Full: ``logp`` is ``[B, T-1, V]``, ``ids`` and ``log_rest`` are ``None``.
    Top-k: ``logp`` ``[B, T-1, K]``, ``ids`` ``[B, T-1, K]``, ``log_rest`` ``[B, T-1]``.
    """

    logp: torch.Tensor
    ids: torch.Tensor | None = None
    log_rest: torch.Tensor | None = None

    @classmethod
    def from_logits(cls, logits: torch.Tensor, topk: int | None = None) -> "KLTarget":
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        if topk is None or topk >= lp.shape[-1]:
            return cls(lp)
        vals, ids = lp.topk(int(topk), dim=-1)
        rest = lp.scatter(-1, ids, float("-inf"))
        return cls(vals.contiguous(), ids.contiguous(), torch.logsumexp(rest, dim=-1))


def kl_divergence(target: KLTarget, logits: torch.Tensor) -> torch.Tensor:
    """Summed (over batch rows and positions) ``KL(dense || candidate)`` in nats, a float64 scalar that
    gradients flow through to ``logits``."""
    lq = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    if target.ids is None:
        p = target.logp.exp()
        # xlogy-style guard: P(v) = 0 contributes 0 even where log Q(v) = -inf
        terms = torch.where(p > 0, p * (target.logp - lq), torch.zeros_like(p))
        return terms.double().sum()
    lq_top = lq.gather(-1, target.ids)
    p_top = target.logp.exp()
    top = (p_top * (target.logp - lq_top)).double().sum()
    q_rest = (1.0 - lq_top.double().exp().sum(-1)).clamp_min(1e-30)
    p_rest = target.log_rest.double().exp()
    rest = torch.where(p_rest > 0, p_rest * (target.log_rest.double() - q_rest.log()), torch.zeros_like(p_rest))
    return top + rest.sum()


def kl_sum(target: KLTarget, logits: torch.Tensor) -> float:
    """Summed (over batch rows and positions) ``KL(dense || candidate)`` in nats."""
    with torch.no_grad():
        return float(kl_divergence(target, logits))
