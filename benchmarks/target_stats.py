"""Each benchmark task's target statistics, read from its training data alone (no model run): how many
target tokens an example carries and how varied they are.

For every task the quality forms are fitted or scored on (quality.py's two, placement_v2.py's four others,
fresh_tasks.py's), the seeded subset of up to 1000 training examples its runs read is encoded at the task's
max_length with smollm2's tokenizer, and over the tokens that carry loss it records:

- ``entropy``: the plug-in entropy, in nats, of the token ids of the first ``SAMPLE`` of them in subset order
  (a fixed sample, so that tasks with long targets are not credited with more types for having more tokens);
- ``tokens_per_example``: their mean number per example;
- ``card_entropy``: the same entropy as a card reads it from the task it is given (``layercard.tasks.
  target_entropy``: the first ``SAMPLE`` target tokens in a seeded shuffle of the examples, not in source
  order), which is what a plan's warning reads.

quality.py ``targetcoverage`` scales the depth-coverage penalty by them; quality_confirm.py and fresh_tasks.py
score the resulting forms frozen.

    LAYERCARD_DATA=../shared/data .venv/bin/python benchmarks/target_stats.py
        # writes results/quality/target_stats.{json,md}
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "quality" / "target_stats.json"  # and .md beside it
SAMPLE = 2048
TRAIN_EXAMPLES, SEED = 1000, 0


def target_statistics(encoded: Sequence[Any], sample: int = SAMPLE) -> dict[str, float]:
    """The entropy of the first ``sample`` loss-carrying tokens and their mean number per example."""
    from layercard.tasks import plug_in_entropy
    from layercard.tasks.loss import IGNORE_INDEX

    per_example = [[t for t in e.labels if t != IGNORE_INDEX] for e in encoded]
    ids = [t for ex in per_example for t in ex]
    return {
        "entropy": plug_in_entropy(ids[:sample]),
        "entropy_tokens": min(sample, len(ids)),
        "tokens_per_example": len(ids) / len(per_example),
        "examples": len(per_example),
    }


def _tasks() -> dict[str, tuple[Any, int]]:
    """Every task's training subset and max_length, by name."""
    import fresh_tasks as F
    import placement_v2 as P
    import quality as Q

    from layercard import load_task

    out: dict[str, tuple[Any, int]] = {}
    for name, s in Q.TASKS.items():
        out[name] = (load_task(f"{name}:{s.train_split}").subset(TRAIN_EXAMPLES, seed=SEED), s.max_length)
    for name, s in P.TASKS.items():
        if name not in out:
            out[name] = (load_task(s.train).subset(TRAIN_EXAMPLES, seed=SEED), s.max_length)
    for name, t in F.TASKS.items():
        out[name] = (F.load(t, t.train_split).subset(TRAIN_EXAMPLES, seed=SEED), t.max_length)
    return out


def main() -> None:
    from layercard import load_model
    from layercard.artifacts import write_json, write_text
    from layercard.tasks import target_entropy
    from layercard.tasks.encode import encode_task

    tokenizer = load_model("smollm2").tokenizer
    stats = {
        name: {
            **target_statistics(encode_task(tokenizer, task, max_length=max_length)),
            "card_entropy": target_entropy(tokenizer, task, max_length, seed=SEED)[0],
        }
        for name, (task, max_length) in _tasks().items()
    }
    write_json(OUT, {"sample": SAMPLE, "train_examples": TRAIN_EXAMPLES, "tasks": stats})
    write_text(OUT.with_suffix(".md"), _markdown(stats))
    print(_markdown(stats))


def _markdown(stats: dict[str, dict[str, float]]) -> str:
    lines = [
        "# Target statistics of the benchmark tasks",
        "",
        f"smollm2's tokenizer, each task's seeded subset of up to {TRAIN_EXAMPLES} training examples at its "
        f"max_length; the tokens that carry loss. Entropy: plug-in, nats, over the first {SAMPLE} of them; "
        "as a card reads it: the same over the first of them in a seeded shuffle of the examples.",
        "",
        "| task | examples | target tokens per example | entropy (nats) | tokens in the entropy | "
        "entropy as a card reads it |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s['examples']} | {s['tokens_per_example']:.1f} | {s['entropy']:.3f} | "
            f"{s['entropy_tokens']} | {s['card_entropy']:.3f} |"
        )
    return "\n".join([*lines, ""])


if __name__ == "__main__":
    main()
