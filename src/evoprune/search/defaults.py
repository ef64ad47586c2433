"""Tuned constants of the searches, each with the setting it was tuned on and the measurement behind it.

Every number here was chosen on SmolLM2-135M-Instruct (30 blocks) on the 2-core CPU machine, with random
wikitext2-valid calibration windows; ``docs/RESULTS.md`` holds the tables (section named on each constant). A
model or budget far from that setting may prefer other values: each constant is also an option (its flag or
recipe key is named), so it can be re-tuned per run without a code change.
"""
from __future__ import annotations

__all__ = ["RACE_MARGIN", "BUDGET_SHARE", "GREEDY_PROMOTE", "AUTO_SHARE", "AUTO_MIN_TOKENS", "START_SHARE",
           "BUDGET_EVALS", "AUTO_CACHE_MB", "PROBE_GAIN"]

# Racing (``race_margin``, layers / width / levels): a candidate scored batch by batch stops once it trails its
# references by more than this many nats per token still to score. Part of layers evo's default configuration
# that matched or beat SLEB at 0.21-0.24x its token-layers in 6 of 6 cases (k = 6, 9 of 30, seeds 0-2; RESULTS,
# "Search cost: evo (default options) vs baselines"); in the 2 x 256 width / levels runs it stopped no candidate
# (RESULTS, "Width and level selection").
RACE_MARGIN = 0.05

# Layers evo's derived budget (``budget_share``): this x a naive full-fidelity greedy pass to k blocks, scaled
# by max(1, AUTO_SHARE x the first stage's share of the tokens). On SmolLM2 (k = 6, 9; 2 x 128 and 4 x 512
# tokens) it matches or beats a prefix-cached SLEB at 0.21-0.24x SLEB's token-layers (RESULTS, "Search cost").
BUDGET_SHARE = 0.135

# Layers evo's greedy seeding (``greedy_promote``): stage-0 candidates per step re-scored at full fidelity.
# Without promotion the 512-token slice steered the greedy pass off SLEB's path (k = 6, seed 1: 4.4956 vs SLEB's
# 4.4895); 6 per step is the default configuration that met the SLEB target in 6 of 6 (RESULTS, "Search cost").
GREEDY_PROMOTE = 6

# ``tokens_per_stage="auto"``: the first selection stage scores 1/AUTO_SHARE of the calibration tokens, at
# least AUTO_MIN_TOKENS (or half the set). 1/8 of 4 x 512 is the first 256 tokens of the first window, the
# cheapest stage that still ranked layers evo's candidates well enough (RESULTS, "Search cost"; width and
# levels: "Width and level selection: old defaults vs today's", 30%, 2 x 256 tokens, seeds 0-2).
AUTO_SHARE = 8
AUTO_MIN_TOKENS = 64

# A finer space (sub-layers evo, levels darwinlm one-shot) starting from the block search spends by default
# START_SHARE x the block search's token-layers, its own run included: calib loss <= the block search's in 6
# of 6 cases at 20 / 30 / 50% (RESULTS, "Finer spaces at the cost of the coarser one").
START_SHARE = 2

# Levels darwinlm one-shot without --budget-token-layers (``budget_evals``): this many whole-set evaluations'
# worth of token-layers; with staged selection and racing it reached a lower calibration loss than the old
# 10 x 8 generations at <= 0.5x their token-layers (RESULTS, "Width and level selection", 30%, seeds 0-2).
BUDGET_EVALS = 35.0

# ``--cache-mb auto``: MiB of the shared-prefix LRU. Width / levels: the block-prefix states of ~29 SmolLM2
# candidates at 512 tokens. Layers: k = 6 of 30, 4 x 512 tokens, seed 0, evo at its default budget: 4.6535
# with it vs 4.7009 without (176 vs 123 evaluations; RESULTS, "Search cost").
AUTO_CACHE_MB = 1024.0

# Width evo's sensitivity rounds (``probe_gain``): a round moves the layer whose probe lowered the first stage's
# loss most, if by more than this many nats per token. With the least-squares reconstruction (the width default)
# probes gain less than without it: at 0.05 the rounds stopped after 2 of 4 on one seed; at 0.02 (and at 0, the
# same runs) all 4 rounds move a layer and calib loss falls on every seed (30%, 4 x 512 tokens, seeds 0-2: 4.083 /
# 4.049 / 3.745 vs 4.125 / 4.144 / 3.767; held-out wikitext2 and c4 fall too; RESULTS, "Width reconstruction").
PROBE_GAIN = 0.02
