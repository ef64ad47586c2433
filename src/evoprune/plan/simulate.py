"""Dry runs of a search: the real strategy, a synthetic fitness, the evaluators' cost model. Torch-free.

Owns :func:`dry_run`. It drives the method's own strategy (same options, same seed, same space) through
the loop's ask -> evaluate -> tell cycle with the budget stop of :mod:`evoprune.runner.loop`, but no
model runs: a candidate's cost comes from ``cost(stage, genome)``, the token-layers its evaluator would
report, and its loss is synthetic, fixed by its key and stage. For the layer spaces it is additive over
the dropped positions ``u`` of ``n`` with weights ``1 / (1 + 10 u / n)`` (early blocks matter most, as
measured on real models, so the searches drop late blocks and their candidates are cheap, as real ones
are) plus a small pseudo-random term; elsewhere it is pseudo-random. So

- for a method whose choices do not depend on the losses (``random``, ``exhaustive``, ``uniform``,
  one-shot orders), the evaluation count and token-layers are the run's exactly (LRU bookkeeping included);
- for an adaptive one (``sleb``, ``evo``, ``darwinlm``) they are those of the same method on a landscape
  without structure: the evaluation count of a fixed schedule (SLEB's greedy steps) is exact, costs that
  depend on which blocks a candidate drops are a sample, and a budget-bound run stops within one
  candidate of its budget either way. Racing is not simulated (every candidate completes: an upper
  bound on its cost).
"""
from __future__ import annotations

import zlib

import numpy as np

__all__ = ["dry_run", "MAX_EVALUATIONS"]

MAX_EVALUATIONS = 200_000  # a dry run stops here (a method without a budget or a schedule)


def _loss(genome, key: str, stage) -> float:
    noise = zlib.crc32(f"{key}@{stage}".encode()) / 2 ** 32
    units = getattr(genome, "units", None)
    if units is None and hasattr(genome, "dropped"):
        units, n = genome.dropped, genome.n_layers
    elif units is not None:
        n = 2 * genome.n_layers
    else:
        return 1.0 + noise
    return 1.0 + sum(1.0 / (1.0 + 10.0 * u / n) for u in units) + 0.05 * noise


def dry_run(cfg, space, cost, *, stage_tokens: tuple[int, ...], inputs: dict | None = None, setup: int = 0,
            links: dict | None = None) -> dict:
    """``{"evaluations", "token_layers", "per_stage", "budget", "capped"}`` of a dry run of ``cfg``'s
    method over ``space`` (see the module docstring). ``cost(stage, genome, done)``: token-layers of one
    evaluation (``stage`` ``None`` for one-stage methods; ``done``: leading batches it continues from, as
    the loop's continuation does, from ``links`` = :func:`~evoprune.runner.problems.common.stage_links`);
    ``setup``: token-layers spent before the first (counted against the budget, as the loop does);
    ``inputs``: the strategy's one-shot inputs."""
    from ..search import make_strategy

    strategy = make_strategy(cfg.method, space, np.random.default_rng([cfg.seed, 2]),
                             **cfg.strategy_options(inputs or {}))
    given = cfg.budget.budget_token_layers
    budget = given if given is not None else strategy.default_budget(stage_tokens)
    spent, evaluations, per_stage, stopped, scored = setup, 0, {}, False, set()
    while not strategy.done and not stopped and evaluations < MAX_EVALUATIONS:
        cands, fits = strategy.ask(), []
        for c in cands:
            if budget is not None and spent >= budget and (given is not None or strategy.best is not None):
                stopped = True
                break
            stage = getattr(c, "stage", None)
            done = next((k for s, k in (links or {}).get(stage, ()) if (c.key, s) in scored), 0)
            spent += cost(stage, getattr(c, "pattern", c), done)
            scored.add((c.key, stage))
            evaluations += 1
            per_stage[stage] = per_stage.get(stage, 0) + 1
            fits.append(_loss(getattr(c, "pattern", c), c.key, stage))
        if fits:
            strategy.tell(cands[: len(fits)], fits)
        elif not cands:
            break
    return {"evaluations": evaluations, "token_layers": spent, "budget": budget,
            "per_stage": {("all" if s is None else str(s)): n for s, n in sorted(per_stage.items(), key=str)},
            "capped": evaluations >= MAX_EVALUATIONS}
