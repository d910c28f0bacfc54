#!/usr/bin/env bash
# Boundary layer on smollm2: all-layer LoRA on a gsm8k subset (and the all-layer e2e_nlg adapter from
# plan_train_e2e.sh), then trace and trim each. Resumable: finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/issue4}
E2E=${E2E_ADAPTER:-runs/plan_train_e2e/train_all/adapter}
LC=.venv/bin/layercard
D=${LAYERCARD_DATA:-../shared/data}
RES=benchmarks/results/boundary
mkdir -p "$R" "$RES"
[ -f "$R/plan_all.json" ] || $LC plan --card runs/plan_train_e2e/card/card.json --policy all --rank 8 \
  --out "$R/plan_all.json"
[ -f "$R/gsm8k_train/train_metrics.json" ] || $LC train --plan "$R/plan_all.json" --task "$D/gsm8k/train.jsonl" \
  --train-examples 400 --val-task "$D/gsm8k/test.jsonl" --eval-examples 16 --eval-every 30 --steps 60 \
  --batch-size 4 --max-length 256 --lr 2e-3 --out "$R/gsm8k_train"
[ -f "$R/gsm8k_trace/trace.json" ] || $LC trace --model smollm2 --adapter "$R/gsm8k_train/adapter" \
  --task "$D/gsm8k/test.jsonl" --examples 16 --out "$R/gsm8k_trace"
[ -f "$R/e2e_trace/trace.json" ] || $LC trace --model smollm2 --adapter "$E2E" --task "$D/e2e_nlg/test.jsonl" \
  --examples 32 --out "$R/e2e_trace"
[ -f "$R/gsm8k_trim/trim.json" ] || $LC trim --model smollm2 --adapter "$R/gsm8k_train/adapter" \
  --task "$D/gsm8k/test.jsonl" --examples 8 --window 18:29 --max-new-tokens 160 --latency-repeats 1 \
  --out "$R/gsm8k_trim"
[ -f "$R/e2e_trim/trim.json" ] || $LC trim --model smollm2 --adapter "$E2E" --task "$D/e2e_nlg/test.jsonl" \
  --examples 24 --window 10:29 --latency-repeats 2 --out "$R/e2e_trim"
for t in gsm8k e2e; do
  cp "$R/${t}_trace/trace.json" "$RES/${t}_trace.json"
  cp "$R/${t}_trace/trace.png" "$RES/${t}_trace.png"
  cp "$R/${t}_trim/trim.json" "$RES/${t}_trim.json"
  cp "$R/${t}_trim/trim.png" "$RES/${t}_trim.png"
done
cp "$R/gsm8k_train/train_metrics.json" "$RES/gsm8k_train_metrics.json"
