"""A finer space's start: the block search's answer at the same budget, searched first as a run of its own.

Owns :func:`block_start`. Every block pattern is a sub-layer pattern (a dropped block: its attention and its
MLP) scored identically, and a level vector (both at the top of their ladders: every head group and channel
removed), so the sub-layer and level searches start from the answer of ``--space layers`` (its default
method, ``evo``) at the same budget and spend about as much again around it. The block search is a complete
run directory inside the run (``RUN/blocks``): same model, seed, fitness, execution options and calibration
set (``--calib-from RUN``), so it is resumable like any run, a killed sub-layer run continues it, and a finished
one is read back, not searched again. Its token-layers count as the finer run's setup work. The loop runs it
before the finer problem's setup, for a strategy that needs ``"start"``.

Budgets: ``--sparsity s`` of the block parameters is ``--sparsity s`` for blocks (``k = round(s * N)``: the same
parameters where blocks are alike, as in every supported family); ``--drop-count k`` sub-layers is ``k // 2``
blocks (none for ``k = 1``). A given ``--budget-token-layers`` lends half to the block search; when that half
ends before the block search scored a candidate on the whole set, the finer search starts without it (and the
block run is removed).
"""
from __future__ import annotations

import dataclasses
import shutil
import sys

from ..errors import UserError

__all__ = ["block_start", "BLOCKS_DIR"]

BLOCKS_DIR = "blocks"


def _block_config(cfg, run_path, space_options):
    from .config import SearchConfig
    from .sections import BudgetOptions

    b, n = cfg.budget, None
    given = None if b.budget_token_layers is None else max(1, b.budget_token_layers // 2)
    if b.drop_count is not None:
        n = b.drop_count // 2
        if n < 1:
            return None
        budget = BudgetOptions(drop_count=n, budget_token_layers=given)
    else:
        budget = BudgetOptions(sparsity=b.sparsity, budget_token_layers=given)
    calib = dataclasses.replace(cfg.calibration, calib_from=str(run_path))
    return SearchConfig(space="layers", method="evo", seed=cfg.seed, model=cfg.model, calibration=calib,
                        budget=budget, fitness=cfg.fitness, space_options=space_options, execution=cfg.execution)


def block_start(cfg, lm, run, progress: bool, search) -> dict | None:
    """Run (or read back) the block search of the finer search ``cfg`` in ``RUN/blocks`` with ``search`` (the
    runner's ``run_search``); returns ``{"run", "dropped_layers", "calib_loss", "token_layers", "evaluations"}``,
    or ``None`` when the budget has no block equivalent (one sub-layer, or more blocks than can be dropped)."""
    from .problems.layers import LayersOptions

    # sub-layers share the block space's options (protect_ends); other spaces get its defaults
    space_options = cfg.space_options if isinstance(cfg.space_options, LayersOptions) else LayersOptions()
    bcfg = _block_config(cfg, run.path, space_options)
    if bcfg is None:
        return None
    n = lm.adapter.n_layers(lm.model)
    k = bcfg.budget.k(n)
    if not 0 < k < n - (2 if space_options.protect_ends else 0):
        return None
    if progress:
        print(f"start: the block search at the same budget ({k} of {n} blocks) in {run.path / BLOCKS_DIR}",
              file=sys.stderr, flush=True)
    try:
        res = search(bcfg, run.path / BLOCKS_DIR, progress=progress, lm=lm)
    except UserError as e:
        if bcfg.budget.budget_token_layers is None:
            raise
        shutil.rmtree(run.path / BLOCKS_DIR, ignore_errors=True)
        if progress:
            print(f"start: none ({e})", file=sys.stderr, flush=True)
        return None
    return {"run": BLOCKS_DIR, "dropped_layers": [int(i) for i in res["dropped_layers"]],
            "calib_loss": float(res["calib_loss"]), "token_layers": int(res["token_layers"]),
            "evaluations": int(res["evaluations"])}
