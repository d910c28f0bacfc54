#!/usr/bin/env bash
# card → plan (policy card, layers=8 | policy all) → train 100 steps → eval on test, smollm2 / e2e_nlg.
# Trains on e2e_nlg validation (the shipped data has no train split) and evaluates on test.
# Resumable: every stage whose output exists is skipped. Usage: benchmarks/plan_train_e2e.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs/plan_train_e2e}
DATA=${LAYERCARD_DATA:-../shared/data}
LC=.venv/bin/layercard
EVAL_N=${EVAL_N:-100}
mkdir -p "$R"
[ -f "$R/card/card.json" ] || $LC card --model smollm2 --task "$DATA/e2e_nlg/validation.jsonl" --examples 64 \
  --coupling --out "$R/card"
[ -f "$R/eval_base/eval.json" ] || $LC eval --model smollm2 --task "$DATA/e2e_nlg/test.jsonl" \
  --examples "$EVAL_N" --out "$R/eval_base"
for P in card all; do
  B=()
  [ "$P" = card ] && B=(--budget layers=8)
  [ -f "$R/plan_$P.json" ] || $LC plan --card "$R/card/card.json" --policy "$P" "${B[@]}" --rank 8 \
    --out "$R/plan_$P.json"
  [ -f "$R/train_$P/train_metrics.json" ] || $LC train --plan "$R/plan_$P.json" \
    --task "$DATA/e2e_nlg/validation.jsonl" --val-task "$DATA/e2e_nlg/test.jsonl" --eval-examples 32 \
    --eval-every 50 --steps 100 --out "$R/train_$P"
  [ -f "$R/eval_$P/eval.json" ] || $LC eval --model smollm2 --adapter "$R/train_$P/adapter" \
    --task "$DATA/e2e_nlg/test.jsonl" --examples "$EVAL_N" --out "$R/eval_$P"
done
.venv/bin/python benchmarks/summarize_plan_train.py "$R" benchmarks/results/plan_train_e2e
