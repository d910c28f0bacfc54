"""Peak memory at another batch with the memory share split by depth, on the committed cost runs.

The cost model grows a measured share m of the memory training adds with positions, the same share for
every placement (``CostModel.at_batch``, ``train.metrics.predictions``). The split tried here: only the
depth term (``memory_per_layer_mib`` times the layers backward reaches) and what remains of the all-layer
placement's positional memory beyond its own depth term (m times its added memory, less L times the depth
term, at least 0) grow with positions; the rest of a placement's added memory does not. No model is
loaded: every cost.py results folder whose card measured a memory share is priced both ways from its card
and runs, at each run's largest micro-batch.

    .venv/bin/python benchmarks/memory_share_split.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
COST = ROOT / "benchmarks" / "results" / "cost"
FOLDERS = (
    "sixth", "seventh", "cpu-batch32", "cpu-batch32-forward", "cpu-batch32-forward-repeat",
    "gpu-nvidia-h200/bfloat16-b8", "gpu-nvidia-h200/bfloat16-b32",
)  # fmt: skip


def priced(cm: Any, run: dict[str, Any]) -> tuple[float, float]:
    """(one share for all, split by depth): the run's predicted peak MiB at its largest micro-batch."""
    from layercard.train.metrics import predictions

    k = run["max_batch_positions"] / cm.batch_positions
    depth = cm.n_layers - min(run["layers"])
    memory = cm.memory(run["layers"], run["modules"], run["params"], run.get("input_width"))
    # the model's own pricing, as a training run rescales it to its largest micro-batch
    planned = {"calibration_batch_positions": cm.batch_positions, "memory": memory}
    shared = predictions(planned, None, None, 0.0, None, max_positions=run["max_batch_positions"])
    resident = float(cm.memory_resident_mib)
    added = memory["peak_mib"] - resident
    m = float(cm.memory_position_share)
    beyond = max(m * cm.batch_scaling["added_mib"] - cm.memory_per_layer_mib * cm.n_layers, 0.0)
    growing = min(cm.memory_per_layer_mib * depth + beyond, added)
    return shared["predicted_peak_memory_scaled_mib"], resident + added + growing * (k - 1.0)


def main() -> int:
    from layercard.artifacts import write_json, write_text
    from layercard.card import Card
    from layercard.cost import CostModel

    rows = []
    for folder in FOLDERS:
        for task in ("e2e_nlg", "sst2"):
            base = COST / folder / task
            if not (base / "card" / "card.json").is_file():
                continue
            cm = CostModel.from_dict(Card.load(base / "card" / "card.json").cost or {})
            if cm.memory_position_share is None or not cm.batch_positions:
                continue
            errors: dict[str, list[float]] = {"shared": [], "split": []}
            ks = []
            for path in sorted((base / "runs").glob("*.json")):
                run = json.loads(path.read_text())
                shared, split = priced(cm, run)
                measured = run["peak_memory_mib"]
                errors["shared"].append((shared - measured) / measured)
                errors["split"].append((split - measured) / measured)
                ks.append(run["max_batch_positions"] / cm.batch_positions)
            rows.append(
                {
                    "folder": folder,
                    "task": task,
                    "runs": len(ks),
                    "positions_over_card": statistics.fmean(ks),
                    "memory_position_share": cm.memory_position_share,
                    **{f"{k}_mae": statistics.fmean(abs(e) for e in v) for k, v in errors.items()},
                }
            )
    out = {"benchmark": "memory_share_split", "rows": rows}
    write_json(COST / "memory_share_split.json", out)
    lines = [
        "# Peak memory at another batch: one memory share for every placement, or split by depth",
        "",
        "Committed cost.py runs, each priced from its own card at its largest micro-batch; mean absolute "
        "error of the peak. Split: only the depth term and the all-layer placement's positional memory "
        "beyond it grow with positions.",
        "",
        "| results | task | runs | positions ÷ card's | card's memory share | one share | split by depth |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['folder']} | {r['task']} | {r['runs']} | {r['positions_over_card']:.2f} | "
            f"{100 * r['memory_position_share']:.1f}% | {100 * r['shared_mae']:.1f}% | "
            f"{100 * r['split_mae']:.1f}% |"
        )
    write_text(COST / "memory_share_split.md", "\n".join(lines) + "\n")
    print(f"wrote {COST / 'memory_share_split.md'}")
    return 0


if __name__ == "__main__":
    from usage import no_options

    no_options(__doc__)
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
