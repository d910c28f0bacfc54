#!/usr/bin/env bash
# Cards of smollm2 on e2e_nlg (validation) and gsm8k (train), 64 examples each, with coupling and the
# calibrated cost model, and their comparison. Outputs: benchmarks/results/cards/.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${LAYERCARD_DATA:-../shared/data}
OUT=${1:-runs/cards}
RES=benchmarks/results/cards
LC=.venv/bin/layercard
[ -f "$OUT/e2e/card.json" ] || $LC card --model smollm2 --task "$DATA/e2e_nlg/validation.jsonl" --examples 64 \
  --coupling --out "$OUT/e2e"
[ -f "$OUT/gsm8k/card.json" ] || $LC card --model smollm2 --task "$DATA/gsm8k/train.jsonl" --examples 64 \
  --coupling --out "$OUT/gsm8k"
mkdir -p "$RES"
$LC compare "$OUT/e2e/card.json" "$OUT/gsm8k/card.json" --out "$RES/compare_e2e_gsm8k.png" --json \
  > "$RES/compare_e2e_gsm8k.json"
for t in e2e gsm8k; do
  cp "$OUT/$t/card.md" "$RES/card_$t.md"
  for f in heatmap profiles coupling; do cp "$OUT/$t/card_$f.png" "$RES/card_${t}_$f.png"; done
done
