"""Sensitivity rounds of width ``evo``: probe every layer below the current vector, move the most sensitive one.

Owns :func:`probe_of` and :func:`commit`. A *probe* of layer ``i`` is the current vector with only layer
``i``'s rate lowered by ``down`` (at most to the space's lower bound): a measurement of how much protecting
that layer helps, not a candidate (its mean is below the target, so :meth:`WidthSpace.feasible` refuses it
and a search never returns it). Because it equals the current vector in every block before ``i``, an
evaluator with a block-prefix cache runs only blocks ``i ..`` for it (about half a forward on average).
A round *commits* the probe that helped most: that layer keeps its lowered rate and the layers not yet
committed share the difference (:func:`commit`), so the vector is feasible again.

Why probes, when evolution already moves rate between layers: structured pruning is a step function of
the rate (a SmolLM2-135M block has 3 attention groups; a rate below 1/6 keeps all of them), so a mutation
of a few hundredths rarely changes what a layer keeps, and the one or two layers whose attention must not
be touched (block 0 or 1 there, costing 1.5-2.8 nats at 30%) stay on a plateau the population never
leaves. A probe jumps straight across. Pure Python + numpy.
"""
from __future__ import annotations

from typing import Sequence

from ...spaces import RateVector, SearchError
from ...spaces.rates import repair_rates, snap_rates

__all__ = ["probe_of", "commit"]


def probe_of(space, base: RateVector, layer: int, down: float) -> RateVector | None:
    """``base`` with layer ``layer``'s rate lowered by ``down`` (at most to ``space.lo``); ``None`` when it cannot
    go lower."""
    r = list(base.rates)
    d = min(float(down), r[layer] - space.lo)
    if d <= 1e-12:
        return None
    r[layer] = max(space.lo, r[layer] - d)
    return RateVector(r)


def commit(space, probe: RateVector, layer: int, fixed: Sequence[int] = ()) -> RateVector:
    """The feasible vector of a round that moves ``layer`` to its rate in ``probe``: ``layer`` and the ``fixed``
    layers (committed earlier) keep their rates, the others are projected onto the rest of the budget
    (:func:`~evoprune.spaces.rates.repair_rates`: an even shift, clipped to the bounds), then the vector is
    put on the rate grid. :class:`SearchError` when the others cannot take the difference."""
    keep = set(fixed) | {int(layer)}
    free = [i for i in range(space.n_layers) if i not in keep]
    r = list(probe.rates)
    if not free:
        raise SearchError("no layer left to take the rate a probe removed")
    want = (space.beta * space.n_layers - sum(r[i] for i in keep)) / len(free)
    if not space.lo <= want <= space.hi:
        raise SearchError(f"the other layers cannot take the rate (their mean would be {want:.4f})")
    for i, v in zip(free, repair_rates([r[i] for i in free], want, space.lo, space.hi)):
        r[i] = v
    return RateVector(snap_rates(r, space.beta, space.lo, space.hi))
