"""Greedy sub-layer removal, method ``greedy`` (BlockPruner / FinerCut style).

Owns :class:`GreedyConfig` and :class:`GreedySublayerStrategy`. Each step scores the current pattern plus
each remaining droppable sub-layer (attention or MLP of any block) and keeps the one whose removal costs
least (lowest loss; ties: lowest unit index), until the budget is met: ``k`` sub-layers, or removed
parameters inside the budget's window. With a parameter budget a step only considers sub-layers that do
not overshoot the window and after which the budget can still be met (so an MLP is not taken when only
attentions fit). Like SLEB, a step costs one evaluation per remaining candidate and only the last step's
candidates are feasible. No randomness.

Default: every candidate scored on the whole calibration set, as BlockPruner (Zhong et al., 2024) scores
perplexity and FinerCut (Zhang et al., 2024) output similarity (the criterion here is the run's fitness,
NLL or ``--fitness kl``). With ``--tokens-per-stage T0,TOTAL --survivors-per-stage P,1`` a step screens
every candidate on the ``T0``-token slice and re-scores its best ``P`` on the whole set, keeping the best
of those (the staged selection of :class:`~evoprune.search.staged.StagedStrategy`, one "generation" per
step, no elitism): a cheaper greedy, not the published one.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...options import opt
from ...spaces import SearchError, SublayerPattern
from ..registry import register
from ..staged import StagedOptions, StagedStrategy

__all__ = ["GreedyConfig", "GreedySublayerStrategy"]


@dataclass(frozen=True)
class GreedyConfig(StagedOptions):
    """Options of ``greedy``: only the stages (steps and candidates per step follow from the budget)."""

    generations: int = opt(10 ** 9, "steps (ends at the budget)", cli=False)
    offspring: int = opt(10 ** 9, "candidates per step (all remaining sub-layers)", cli=False)
    elitism: bool = opt(False, "the chosen candidate replaces the current pattern", cli=False)

    @classmethod
    def default_survivors(cls, n_stages: int) -> tuple[int, ...]:
        if n_stages == 1:
            return (1,)
        if n_stages == 2:
            return (4, 1)
        raise SearchError("greedy takes one or two stages (--tokens-per-stage T0,TOTAL)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.survivors[-1] != 1:
            raise SearchError(f"greedy keeps one pattern per step: the last --survivors-per-stage must be 1, "
                              f"got {self.survivors}")


@register("greedy", space="sublayers")
class GreedySublayerStrategy(StagedStrategy):
    """Remove the cheapest sub-layer, one at a time, until the budget; see the module docstring."""

    config_cls = GreedyConfig
    config: GreedyConfig
    round_name = "step"

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        self.removal_order: tuple[int, ...] = ()  # units, in the order the steps removed them
        self._start(self._step(()))

    def _step(self, current: tuple[int, ...]) -> list[SublayerPattern]:
        """Candidates extending ``current`` by one droppable unit that keeps the budget reachable."""
        sp, cur = self.space, set(current)
        out = []
        for u in sp.droppable:
            units = tuple(sorted(cur | {u}))
            if u not in cur and len(units) < sp.n_units and sp.completable(units):
                out.append(SublayerPattern.from_units(sp.n_layers, units))
        return out

    def _offspring(self) -> list[SublayerPattern]:
        chosen = self.parents[0]
        self.removal_order += tuple(sorted(set(chosen.units) - set(self.removal_order)))
        if self.space.feasible(chosen):
            return []  # the budget is met: an empty step ends the search
        return self._step(chosen.units)

    def _extra_state(self) -> dict:
        return {"removal_order": list(self.removal_order), **super()._extra_state()}

    def _load_extra_state(self, d: dict) -> None:
        self.removal_order = tuple(int(u) for u in d["removal_order"])
        super()._load_extra_state(d)
