"""Layer coupling for every card the quality benchmarks use: the same card re-measured with the coupling
probe on, so the quality model can read how alike the layers' effects are on each task.

For every card of results/quality/cards (e2e_nlg, sst2) and results/placement_v2/cards (six tasks) it
re-measures the card with its own settings and ``coupling=True`` (cost calibration off: the coupling does
not read it), checks that every unit's statistics equal the committed card's, and writes the coupling
matrix with the card's timings (coupling.json) and its figure under
results/quality/coupled_cards/<benchmark>/<task>/; the rest of the card is the committed one. A task
already there is kept, so the script resumes where it stopped.

    LAYERCARD_DATA=../shared/data .venv/bin/python benchmarks/coupled_cards.py [--tasks e2e_nlg,sst2]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality" / "coupled_cards"
sys.path.insert(0, str(ROOT / "benchmarks"))
THREADS = 2
STATS = ("grad_norm", "resnorm", "rate_linear")  # unit statistics compared with the committed card


def _config(card: Any) -> Any:
    """The committed card's settings with the coupling probe on and calibration off."""
    from layercard import CardConfig

    fields = {f.name for f in dataclasses.fields(CardConfig)}
    given = {k: v for k, v in card.config.items() if k in fields}
    return CardConfig(**(given | {"coupling": True, "calibrate": False}))


def _largest_difference(a: Any, b: Any) -> float:
    """The largest relative difference between two cards' unit statistics and captured@r values."""
    rows_b = {u.key: u for u in b.units}
    worst = 0.0
    for u in a.units:
        v = rows_b[u.key]
        pairs = [(getattr(u, s), getattr(v, s)) for s in STATS]
        pairs += [(float(x), float(v.captured[k])) for k, x in u.captured.items()]
        for x, y in pairs:
            worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-12))
    return worst


def coupling_record(bench: str, card: Any, wall: float, diff: float) -> dict[str, Any]:
    """What coupling.json keeps of a card measured with coupling: the matrix, what it was measured on, its
    timings and how far its unit statistics lie from the committed card's."""
    return {
        "benchmark": bench,
        "task": card.task["name"],
        "data_hash": card.task["data_hash"],
        "model_hash": card.model["hash"],
        "config": card.config,
        "coupling": card.coupling,
        "wall_s": wall,
        "timings": card.timings,
        "largest_relative_difference_from_committed": diff,
        "threads": THREADS,
    }


def measure(tasks: set[str] | None) -> None:
    import torch
    from noise_scale import _sources

    from layercard import load_model, measure_card
    from layercard.artifacts import write_json
    from layercard.card import Card
    from layercard.card import figures as card_figures

    torch.set_num_threads(THREADS)
    loaded = load_model("smollm2")
    for bench, name, folder, task, _batch in _sources():
        if tasks is not None and name not in tasks:
            continue
        dest = OUT / bench / name
        if (dest / "coupling.json").is_file():
            print(f"{bench} {name}: on disk", flush=True)
            continue
        committed = Card.load(folder / "card.json")
        t0 = time.perf_counter()
        card = measure_card(loaded, task, _config(committed), progress=False)
        wall = time.perf_counter() - t0
        if card.task["data_hash"] != committed.task["data_hash"]:
            raise SystemExit(f"{bench} {name}: the probe subset does not match the committed card's")
        diff = _largest_difference(committed, card)
        dest.mkdir(parents=True, exist_ok=True)
        card_figures.coupling(card, dest / "card_coupling.png")
        write_json(dest / "coupling.json", coupling_record(bench, card, wall, diff))
        print(f"{bench} {name}: {wall:.0f} s, coupling {card.timings.get('coupling_s', 0):.1f} s, "
              f"largest difference {diff:.2e}", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: every card)")
    a = ap.parse_args()
    measure(set(a.tasks.split(",")) if a.tasks else None)


if __name__ == "__main__":
    main()
