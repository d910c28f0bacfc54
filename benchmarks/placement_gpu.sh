#!/usr/bin/env bash
# The placement benchmark's GPU profile (`--profile gpu`): one process per task, the four sharing the GPU,
# then `confirm` and `report`. Resumable: re-running continues where it stopped.
#   benchmarks/placement_gpu.sh [--root DIR --results DIR]     (PY=python to use another interpreter)
# Logs go to runs/logs/placement-gpu-TASK.log. Results: benchmarks/results/gpu-DEVICE (e.g. gpu-h100-80gb-hbm3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}  # four processes share the machine's cores
mkdir -p runs/logs
# Convert the model's GGUF once before the four processes start, so they do not race to write the cache.
$PY -c "from layercard.models import load_model; load_model('smollm2')" || exit 1
for t in e2e_nlg sst2 gsm8k samsum; do
  (
    for ph in cards single policies trim; do
      $PY benchmarks/placement.py --profile gpu "$ph" --tasks "$t" "$@" || exit 1
    done
  ) > "runs/logs/placement-gpu-$t.log" 2>&1 &
done
wait
$PY benchmarks/placement.py --profile gpu confirm "$@"
$PY benchmarks/placement.py --profile gpu report "$@"
