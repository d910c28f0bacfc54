#!/usr/bin/env bash
# The placement benchmark in the order that makes a partial result most useful: selection data first,
# then every task's budget grid, the confirmation singles, the trims and last the seed repeats.
# Each step is resumable; re-running the script continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
B=benchmarks/placement.py
$PY $B cards
$PY $B single --tasks e2e_nlg,sst2
$PY $B select
$PY $B policies --groups grid
$PY $B single --tasks gsm8k,samsum
$PY $B confirm
$PY $B trim
$PY $B policies --groups repeat
$PY $B report
