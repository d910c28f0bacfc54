"""What the bad-input tests share: a tiny model with its card and plan, broken variants, CLI helpers.

``from bad_world import ...`` in tests (as ``tiny``); each test module builds its world once.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from typer.testing import CliRunner

from layercard import artifacts
from layercard.cli import app

FACTS = "synthetic:facts"
TRAIN = "--batch-size 4 --max-length 64 --train-examples 8 --eval-examples 4"
ONE_STEP = "--steps 1 --checkpoint-every 0"
EVAL = "--examples 4 --batch-size 4 --max-new-tokens 2 --device cpu"
CARD = "--roles q,v --max-length 64 --batch-size 4 --no-coupling --device cpu"


def dead_pid() -> int:
    """A process id no process can have (above the system's largest)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1000
    except OSError:
        return 999_999


@dataclasses.dataclass(frozen=True)
class World:
    """What the cases start from: a tiny model folder, its card and plan, and broken variants."""

    root: Path
    model: Path
    card: Path  # card.json (with a cost model)
    plan: Path  # plan.json (LoRA on two layers)
    nan_model: Path  # the tiny model with a NaN output head
    nan_adapter: Path  # a LoRA adapter of the tiny model whose B matrices are NaN
    adapter: Path  # a sound LoRA adapter of the tiny model
    data: Path  # a four-example JSONL task
    live: subprocess.Popen  # a live process that is not layercard (it holds planted locks)


def cli(line: str | list[str]) -> Any:
    """Run one command line through the real CLI (split at spaces: the tests' paths hold none)."""
    return CliRunner().invoke(app, line.split() if isinstance(line, str) else line)


def one_error_line(r: Any, code: int = 2) -> str:
    """The single line a failing command printed (asserting there is exactly one, an error)."""
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == code, r.output
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error: "), r.output
    return lines[0]


def edited(src: Path, dst: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """``src`` (JSON) with ``change`` applied, written to ``dst`` as Python's json writes NaN: ``NaN``."""
    d = json.loads(src.read_text())
    change(d)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(d))
    return dst


def lock_record(pid: int, **kw: Any) -> str:
    rec = {
        **artifacts._owner_record(),
        "pid": pid,
        "pid_start": artifacts._pid_start(pid),
        "command": "layercard run other.yaml",
        **kw,
    }
    return json.dumps(rec)


def make_world(root: Path) -> World:
    """Build the world under ``root`` (stop its ``live`` process when done)."""
    model = root / "tiny"
    tiny_model("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    r = cli(f"card -m {model} -t {FACTS} -o {root / 'card'} {CARD} --calibrate --calibrate-steps 1")
    assert r.exit_code == 0, r.output
    card = root / "card" / "card.json"
    r = cli(f"plan --policy card --budget layers=2 --score gradnorm -c {card} -o {root / 'plan.json'}")
    assert r.exit_code == 0, r.output
    nan_model = root / "nan-model"
    bad = tiny_model("llama")
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan"))
    bad.save_pretrained(nan_model)
    tiny_tokenizer().save_pretrained(nan_model)
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.fill_(float("nan"))
    peft.save_pretrained(root / "nan-adapter")
    sound = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    sound.save_pretrained(root / "adapter")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"input": f"q {i}", "target": f"a {i}"}) + "\n" for i in range(4)))
    live = subprocess.Popen(["sleep", "600"])
    adapters = (root / "nan-adapter", root / "adapter")
    return World(root, model, card, root / "plan.json", nan_model, *adapters, data, live)


def run_config(w: World, **over: Any) -> dict[str, Any]:
    """A one-placement run config on the tiny model, small enough to run in seconds."""
    cfg: dict[str, Any] = {
        "model": str(w.model),
        "task": {"train": FACTS, "train_split": "train", "eval": FACTS, "eval_split": "test"},
        "threads": 1,
        "card": {"roles": "q,v", "examples": 4, "max_length": 64, "coupling": False, "calibrate": False},
        "placements": [{"name": "all", "policy": "all", "rank": 2}],
        "train": {"steps": 3, "batch_size": 4, "max_length": 64, "eval_examples": 4, "checkpoint_every": 0},
        "trim": False,
        "eval": {"examples": 4, "batch_size": 4, "max_new_tokens": 2, "base": False},
    }
    return {**cfg, **over}


def a_config(w: World, tmp: Path, text: str | None = None) -> Path:
    """A run config file (``run_config`` unless ``text`` is given) in ``tmp``."""
    cfg = tmp / "c.yaml"
    cfg.write_text(text if text is not None else yaml.safe_dump(run_config(w), sort_keys=False))
    return cfg


def temp_name(name: str, pid: int) -> str:
    """The name a write of ``name`` by process ``pid`` on this machine gives its temporary sibling."""
    return f".{name}.{artifacts._host_tag()}-{pid}.abcd1234.tmp"
