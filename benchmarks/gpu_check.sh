#!/usr/bin/env bash
# GPU acceptance check (issue 17): run in one go (<= 10 minutes) on a machine with a CUDA GPU.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, after `make setup`
#   bash benchmarks/gpu_check.sh --write    # also write the gpu-check section of docs/RESULTS.md
#
# It searches SmolLM2-135M on --device cuda (layers evo, width evo, levels one-shot; bf16 and fp32) beside
# the planner's memory prediction, benches on CUDA, runs Ray with one GPU actor and with
# --gpus-per-worker 0.5, loads with --device-map auto and checks sparse checkpoints on a CPU cache
# (see benchmarks/gpu_check.py). Without a GPU it stops at once with exit code 2 and says why;
# a failing step exits 1 naming the step. `--smoke` runs the same steps on the CPU (a check of the script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
smoke=0
for a in "$@"; do [ "$a" = "--smoke" ] && smoke=1; done
if [ "$smoke" = 0 ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi missing or lists none); this check needs one" >&2
    exit 2
  fi
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: torch $("$PY" -c 'import torch; print(torch.__version__)') cannot use the GPU" \
         "(a CPU build? install a CUDA build of torch first)" >&2
    exit 2
  fi
  nvidia-smi -L
fi
export EVOPRUNE_NO_PROGRESS=1
limit=600; [ "$smoke" = 1 ] && limit=2400   # the CPU is slower (the level databases take minutes there)
exec timeout "$limit" "$PY" benchmarks/gpu_check.py "$@"
