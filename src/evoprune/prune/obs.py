"""Structured Optimal Brain Surgeon (ZipLM-style) for the input columns of one linear layer: pure tensor math.

Owns :func:`structured_obs` and :func:`reconstruct`. No hooks, no model: the caller collects the layer-input
Hessian ``H = sum_t x_t x_t^T`` (``[in, in]``) over calibration tokens and passes
the layer's weight ``W`` (``[out, in]``).

Problem: remove whole *structures*, each a contiguous block of ``size`` input
columns (an attention group's columns of the output projection, or one MLP
channel's column of the MLP output projection), so that the layer output on the
calibration inputs changes least, updating the remaining columns to compensate.
For the quadratic error ``E(W') = ||X (W' - W)^T||_F^2 = tr((W' - W) H (W' - W)^T)``,
removing the column set ``Q`` optimally costs (OBS, Hassibi & Stork 1993; the
structured form of Kurtic et al. 2023, ZipLM)::

    dE_Q = tr(W_Q (Hinv_QQ)^-1 W_Q^T)          (W_Q: the columns Q of W; Hinv = H^-1)
    W   <- W - W_Q (Hinv_QQ)^-1 Hinv_Q:         (W_Q becomes exactly 0)
    Hinv <- Hinv - Hinv_:Q (Hinv_QQ)^-1 Hinv_Q:  (the inverse Hessian of the remaining columns)

Greedy: at every step the structure with the smallest ``dE`` goes, then ``W``
and ``Hinv`` are updated, so each step is exact given the previous ones. The
removal order is nested: level ``l`` removes the first ``counts[l]`` structures
of one order. ``H`` is dampened by ``damp * mean(diag H)`` on its diagonal
(SparseGPT's 1%), and columns that never fire (``H_jj = 0``) get ``H_jj = 1``;
everything is computed in float64.

:func:`reconstruct` is the same update for a *given* set of removed columns (the structures a width
plan drops): removing ``Q`` at once by the formula above leaves the kept columns ``K`` at the
least-squares solution of ``min ||X_K W_K'^T - X W^T||`` for the dampened ``H``, i.e.
``W_K' = W H_{:K} (H_KK)^-1``, computed that way (one Cholesky solve of the kept block).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["structured_obs", "reconstruct", "obs_error"]


def obs_error(w_old: torch.Tensor, w_new: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W' - W) H (W' - W)^T)``: the squared output error of ``W'`` on the inputs behind ``H``."""
    d = (w_new.double() - w_old.double())
    return float(torch.einsum("oi,ij,oj->", d, hessian.double(), d))


@torch.no_grad()
def structured_obs(weight: torch.Tensor, hessian: torch.Tensor, size: int, counts: Sequence[int],
                   damp: float = 0.01) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy structured OBS removal of ``size``-column structures from ``weight``.

    - ``weight``: ``[out, n * size]`` (any float dtype, any device); not modified;
    - ``hessian``: ``[n * size, n * size]``, symmetric positive semi-definite;
    - ``counts``: nondecreasing numbers of structures removed, each in ``[0, n]``.

    Returns ``(order, weights)``: ``order`` lists structure indices in removal
    order (``max(counts)`` of them); ``weights[l]`` is the updated ``[out, n*size]``
    weight (float64, on ``weight``'s device) after removing ``order[:counts[l]]``,
    with those columns exactly zero (``counts[l] == 0`` gives ``weight`` itself).
    """
    out_f, in_f = weight.shape
    size = int(size)
    if size < 1 or in_f % size:
        raise ValueError(f"structure size {size} does not divide the {in_f} input columns")
    n = in_f // size
    counts = [int(c) for c in counts]
    if any(c < 0 or c > n for c in counts) or any(b < a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"counts must be nondecreasing in [0, {n}], got {counts}")
    if tuple(hessian.shape) != (in_f, in_f):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected {(in_f, in_f)}")
    w, h = _dampened(weight, hessian, damp)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    step = _column_step(w, hinv) if size == 1 else _block_step(w, hinv, size)
    order, snapshots = [], {}
    for done in range(max(counts, default=0) + 1):  # greedy: one structure per step, snapshots at the levels
        if done in counts:
            snapshots[done] = w.clone()
        if done < max(counts, default=0):
            order.append(step())
    return order, [snapshots[c] for c in counts]


def _dampened(weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copies of ``weight`` and ``hessian`` on ``weight``'s device: columns that never fire (``H_jj = 0``)
    get ``H_jj = 1`` and zero weights, then ``damp * mean(diag H)`` is added to the diagonal."""
    dev = weight.device
    w = weight.detach().to(dev, torch.float64).clone()
    h = hessian.detach().to(dev, torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(float(damp) * float(torch.diag(h).mean()))
    return w, h


@torch.no_grad()
def reconstruct(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The kept columns ``kept`` (a long index tensor) of ``weight`` (``[out, in]``) updated so that the layer's
    output on the inputs behind ``hessian`` (``[in, in]``, ``X^T X``) changes least when every other column is
    removed: ``W H_{:K} (H_KK)^-1`` for the dampened ``H`` (see the module docstring). Returns ``[out, len(kept)]``
    float64 on ``weight``'s device."""
    w, h = _dampened(weight, hessian, damp)
    kept = kept.to(w.device)
    factor = torch.linalg.cholesky(h.index_select(0, kept).index_select(1, kept))
    rhs = (w @ h.index_select(1, kept)).T  # [k, out]
    return torch.cholesky_solve(rhs, factor).T


def _column_step(w: torch.Tensor, hinv: torch.Tensor):
    """Single-column structures: a function removing the best remaining column (returns its index), with
    rank-1 updates of ``w`` and ``hinv`` in place and squared column norms kept up to date
    (``||w_j - r_j w_q||^2 = ||w_j||^2 - 2 r_j w_q.w_j + r_j^2 ||w_q||^2``): no gathers per step."""
    colsq = w.pow(2).sum(0)
    removed = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)

    def step() -> int:
        score = colsq / torch.diag(hinv)
        score[removed] = torch.inf
        j = int(torch.argmin(score))
        r = hinv[j] / hinv[j, j]  # [in]
        r[removed] = 0.0  # removed columns stay exactly zero (their Hinv entries are only ~0 in floats)
        wq = w[:, j].clone()
        colsq.add_(-2.0 * r * (wq @ w) + r.pow(2) * colsq[j])
        w.addr_(wq, r, alpha=-1.0)
        hinv.addr_(hinv[:, j].clone(), r, alpha=-1.0)
        w[:, j] = 0.0
        colsq[j] = 0.0
        removed[j] = True
        return j

    return step


def _block_step(w: torch.Tensor, hinv: torch.Tensor, size: int):
    """Structures of ``size`` contiguous columns: a function removing the best remaining one (returns its
    index) by the block formulas of the module docstring, ``w`` and ``hinv`` updated in place."""
    n = w.shape[1] // size
    cols = torch.arange(w.shape[1], device=w.device).view(n, size)
    alive = torch.ones(n, dtype=torch.bool, device=w.device)

    def step() -> int:
        idx = torch.nonzero(alive).reshape(-1)
        q = cols[idx]  # [m, size]
        blocks = hinv[q[:, :, None], q[:, None, :]]  # [m, size, size], positive definite
        wq = w[:, q].permute(1, 0, 2)  # [m, out, size]
        # Cholesky, not LU: the blocks are positive definite, and MKL's pivoted LU (DLASWP) was seen to fail and
        # hang in a long-running process on an AVX-512 machine
        score = (wq * torch.cholesky_solve(wq.transpose(1, 2), torch.linalg.cholesky(blocks)).transpose(1, 2)).sum((1, 2))
        j = int(idx[int(torch.argmin(score))])
        q = cols[j]
        row = torch.cholesky_solve(hinv[q, :], torch.linalg.cholesky(hinv[q[:, None], q[None, :]]))  # [size, in]
        row[:, cols[~alive].reshape(-1)] = 0.0  # removed columns stay exactly zero
        w.sub_(w[:, q] @ row)
        hinv.sub_(hinv[:, q] @ row)
        w[:, q] = 0.0
        alive[j] = False
        return j

    return step
