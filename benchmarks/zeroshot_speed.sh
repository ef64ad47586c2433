#!/usr/bin/env bash
# Issue 5: zero-shot accuracy (7 tasks, offline lm-eval task copies) and speed for dense SmolLM2-135M and for the
# SLEB and EvoP 20% (k=6) layer-drop patterns found by benchmarks/evop_tables.py (wikitext2 calibration).
# Usage: bash benchmarks/zeroshot_speed.sh [LIMIT] [OUTDIR]; then python benchmarks/zeroshot_speed_md.py OUTDIR
set -euo pipefail
LIMIT=${1:-100}
OUT=${2:-bench_runs/zeroshot}
EP=${EVOPRUNE:-.venv/bin/evoprune}
TASKS=arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa
SLEB=4,13,14,15,16,17
EVOP=8,14,17,18,20,22
mkdir -p "$OUT"
$EP eval smollm2-135m --tasks $TASKS --limit "$LIMIT" --out "$OUT/eval_dense.json" > /dev/null
$EP eval smollm2-135m --tasks $TASKS --limit "$LIMIT" --drop $SLEB --out "$OUT/eval_sleb.json" > /dev/null
$EP eval smollm2-135m --tasks $TASKS --limit "$LIMIT" --drop $EVOP --out "$OUT/eval_evop.json" > /dev/null
$EP bench smollm2-135m --drop $SLEB --repeats 5 --out "$OUT/bench_sleb.json" > /dev/null
$EP bench smollm2-135m --drop $EVOP --repeats 5 --out "$OUT/bench_evop.json" > /dev/null
