"""The README's "Use it with your own data and trainer" examples, run as written on a tiny model.

The command lines run in-process with ``smollm2`` replaced by a tiny model folder and, for speed,
smaller sizes appended (a repeated option's last value wins); the Python block runs as written with
``load_model`` returning the tiny model.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from typer.testing import CliRunner

from layercard import models
from layercard.cli import app
from layercard.models import LoadedModel
from layercard.plan import Plan
from layercard.train import TrainMetrics

README = Path(__file__).resolve().parents[1] / "README.md"
LAYERS = 10  # the examples plan 8 layers
SMALLER = {
    "card": "--examples 8 --max-length 64 --batch-size 4 --no-calibrate --roles q,v".split(),
    "train": "--steps 2 --batch-size 4 --max-length 64".split(),
    "eval": "--examples 4 --batch-size 4 --max-new-tokens 8".split(),
}


def example(name: str, lang: str) -> str:
    block = re.search(rf"<!-- example: {name}[^>]*-->\n```{lang}\n(.*?)```", README.read_text(), re.S)
    assert block, f"README: the {name} example is missing"
    return block.group(1)


def command_lines(text: str) -> list[list[str]]:
    lines = text.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("layercard ")]


def run(args: list[str]) -> None:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"layercard {' '.join(args)}\n{res.output}"


@pytest.fixture()
def tiny_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny-model"
    tiny_model("llama", layers=LAYERS).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_alpaca_cli_example(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"instruction": "name the number", "input": str(i), "output": f"it is {i}"} for i in range(8)]
    Path("alpaca.json").write_text(json.dumps(rows))
    commands = command_lines(example("alpaca-cli", "bash"))
    assert [c[0] for c in commands] == ["card", "plan", "train", "train"]
    assert "--dry-run" in commands[2]
    for args in commands:
        args = [str(tiny_folder) if a == "smollm2" else a for a in args]
        run(args + SMALLER.get(args[0], []))
        if "--dry-run" in args:
            assert not Path("runs/mine/train").exists()  # the dry run writes nothing
    plan = Plan.load("runs/mine/plan.json")
    metrics = TrainMetrics.load("runs/mine/train")
    assert len(plan.layers) == 8 and metrics.steps == 2 and metrics.task["name"] == "alpaca"
    assert Path("runs/mine/train/adapter/adapter_config.json").is_file()


def test_tool_calls_cli_example(tiny_folder, tmp_path, monkeypatch):
    """The function-calling example: the record the README shows, varied, through its four commands;
    eval's primary metric is tool_call_match."""
    monkeypatch.chdir(tmp_path)
    shown = re.search(r"each ending in the call to make:\n\n```json\n(.*?)\n```", README.read_text(), re.S)
    assert shown, "README: the function-calling record is not shown"
    record = json.loads(shown.group(1))

    def varied(i: int) -> str:
        rec = json.loads(json.dumps(record))
        rec["messages"][0]["content"] = f"What is {i} minus 3?"
        call = rec["messages"][-1]["tool_calls"][0]["function"]
        call["arguments"] = json.dumps({"expression": f"{i}-3"})
        return json.dumps(rec) + "\n"

    Path("calls.jsonl").write_text("".join(varied(i) for i in range(8)))
    Path("calls_test.jsonl").write_text("".join(varied(i) for i in range(20, 24)))
    commands = command_lines(example("tool-calls-cli", "bash"))
    assert [c[0] for c in commands] == ["card", "plan", "train", "eval"]
    for args in commands:
        args = [str(tiny_folder) if a == "smollm2" else a for a in args]
        run(args + SMALLER.get(args[0], []))
    result = json.loads(Path("runs/calls/eval/eval.json").read_text())
    assert list(result["metrics"])[0] == "tool_call_match" and result["n"] == 4


def test_trainer_api_and_export_examples(tmp_path, monkeypatch):
    import layercard

    model = tiny_model("llama", layers=LAYERS)
    loaded = LoadedModel(model, tiny_tokenizer(), "tiny", models.weights_hash(model), "memory")
    monkeypatch.setattr(layercard.api, "load_model", lambda *a, **k: loaded)
    monkeypatch.chdir(tmp_path)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"what is {i} + 1?"},
                {"role": "assistant", "content": str(i + 1)},
            ]
        }
        for i in range(8)
    ]
    Path("chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(example("trainer-api", "python"), "README.md", "exec"), namespace)
    metrics = TrainMetrics.load("runs/chat/train/uniform8")
    plan = Plan.load("runs/chat/plan/uniform8/plan.json")
    assert metrics.steps == 20 and len(metrics.loss_curve) == 20 and metrics.s_per_step > 0
    assert metrics.predicted_step_time_s == plan.predicted["step_time_s"] is not None
    assert metrics.task["prompt"]["system"] == "Answer in one short sentence."

    (args,) = command_lines(example("export-axolotl", "bash"))
    run(args)
    cfg = yaml.safe_load(Path(args[args.index("--out") + 1]).read_text())
    assert cfg["adapter"] == "lora" and cfg["peft_layers_to_transform"] == plan.layers
    assert len(plan.layers) == 8 and cfg["lora_r"] == 8
    # the file the README shows has the modules this export wrote (the same names in the tiny Llama)
    shown = re.search(r"the file reads:\n\n```yaml\n(.*?)```", README.read_text(), re.S)
    assert shown, "README: the exported axolotl file is not shown"
    said = yaml.safe_load(shown.group(1))
    assert said["lora_target_modules"] == cfg["lora_target_modules"] and said["lora_r"] == cfg["lora_r"]
    n = len(said["lora_target_modules"]) * len(said["peft_layers_to_transform"])
    assert f"; {n} modules;" in shown.group(1)
