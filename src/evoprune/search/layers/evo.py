"""evoprune's own evolutionary layer-drop search, method ``evo`` (multi-fidelity, swap mutation).

Owns :class:`Request`, :class:`EvoConfig` and :class:`EvoStrategy`. A
(mu + lambda) evolution strategy in the spirit of EvoPress (Sieberling et al.,
2024) and DarwinLM, built for fixed-``k`` layer dropping:

- **Defaults** (measured in RESULTS, "Selection cost"): two stages (``tokens_per_stage="auto"``: 1/8 of the calibration
  tokens, at least 64, then all of them; survivors ``(6, 2)``), racing at the full stage (``race_margin``,
  :class:`~evoprune.fitness.racing.Race`) and, without ``--budget-token-layers``, a token-layer
  budget of ``budget_share`` x :func:`greedy_reference` (a naive full-fidelity greedy pass to
  ``k``; a prefix-cached SLEB costs 0.58-0.64 of it on SmolLM2-135M, so the default 0.135 is
  0.21-0.24 x SLEB), times ``max(1, 8 x`` the first stage's share of the tokens``)`` (the greedy seeding
  runs on that stage: on 2 x 128 tokens its 64 tokens are 1/4 and the budget doubles, 0.34-0.45 x SLEB).
  That budget never stops a run before its first full-fidelity ``k``-block candidate.
- **Greedy seeding** (``greedy_seed``, multi-stage runs only): first a SLEB-like
  greedy pass on the cheapest (stage-0) slice: step ``j`` scores the patterns
  "blocks chosen so far + one more" at stage 0, re-scores the best
  ``greedy_promote`` of them (at most ``survivors[0]``) at the last (full) stage
  and keeps the best of those by full fitness (``greedy_promote=0``: the best at
  stage 0), until ``k`` blocks. The promotion keeps a noisy low-fidelity slice
  from steering the greedy path away from full-fidelity SLEB's (on SmolLM2, a
  512-token slice preferred a block that the whole calibration set does not;
  there the full-fidelity best ranked 0-3rd at stage 0, and 5th on a 256-token
  slice, hence the default 6).
  With ``race_margin`` the stage-0 best is scored first and the other promoted
  ones are raced against it. Steps after the first score only the blocks in the
  best ``greedy_screen`` share of the first step's stage-0 ranking (single blocks)
  plus the droppable neighbours of the blocks dropped so far (replayed on SLEB's
  full-fidelity history, k = 9, seed 0, this follows SLEB's path at every step
  with half the stage-0 evaluations; screening by the previous step's ranking
  instead shrinks the pool step by step and lost SLEB's path at step 8).
  The last step's patterns (already scored at stage 0) are the
  initial cohort, ranked, followed by the one-shot-score seeds below
  (``seed_fraction * offspring`` of them, no random ones). The greedy costs about
  stage-0 tokens / full tokens of a full-fidelity SLEB (less with the screen) plus
  ``greedy_promote`` (raced) full evaluations per step; the evolution then refines
  its answer with full-fidelity comparisons, raced against the parents.
- **Initial cohort** without greedy seeding (``offspring`` patterns, at least ``survivors[-1]``): when
  one-shot ``scores`` are given (ShortGPT Block Influence, lower = more
  droppable), a ``seed_fraction`` share is seeded from them: first the
  ShortGPT pattern (the ``k`` lowest-score droppable blocks), then patterns
  drawing ``k`` blocks without replacement with weight ``exp(-rank / k)``
  (rank 0 = lowest score); the rest are uniform random feasible patterns.
- **Offspring**: a parent chosen by binary tournament (the better-ranked of
  two uniform draws from the current parents), then
  ``m`` swap mutations (one dropped block <-> one kept droppable block, so
  every child keeps exactly ``k`` and stays feasible), ``m ~ Geometric(1/2)``
  capped at ``min(k, n_droppable - k)``. With probability ``adjacent`` a swap
  is a *contiguity move*: the block restored is drawn from the dropped blocks
  with no dropped neighbour (if any) and the block dropped from the kept blocks
  next to a dropped one (if any). Good drop patterns on real models are mostly
  runs of consecutive blocks (SLEB's and EvoP's answers on SmolLM2 are), and a
  uniform swap finds the one block that extends a run with probability
  ~1 / (n - k); otherwise the swap is uniform.
- **Duplicate rejection**: a child equal to a parent, to a pattern of the same
  cohort, or to any pattern ever scored (at any stage) is redrawn (at most
  ``50 * offspring`` draws per cohort; a cohort that stays empty ends the search).
- **Multi-fidelity selection**: stage ``s`` (``0 .. len(survivors) - 1``) scores
  its candidates on the run's stage-``s`` data slice (the last stage is the full
  calibration set). Every cohort member is scored at stage 0; the best
  ``survivors[s]`` of stage ``s`` (ties: cohort order) are scored at stage
  ``s + 1``. After the last stage, the next parents are the best
  ``survivors[-1]`` distinct patterns among the old parents and the cohort's
  last-stage candidates, by full fitness (elitism: a parent leaves only for a
  strictly better pattern; ties keep parents first).
- ``generation`` counts completed cohorts (the initial one included); the
  search ends after ``generations`` cohorts. ``best`` is the lowest *full
  (last-stage)* fitness seen.

``ask()`` returns :class:`Request` objects (a pattern and its stage), each
(pattern, stage) pair at most once per run; the fitness memo is keyed by
(pattern, stage), i.e. by (pattern, data slice) since a run has one metric.
Torch-free; randomness only from the given generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...options import opt
from ...spaces import DropPattern, SearchError
from ..registry import register
from ..defaults import AUTO_SHARE, BUDGET_SHARE, GREEDY_PROMOTE, RACE_MARGIN
from ..staged import Request, StagedStrategy, SwapEvoOptions

__all__ = ["EvoConfig", "EvoStrategy", "Request", "greedy_reference"]



def greedy_reference(n_layers: int, n_droppable: int, k: int, n_tokens: int) -> int:
    """Token-layers of a naive (uncached) full-fidelity greedy pass to ``k`` blocks: step ``j`` scores
    ``n_droppable - j`` patterns that each run ``n_layers - j - 1`` blocks over ``n_tokens`` tokens."""
    return n_tokens * sum((n_droppable - j) * (n_layers - j - 1) for j in range(k))


@dataclass(frozen=True)
class EvoConfig(SwapEvoOptions):
    """Options of ``evo``: :class:`~evoprune.search.staged.SwapEvoOptions` plus the greedy seeding
    phase; validated on construction (``SearchError``)."""

    tokens_per_stage: tuple | str | None = opt(
        "auto", "fitness tokens per selection stage, e.g. 512,2048 (the last = the whole calibration set; auto: "
                "1/8 of the set, >= 64 tokens, then the whole set)", aliases=("fitness_tokens_per_stage",), kind="stages",
        legacy=None)
    race_margin: float = opt(RACE_MARGIN, "racing: stop a full-fidelity candidate once it trails its references by more "
                                          "than this many nats per token still to score (0: off)", legacy=0.0)
    budget_share: float = opt(BUDGET_SHARE, "no --budget-token-layers: budget = this x a naive greedy pass's "
                                            "token-layers (see the method docs; 0: none)", legacy=0.0)
    greedy_seed: bool = opt(True, "multi-stage runs: start with a SLEB-like greedy pass on the cheapest stage")
    greedy_promote: int = opt(GREEDY_PROMOTE, "greedy seeding: stage-0 candidates per step re-scored at full fidelity", legacy=4)
    greedy_screen: float = opt(0.5, "greedy steps after the first score only this share of the first step's "
                                    "stage-0 ranking, plus the neighbours of dropped blocks (1: every block)",
                               legacy=1.0)

    @classmethod
    def default_survivors(cls, n_stages: int) -> tuple[int, ...]:
        if n_stages == 2:
            return (6, 2)
        return super().default_survivors(n_stages)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.budget_share, (int, float)) and 0 <= self.budget_share < math.inf):
            raise SearchError(f"budget_share must be a number >= 0, got {self.budget_share!r}")
        if not isinstance(self.greedy_promote, int) or isinstance(self.greedy_promote, bool) or self.greedy_promote < 0:
            raise SearchError(f"greedy_promote must be an integer >= 0, got {self.greedy_promote!r}")
        if not (isinstance(self.greedy_screen, (int, float)) and 0 < self.greedy_screen <= 1):
            raise SearchError(f"greedy_screen must be in (0, 1], got {self.greedy_screen!r}")


@register("evo", default=True)
class EvoStrategy(StagedStrategy):
    """Multi-fidelity (mu + lambda) evolution with swap mutation. Options: see :class:`EvoConfig`.

    The staged selection is :class:`~evoprune.search.staged.StagedStrategy`'s; this class adds the
    greedy seeding phase, the one-shot-score seeds and swap mutation.
    """

    config_cls = EvoConfig
    inputs = ("scores",)
    needs = frozenset({"scores"})
    config: EvoConfig

    def __init__(self, space, rng, **options) -> None:
        super().__init__(space, rng, **options)
        if self.config.scores is not None and len(self.config.scores) != space.n_layers:
            raise SearchError(f"scores must have {space.n_layers} entries (one per block), got {len(self.config.scores)}")
        if space.k >= space.n_droppable:
            raise SearchError(f"evo needs k < droppable blocks, got k={space.k} of {space.n_droppable}")
        # greedy seeding phase: blocks dropped so far (None once the phase is over or not used)
        self.greedy: list[int] | None = [] if (self.config.greedy_seed and self.last > 0) else None
        self.screen: list[int] | None = None  # blocks this greedy step may add (None: every droppable one)
        self.shortlist: list[int] = []  # the greedy's first-step shortlist (see _next_screen)
        if self.greedy is None:
            self._start(self._initial_cohort())

    # -- greedy seeding ----------------------------------------------------------------

    def _greedy_candidates(self) -> list[DropPattern]:
        sp, g = self.space, self.greedy
        pool = sp.droppable if self.screen is None else self.screen
        return [DropPattern(sp.n_layers, tuple(sorted(g + [i]))) for i in pool if i not in g]

    def _next_screen(self, cands: list[DropPattern], chosen: list[int]) -> list[int] | None:
        """Blocks the next greedy step may add: the shortlist (the best ``greedy_screen`` share of the
        first step's stage-0 ranking of single blocks) and every droppable neighbour of a dropped block."""
        share = float(self.config.greedy_screen)
        if share >= 1:
            return None
        if not self.greedy:  # the first step: single-block candidates
            ranked = sorted(range(len(cands)), key=lambda i: (self._low[f"{cands[i].key}@0"], i))
            self.shortlist = sorted(cands[i].dropped[0] for i in ranked[: max(1, math.ceil(share * len(ranked)))])
        keep = set(self.shortlist) | {j for i in chosen for j in (i - 1, i + 1) if j in self.space.droppable}
        return sorted(keep - set(chosen))

    def _greedy_promoted(self, cands: list[DropPattern]) -> list[DropPattern]:
        """The step's candidates re-scored at full fidelity: the best ``greedy_promote`` at stage 0."""
        n = min(self.config.greedy_promote, self.config.survivors[0])
        ranked = sorted(range(len(cands)), key=lambda i: (self._low[f"{cands[i].key}@0"], i))
        return [cands[i] for i in ranked[:n]]

    def _promotion_requests(self, cands: list[DropPattern]) -> list[Request]:
        """The step's promoted candidates still to score at full fidelity. With ``race_margin``, the best at
        stage 0 is scored alone first and the others are raced against the promoted ones already scored."""
        pool = self._greedy_promoted(cands)
        todo = [p for p in pool if p.key not in self._memo]
        m = self.config.race_margin
        if not m or not todo:
            return [Request(p, self.last) for p in todo]
        refs = tuple(p.key for p in pool if math.isfinite(self._memo.get(p.key, math.inf)))
        if not refs:
            return [Request(todo[0], self.last)]
        return [Request(p, self.last, refs, 1, m) for p in todo]

    def _greedy_step(self) -> None:
        """This greedy step is scored (stage 0, then its promoted candidates): keep the best, or end the phase."""
        cands = self._greedy_candidates()
        pool = self._greedy_promoted(cands)
        if pool:
            best = min(pool, key=lambda p: self._memo[p.key])  # min() keeps the first of equals
        else:
            best = min(cands, key=lambda p: self._low[f"{p.key}@0"])
        if len(self.greedy) + 1 < self.space.k:
            self.screen = self._next_screen(cands, list(best.dropped))
            self.greedy = list(best.dropped)
            return
        # the last step's candidates are k-block patterns already scored at stage 0: the initial cohort
        # (greedy order, best first) plus the one-shot-score seeds, then promotion as usual
        self.greedy = None
        ranked = sorted(range(len(cands)), key=lambda i: (self._low[f"{cands[i].key}@0"], i))
        keys = {cands[i].key for i in ranked}
        extra = [p for p in self._initial_cohort() if p.key not in keys]
        self._start([cands[i] for i in ranked] + extra)

    def ask(self) -> list[Request]:
        while self.greedy is not None and not self._requests and not self._done:
            cands = self._greedy_candidates()
            fresh = [Request(p, 0) for p in cands if f"{p.key}@0" not in self._low]
            if not fresh:
                fresh = self._promotion_requests(cands)
            if fresh:
                self._requests = fresh
                return list(self._requests)
            self._greedy_step()
        return super().ask()

    def _batch_done(self) -> None:
        if self.greedy is None:  # (the greedy phase moves on in ask(): a step has two batches)
            self._complete_stage()

    # -- operators -------------------------------------------------------------------

    def _swap(self, p: DropPattern) -> DropPattern:
        sp = self.space
        m = min(int(self.rng.geometric(0.5)), sp.k, sp.n_droppable - sp.k)
        dropped = set(p.dropped)
        for _ in range(m):
            out = sorted(dropped)
            inn = [i for i in sp.droppable if i not in dropped]
            if self.rng.random() < self.config.adjacent:  # contiguity move: isolated block -> next to a run
                lone = [i for i in out if i - 1 not in dropped and i + 1 not in dropped]
                near = [i for i in inn if i - 1 in dropped or i + 1 in dropped]
                out, inn = lone or out, near or inn
            a = out[int(self.rng.integers(len(out)))]
            b = inn[int(self.rng.integers(len(inn)))]
            dropped.remove(a)
            dropped.add(b)
        return DropPattern(sp.n_layers, tuple(sorted(dropped)))

    def _offspring(self) -> list[DropPattern]:
        out, keys = [], {p.key for p in self.parents}
        for _ in range(50 * self.config.offspring):
            if len(out) == self.config.offspring:
                break
            child = self._swap(self._tournament())
            if child.key not in keys and not self._seen(child):
                keys.add(child.key)
                out.append(child)
        return out

    def _initial_cohort(self) -> list[DropPattern]:
        sp, cfg = self.space, self.config
        size = min(max(cfg.offspring, cfg.survivors[-1]), sp.size())
        out, keys = [], set()

        def add(p: DropPattern) -> None:
            if p.key not in keys and len(out) < size:
                keys.add(p.key)
                out.append(p)

        if self.last > 0 and cfg.greedy_seed:  # after the greedy phase: only the one-shot seeds
            size = int(math.floor(cfg.seed_fraction * size + 0.5)) if cfg.scores is not None else 0
        if cfg.scores is not None:
            n_seed = int(math.floor(cfg.seed_fraction * size + 0.5)) if not (self.last > 0 and cfg.greedy_seed) else size
            drop = np.asarray(sp.droppable)
            order = drop[np.argsort([cfg.scores[i] for i in drop], kind="stable")]
            if n_seed:
                add(DropPattern(sp.n_layers, tuple(sorted(int(i) for i in order[: sp.k]))))
            w = np.exp(-np.arange(len(order)) / sp.k)
            w = w / w.sum()
            for _ in range(50 * size):
                if len(out) >= n_seed:
                    break
                add(DropPattern(sp.n_layers, tuple(sorted(int(i) for i in self.rng.choice(order, sp.k, replace=False, p=w)))))
        for _ in range(50 * size):
            if len(out) >= size:
                break
            add(sp.sample(self.rng))
        return out

    # -- state -----------------------------------------------------------------------

    def default_budget(self, stage_tokens: tuple[int, ...]) -> int | None:
        """``budget_share x greedy_reference(...)`` over the whole set, scaled by ``max(1, 8 x stage-0 share)``
        in multi-stage runs (``None`` when ``budget_share`` is 0). The greedy seeding runs on stage 0, so its
        cost grows with that share: 1/AUTO_SHARE (the auto first stage on >= 512 tokens), where 0.135 was
        calibrated, keeps it;
        on 2 x 128 tokens the auto first stage (64 tokens) is 1/4 of the set and the budget doubles."""
        sp, full = self.space, stage_tokens[-1]
        ref = greedy_reference(sp.n_layers, sp.n_droppable, sp.k, full)
        scale = max(1.0, AUTO_SHARE * stage_tokens[0] / full) if len(stage_tokens) > 1 else 1.0
        return int(self.config.budget_share * scale * ref) or None

    def _extra_state(self) -> dict:
        return {"greedy": self.greedy, "screen": self.screen, "shortlist": self.shortlist, **super()._extra_state()}

    def _load_extra_state(self, d: dict) -> None:
        self.greedy = None if d.get("greedy") is None else [int(i) for i in d["greedy"]]
        self.screen = None if d.get("screen") is None else [int(i) for i in d["screen"]]
        self.shortlist = [int(i) for i in d.get("shortlist", [])]
        super()._load_extra_state(d)
