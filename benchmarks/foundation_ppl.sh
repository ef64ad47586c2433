#!/usr/bin/env bash
# Dense vs layers-3,13-dropped SmolLM2-135M perplexity at seqlen 2048 (issue 2).
# Usage: bash benchmarks/foundation_ppl.sh [MAX_WINDOWS]   -> JSON lines on stdout
set -euo pipefail
W=${1:-40}
EP=${EVOPRUNE:-.venv/bin/evoprune}
for ds in wikitext2 c4; do
  for drop in "" "3,13"; do
    $EP ppl --model smollm2-135m --dataset $ds --seqlen 2048 --max-windows "$W" ${drop:+--drop $drop} | tail -n 1
  done
done
