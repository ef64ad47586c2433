"""FLOPs of a search run, LM head included (issue 16): what token-layers leave out.

Token-layers count decoder blocks only. Every evaluation also runs the LM head (and the embedding,
which costs no FLOPs) on all its tokens; on SmolLM2-135M the head (49,152 x 576) costs about as much
per token as 8 decoder blocks, so a method that saves blocks but not tokens looks better in
token-layers than in FLOPs. Here, per token:

- a decoder block: 2 x (weights of its linear layers) + attention scores and values,
  4 x heads x head_dim x the mean causal context ``(T + 1) / 2`` of a ``T``-token window;
- the LM head: 2 x vocab x hidden.

A history row's input tokens are its predicted tokens x ``T / (T - 1)`` (every window predicts
``T - 1``), its blocks are ``eval_token_layers / input tokens``; each stage's dense forward (prefix
cache) is charged once as a full forward of its slice. Multiply-adds count 2 FLOPs; norms, rotary
embeddings and softmax are left out (< 1% here).
"""
from __future__ import annotations

from pathlib import Path

from evoprune.plan.flops import block_flops as _block
from evoprune.plan.flops import per_token  # noqa: F401 (the benchmarks import it from here)
from evoprune.runner.config import SearchConfig
from evoprune.runner.problems.common import stage_slices, stage_tokens
from evoprune.runner.rundir import RunDir


def run_flops(run: Path, f: dict, n_layers: int, upto_generation: int | None = None) -> dict:
    """``{"total", "head", "blocks"}`` FLOPs of a run (its rows up to ``upto_generation``, setup included)."""
    rd = RunDir(run)
    cfg = SearchConfig.from_dict(rd.read_config())
    rows = rd.read_history()
    res = rd.read_result()
    slices = stage_slices(stage_tokens(cfg.method_options), res["calib"]["samples"], res["calib"]["seqlen"])
    blocks = head = 0.0
    for m, t in slices:  # one dense forward per stage
        blocks += m * t * n_layers * _block(f, t)
        head += m * t * f["head"]
    for r in rows:
        if upto_generation is not None and r["generation"] > upto_generation:
            continue
        m, t = slices[r.get("stage", -1)]
        tokens_in = r["tokens"] * t / (t - 1)
        blocks += r["eval_token_layers"] * _block(f, t)
        head += tokens_in * f["head"]
    return {"total": blocks + head, "head": head, "blocks": blocks}
