"""Small data files in each format layercard reads, written into a test's folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

# Eight Alpaca rows of one length each (the tiny tokenizer is character-level): every batch has the same
# number of tokens, so the token counts the tests read are exact.
ALPACA = [{"instruction": f"name number {i}", "input": "", "output": f"it is {i}"} for i in range(8)]


def write_format(kind: str, folder: Path) -> str:
    """A small data set in ``kind``'s format; returns the task spec."""
    if kind == "chat":
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"hi {i}"},
                    {"role": "assistant", "content": f"hello {i}"},
                    {"role": "user", "content": "and then?"},
                    {"role": "assistant", "content": f"then {i + 1}"},
                ]
            }
            for i in range(8)
        ]
        path = folder / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)
    if kind == "alpaca":
        path = folder / "alpaca.json"
        path.write_text(json.dumps(ALPACA))
        return str(path)
    if kind == "csv":
        path = folder / "qa.csv"
        with open(path, "w", newline="", encoding="utf-8-sig") as fh:  # with a byte-order mark
            w = csv.writer(fh)
            w.writerow(["question", "answer"])
            w.writerows([[f"what is {i} + 1?", str(i + 1)] for i in range(8)])
        return str(path)
    datasets = pytest.importorskip("datasets")
    path = folder / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ALPACA), "validation": datasets.Dataset.from_list(ALPACA[:2])}
    ).save_to_disk(str(path))
    return str(path)
