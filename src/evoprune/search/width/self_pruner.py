"""Self-Pruner (Algorithm 1): an LLM writes the initial population and does mutation and crossover.

Owns :class:`SelfPrunerConfig` and :class:`SelfPrunerStrategy` (method
``self-pruner``, ``--space width``). The loop is :class:`~evoprune.search.width.evo.WidthEvoStrategy`'s
(K initial vectors, then N generations of M mutants + S crossovers, best K
survive); only the operators differ:

- generation 0: ``operator.initialize(K)`` (the paper's Figure 2 prompt), topped
  up from ``evo``'s initialization (uniform, OWL, random) when it returns fewer;
- later generations: ``operator.mutate(population, M)`` and
  ``operator.crossover(population, S)`` (Figure 3), where the population is the
  current best K with their fitness shown as perplexity ``exp(loss)`` (the
  paper's fitness), best first.

The operator (:class:`~evoprune.search.llm.operator.LLMOperator`, impure: it
talks to an endpoint) is passed in, not part of the options. Whatever it
returns is already parsed, validated and repaired; each vector is projected
onto the space once more (a no-op for valid ones) and anything missing,
duplicated or already scored is filled by the non-LLM operator of ``evo``, so a
generation always completes. ``llm_init`` / ``llm_mutation`` /
``llm_crossover`` = False are the paper's ablations (that step uses the non-LLM
operator only). Per-run counts of what the LLM proposed, per operator kind, are
kept in :attr:`llm_stats` (calls, replies, valid / repaired / projected / invalid
proposals, duplicates, used, fallback, and the projected replies' distance from
the budget), and the fate of the LLM's children (evaluated, entered the top K,
best so far) in :attr:`origin_stats` under ``llm-<kind>``; both are part of the
saved state, so a resumed run reports the same totals as an uninterrupted one,
given the operator replays its logged replies (the operator's own state, its call
counter, budget and dialect, is saved with the strategy's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...options import opt
from ...spaces import RateVector, SearchError
from ..registry import register
from .evo import WidthEvoConfig, WidthEvoStrategy

__all__ = ["SelfPrunerConfig", "SelfPrunerStrategy"]

_KINDS = ("init", "mutation", "crossover")
# counted by the operator, per call; then by the strategy: duplicates, used, fallback
_OPERATOR_KEYS = ("calls", "replies", "failed_calls", "refused", "proposals", "valid", "repaired", "projected",
                  "invalid", "duplicates")
_STAT_KEYS = _OPERATOR_KEYS + ("used", "fallback", "budget_exhausted", "miss_sum", "miss_max")


def fallback_note(llm: dict) -> str | None:
    """One line saying how many children the LLM gave and why the rest came from the fallback operators
    (``None`` when the LLM gave every child it was asked for)."""
    asked = int(llm.get("used", 0)) + int(llm.get("fallback", 0))
    if not llm.get("fallback"):
        return None
    why = [f"{llm[k]} {what}" for k, what in (("failed_calls", "failed calls"), ("refused", "refused for the schema"),
                                               ("invalid", "invalid proposals"), ("duplicates", "duplicates"))
           if llm.get(k)]
    if llm.get("budget_exhausted"):
        why.append("the call budget ran out")
    return (f"the LLM operator gave {llm.get('used', 0)} of {asked} children; the fallback operators gave the other "
            f"{llm['fallback']}" + (f" ({', '.join(why)})" if why else ""))


@dataclass(frozen=True)
class SelfPrunerConfig(WidthEvoConfig):
    # the paper's loop (K + N (M + S), every child on the whole set, the LLM's initial population), not evo's
    # sensitivity rounds and screening; both stay available as options
    population: int = opt(10, "population size K")
    mutations: int = opt(4, "mutants per generation M")
    crossovers: int = opt(4, "crossover children per generation S")
    tokens_per_stage: tuple | str | None = opt(
        None, "fitness tokens of a screening stage for the children and of the whole set, e.g. 64,512 (auto: 1/8 "
              "of the set, >= 64 tokens, then the whole set; default: every child on the whole set)", kind="stages")
    probe: float = opt(0.0, "sensitivity rounds before the population (see evo; 0: none, the LLM writes it)")
    llm_init: bool = opt(True, "the LLM writes the initial population (off: the paper's ablation, evo's init)")
    llm_mutation: bool = opt(True, "the LLM does mutation (off: evo's)")
    llm_crossover: bool = opt(True, "the LLM does crossover (off: evo's)")


@register("self-pruner", space="width")
class SelfPrunerStrategy(WidthEvoStrategy):
    config_cls = SelfPrunerConfig
    needs = frozenset({"scores", "operator"})

    @classmethod
    def requirements(cls, config) -> frozenset[str]:
        """The LLM operator only when some step uses it (every LLM step ablated: ``evo`` with the LLM's bookkeeping)."""
        return cls.needs if (config.llm_init or config.llm_mutation or config.llm_crossover) else cls.needs - {"operator"}

    def __init__(self, space, rng, operator=None, **options) -> None:
        super().__init__(space, rng, **options)
        c = self.config
        if operator is None and (c.llm_init or c.llm_mutation or c.llm_crossover):
            raise SearchError("self-pruner needs an LLM operator (--operator-url / --operator-model); "
                              "or turn every LLM step off with the ablation flags")
        self.operator = operator
        self.llm_stats = {kind: dict.fromkeys(_STAT_KEYS, 0) for kind in _KINDS}

    def _take(self, result, n: int, seen: set) -> list[RateVector]:
        """The operator's proposals as feasible, new vectors (at most ``n``), counted in llm_stats[kind]."""
        stats = self.llm_stats[result.kind]
        for k in _OPERATOR_KEYS:
            stats[k] += int(result.counts.get(k, 0))
        stats["budget_exhausted"] += int(bool(result.budget_exhausted))
        stats["miss_sum"] += float(result.miss_sum)
        stats["miss_max"] = max(stats["miss_max"], float(result.miss_max))
        out = []
        for rates in result.configs:
            try:
                g = self.space.project(rates)
            except SearchError:
                stats["invalid"] += 1
                continue
            if g.key in seen or self._scored(g.key):
                stats["duplicates"] += 1
                continue
            seen.add(g.key)
            out.append(g)
            self._origin[g.key] = f"llm-{result.kind}"
            if len(out) == n:
                break
        stats["used"] += len(out)
        stats["fallback"] += n - len(out)
        return out

    def _population_for_prompt(self) -> list[tuple[tuple[float, ...], float]]:
        return [(g.rates, math.exp(min(self._memo[g.key], 700.0))) for g in self.population]

    def _initial(self, k: int) -> list[RateVector]:
        if not self.config.llm_init:
            return super()._initial(k)
        seen: set = set()
        got = self._take(self.operator.initialize(k), k, seen)
        if len(got) == k:
            return got
        # the non-LLM initialization (uniform, OWL, random) fills the rest, as in the ablation
        return got + [g for g in super()._initial(k) if g.key not in seen][: k - len(got)]

    def _mutants(self, m: int, seen: set) -> list[RateVector]:
        if not self.config.llm_mutation or m == 0:
            return super()._mutants(m, seen)
        got = self._take(self.operator.mutate(self._population_for_prompt(), m, seen=tuple(seen)), m, seen)
        return got + super()._mutants(m - len(got), seen)

    def _crossovers(self, s: int, seen: set) -> list[RateVector]:
        if not self.config.llm_crossover or s == 0:
            return super()._crossovers(s, seen)
        got = self._take(self.operator.crossover(self._population_for_prompt(), s, seen=tuple(seen)), s, seen)
        return got + super()._crossovers(s - len(got), seen)

    def result_extras(self) -> dict:
        """``llm``: the totals, ``by_kind`` (init / mutation / crossover, with the children's fate from
        :attr:`origin_stats`), the structured-output dialect and the usable share; ``origins``: every origin."""
        by_kind = {}
        for kind, stats in self.llm_stats.items():
            fate = self.origin_stats.get(f"llm-{kind}", {})
            by_kind[kind] = {**stats, **{k: fate.get(k, 0) for k in ("evaluated", "top_k", "best_so_far")}}
        totals = {k: sum(v[k] for v in by_kind.values()) for k in _STAT_KEYS + ("evaluated", "top_k", "best_so_far")}
        totals["miss_max"] = max(v["miss_max"] for v in by_kind.values())
        usable = totals["valid"] + totals["repaired"] + totals["projected"]
        totals["usable_share"] = usable / totals["proposals"] if totals["proposals"] else None
        dialect = getattr(self.operator, "dialect", None)
        llm = {**totals, "structured": dialect, "by_kind": by_kind}
        llm["note"] = fallback_note(llm)
        return {"llm": llm, **super().result_extras()}

    def _extra_state(self) -> dict:
        d = super()._extra_state()
        d["llm_stats"] = {kind: dict(v) for kind, v in self.llm_stats.items()}
        # the operator's call numbering and budget: its logged replies are replayed by call number
        d["operator"] = self.operator.state_dict() if self.operator is not None else None
        return d

    def _load_extra_state(self, d: dict) -> None:
        super()._load_extra_state(d)
        saved = d.get("llm_stats", {})
        self.llm_stats = {kind: {k: (float if k.startswith("miss") else int)(saved.get(kind, {}).get(k, 0))
                                 for k in _STAT_KEYS} for kind in _KINDS}
        if self.operator is not None and d.get("operator") is not None:
            self.operator.load_state_dict(d["operator"])
