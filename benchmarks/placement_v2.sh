#!/usr/bin/env bash
# The CPU profile of the placement benchmark v2 in the order its parts are needed: the fit tasks first
# (main, trim, seeds), then the peers, then the other tasks. Every run is skipped when its JSON exists,
# so the script resumes where it stopped. Usage: bash benchmarks/placement_v2.sh > placement_v2.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
py=".venv/bin/python benchmarks/placement_v2.py run"
$py --tasks e2e_nlg,sst2 --part main
$py --tasks e2e_nlg,sst2 --part trim,peers
$py --tasks e2e_nlg,sst2 --part seeds
$py --tasks facts,format,gsm8k,samsum --part main,trim,peers
.venv/bin/python benchmarks/placement_v2_summary.py
