"""Placement benchmark: does card-guided placement beat fixed rules at the same budget, on real data?

The claim under test: at the same layer budget, card-guided LoRA placement beats fixed rules and
comes close to all-layer LoRA at a fraction of its cost. Model smollm2; tasks e2e_nlg (train on
validation, evaluate on test), sst2 (train → validation), gsm8k (train → test, subsets) and samsum
(train on validation, evaluate on test), all from ../shared/data.

Phases, each a sub-command (``all`` runs them in order, skipping whatever is cached)::

    cards     one Layer Card per task on its training split (64 examples, coupling and cost calibration)
    single    single-layer LoRA runs at 8 layers per task: measured test-loss drop vs the base model
    select    e2e_nlg and sst2 only: Spearman of every predicted-gain score with those drops; the best
              mean is frozen in RESULTS/placement_default_score.json (never overwritten without --refreeze)
    confirm   the frozen score's Spearman on gsm8k and samsum, unchanged (every score's too, for transparency)
    policies  the budget × policy grid (card policies use the frozen score), then the 3-seed repeats
    trim      trim the all-30 run of each task (layercard.trim.trim) and evaluate the trimmed adapter
    report    JSON + markdown tables + PNG plots under RESULTS (works on partial results, listing the gaps)

Every train+eval run is cached as ROOT/runs/<sha256 of its full config>/result.json, written last and
atomically: a crashed run leaves no result.json and is redone from scratch. Finished runs are also copied
to the committed ledger RESULTS/placement_runs/<sha256>.json (cards to RESULTS/placement_cards/, trims to
RESULTS/placement_trims/), so a fresh checkout resumes where the last sitting stopped, and `report` rewrites
the committed reports byte for byte from the ledger alone. The config is what is trained and evaluated
(model and data hashes, layers, LoRA config, training and evaluation settings), so two policies that pick
the same layers share one run, and a changed card only re-runs placements that moved.

    .venv/bin/python benchmarks/placement.py --estimate                 # planned runs and hours
    .venv/bin/python benchmarks/placement.py all                        # everything (about 3 h on 2 cores)
    .venv/bin/python benchmarks/placement.py policies --tasks e2e_nlg --only card,uniform --limit-runs 5
    .venv/bin/python benchmarks/placement.py --dry-run-tiny all         # whole control flow, ~1-2 min

``--dry-run-tiny`` builds a tiny random 30-layer Llama folder and uses synthetic tasks with 2 training
steps; it writes under runs/placement-dry/ (results included) and never touches benchmarks/results/.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The benchmark's package (benchmarks/placement/) sits beside this script.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from placement.cli import main  # noqa: E402  (the package pins the BLAS kernel before numpy loads)

if __name__ == "__main__":
    main(doc=__doc__)
