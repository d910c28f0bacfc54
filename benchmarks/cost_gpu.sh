#!/usr/bin/env bash
# The cost benchmark (cost.py) on one CUDA GPU, on a model of smollm2's shapes with random weights
# (random_weights.py): predicted against measured step time and peak memory, valid for time and memory
# only. Three profiles, each in its own results folder, each resumable: bfloat16 at the CPU profile's
# batch of 8, bfloat16 at batch 32, float32 at batch 8. 20 steps per placement.
#   benchmarks/cost_gpu.sh LIKE_FOLDER RESULTS_FOLDER     (PY=python3, PROFILES="DTYPE:BATCH ..." to choose)
# LIKE_FOLDER holds smollm2's config.json and tokenizer files (no weights needed); the tasks' data come
# from $LAYERCARD_DATA as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LIKE=${1:?usage: cost_gpu.sh LIKE_FOLDER RESULTS_FOLDER}
RES=${2:?usage: cost_gpu.sh LIKE_FOLDER RESULTS_FOLDER}
MODEL=${MODEL:-runs/random-smollm2}  # 0.5 GB: kept out of the results
[ -f "$MODEL/random_weights.json" ] || $PY benchmarks/random_weights.py "$LIKE" "$MODEL"
for profile in ${PROFILES:-bfloat16:8 bfloat16:32 float32:8}; do
  dtype=${profile%:*} batch=${profile#*:}
  $PY benchmarks/cost.py run --model "$MODEL" --device cuda --dtype "$dtype" --batch "$batch" --steps 20 \
    --threads 4 --out "$RES/$dtype-b$batch"
done
