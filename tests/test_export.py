"""Plans exported for PEFT, TRL, axolotl and LLaMA-Factory (layercard.export, `layercard export`).

Each tool's file is read back the way that tool reads it (its keys turned into a PEFT LoraConfig as
the tool does) and applied to a tiny model: the adapted modules must be exactly the planned ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from tiny import tiny_model, tiny_multimodal
from typer.testing import CliRunner

from layercard import models
from layercard.cli import app
from layercard.errors import LayercardError
from layercard.export import TARGETS, export_plan
from layercard.plan import Plan, PlannedUnit
from layercard.plan.ranks import lora_config

N_LAYERS = 4
AXOLOTL_KEYS = {
    "adapter", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "peft_layers_to_transform",
    "peft_layers_pattern", "lora_rank_pattern", "lora_alpha_pattern", "lora_fan_in_fan_out",
}  # fmt: skip
LLAMAFACTORY_KEYS = {"finetuning_type", "lora_target", "lora_rank", "lora_alpha", "lora_dropout"}


def make_plan(cells: dict[int, str], ranks: dict[str, int] | None = None, kind: str = "lora") -> Plan:
    """A plan adapting ``cells`` (layer → roles) of the tiny Llama, ranks 4 unless ``ranks`` says."""
    model = tiny_model("llama", layers=N_LAYERS)
    units = [
        PlannedUnit(u.key, u.layer, u.role, u.name, (ranks or {}).get(u.name, 4))
        for layer, roles in sorted(cells.items())
        for u in models.units(model, roles, layers=[layer])
    ]
    return Plan(
        provenance={},
        card={"model_id": "tiny", "model_hash": "0" * 64, "task": "facts", "n_layers": N_LAYERS},
        config={"policy": "test"},
        kind=kind,
        units=units,
        layers=sorted(cells),
        predicted={"params": 1000, "step_time_s": 0.01},
        lora_config=lora_config(units, None, 0.0) if kind == "lora" else None,
        adapter_config=None if kind == "lora" else {"kind": kind, "bottleneck": 4, "layers": sorted(cells)},
    )


def adapted(config: LoraConfig) -> dict[str, int]:
    """Module path → LoRA rank of every module ``config`` adapts on a fresh tiny Llama."""
    peft_model = get_peft_model(tiny_model("llama", layers=N_LAYERS), config)
    return {
        name.removeprefix("base_model.model."): module.lora_A["default"].out_features
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }


def planned(plan: Plan) -> dict[str, int]:
    return {u.name: u.rank for u in plan.units}


@pytest.fixture()
def auto_plan(tmp_path) -> tuple[Plan, Path]:
    """Non-contiguous layers 1 and 3, q and v, with two modules at their own rank (as rank=auto gives)."""
    ranks = {"model.layers.1.self_attn.q_proj": 8, "model.layers.3.self_attn.v_proj": 2}
    plan = make_plan({1: "q,v", 3: "q,v"}, ranks)
    return plan, plan.save(tmp_path / "plan.json")


def test_peft_json_and_snippet_build_exactly_the_planned_modules(auto_plan, tmp_path):
    plan, path = auto_plan
    res = CliRunner().invoke(app, ["export", str(path), "--to", "peft", "--out", str(tmp_path / "lora.json")])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "lora.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"]
    assert adapted(LoraConfig(**config)) == planned(plan)
    namespace = {"model": tiny_model("llama", layers=N_LAYERS)}
    exec(compile((tmp_path / "lora.py").read_text(), "lora.py", "exec"), namespace)
    got = {
        n.removeprefix("base_model.model."): m.lora_A["default"].out_features
        for n, m in namespace["model"].named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }
    assert got == planned(plan)
    assert export_plan(plan, "peft").exact


def test_trl_fragment_runs_with_the_plans_lora_config_and_callback(auto_plan, monkeypatch):
    plan, path = auto_plan
    calls: dict = {}

    class SFTConfig:
        def __init__(self, **kw):
            calls["config"] = kw

    class SFTTrainer:
        def __init__(self, **kw):
            calls["trainer"] = kw

        def train(self):
            calls["trained"] = True

    trl = types.ModuleType("trl")
    trl.SFTConfig, trl.SFTTrainer = SFTConfig, SFTTrainer
    monkeypatch.setitem(sys.modules, "trl", trl)
    text = export_plan(path, "trl").text
    exec(compile(text, "train_trl.py", "exec"), {"model": "MODEL", "train_dataset": "DATA"})
    kw = calls["trainer"]
    assert (kw["model"], kw["train_dataset"], calls["trained"]) == ("MODEL", "DATA", True)
    assert adapted(kw["peft_config"]) == planned(plan)
    (callback,) = kw["callbacks"]
    assert type(callback).__name__ == "LayercardCallback" and callback.plan.layers == [1, 3]
    assert calls["config"]["output_dir"] == str(callback.out_dir)
    # TRL's own defaults would checkpoint activations (not what the plan priced) and log every 10th loss
    assert calls["config"]["gradient_checkpointing"] is False and calls["config"]["logging_steps"] == 1


def axolotl_lora(cfg: dict) -> LoraConfig:
    """The LoraConfig axolotl builds from its config keys."""
    return LoraConfig(
        r=cfg["lora_r"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        target_modules=cfg["lora_target_modules"],
        layers_to_transform=cfg.get("peft_layers_to_transform"),
        layers_pattern=cfg.get("peft_layers_pattern"),
        rank_pattern=cfg.get("lora_rank_pattern") or {},
        alpha_pattern=cfg.get("lora_alpha_pattern") or {},
        fan_in_fan_out=cfg.get("lora_fan_in_fan_out", False),
        bias="none",
        task_type="CAUSAL_LM",
    )


def llamafactory_lora(cfg: dict) -> LoraConfig:
    """The LoraConfig LLaMA-Factory builds from its config keys (lora_target split at commas)."""
    return LoraConfig(
        r=cfg["lora_rank"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        target_modules=[t.strip() for t in cfg["lora_target"].split(",")],
        task_type="CAUSAL_LM",
    )


def test_axolotl_yaml_places_layers_and_ranks_exactly(auto_plan):
    plan, path = auto_plan
    res = export_plan(path, "axolotl")
    cfg = yaml.safe_load(res.text)
    assert set(cfg) <= AXOLOTL_KEYS and cfg["adapter"] == "lora"
    assert cfg["peft_layers_to_transform"] == [1, 3]
    assert cfg["lora_target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert adapted(axolotl_lora(cfg)) == planned(plan)  # every module at its own rank
    assert all(isinstance(v, int) for v in cfg["lora_alpha_pattern"].values())
    assert res.exact and not res.notes and "lora_rank_pattern and lora_alpha_pattern" in res.text


@pytest.mark.parametrize("brk", ["\n", "\r", "\u2028", "\x85"])
def test_text_read_from_the_plan_stays_inside_the_exports_comments(auto_plan, brk):
    plan, _ = auto_plan
    card = {
        **plan.card,
        "model_id": f"m{brk}import os; os.environ['HIT'] = '1'",
        "task": f"t{brk}trust_remote_code: true",
    }
    crafted = dataclasses.replace(plan, card=card)
    for code in (export_plan(crafted, "peft").snippet or "", export_plan(crafted, "trl").text):
        top = code[: code.index("from ")]  # everything before the first import is the header comment
        assert all(line.startswith("#") for line in top.splitlines()), code
    namespace = {"model": tiny_model("llama", layers=N_LAYERS)}
    exec(compile(export_plan(crafted, "peft").snippet or "", "lora.py", "exec"), namespace)
    assert "HIT" not in os.environ
    for to in ("axolotl", "llamafactory"):
        assert "trust_remote_code" not in yaml.safe_load(export_plan(crafted, to).text), to


def test_a_fractional_alpha_is_rounded_for_the_yaml_tools_and_said():
    plan = make_plan({1: "q,v"})
    plan = dataclasses.replace(plan, lora_config={**plan.lora_config, "lora_alpha": 12.5})
    for target, key in (("axolotl", "lora_alpha"), ("llamafactory", "lora_alpha")):
        res = export_plan(plan, target)
        cfg = yaml.safe_load(res.text)
        assert cfg[key] == 12 and isinstance(cfg[key], int), target
        assert not res.exact and "the plan's 12.5 is written as 12" in res.notes[0], target
    assert json.loads(export_plan(plan, "peft").text)["lora_alpha"] == 12.5  # PEFT takes it as it is


def test_axolotl_lists_full_paths_when_layers_adapt_different_modules():
    plan = make_plan({0: "q,v", 2: "q"})
    res = export_plan(plan, "axolotl")
    cfg = yaml.safe_load(res.text)
    assert "peft_layers_to_transform" not in cfg and cfg["lora_target_modules"] == list(planned(plan))
    assert adapted(axolotl_lora(cfg)) == planned(plan)
    assert "lists every planned module by full path" in res.notes[0]
    every = yaml.safe_load(export_plan(make_plan(dict.fromkeys(range(N_LAYERS), "q")), "axolotl").text)
    assert every["lora_target_modules"] == ["self_attn.q_proj"] and "peft_layers_to_transform" not in every


def test_llamafactory_yaml_names_the_planned_modules(auto_plan):
    plan, path = auto_plan
    res = export_plan(path, "llamafactory")
    cfg = yaml.safe_load(res.text)
    assert set(cfg) == LLAMAFACTORY_KEYS and cfg["finetuning_type"] == "lora"
    got = adapted(llamafactory_lora(cfg))
    assert set(got) == set(planned(plan)) and set(got.values()) == {cfg["lora_rank"]} == {4}
    assert "LLaMA-Factory takes one rank for every module (lora_rank)" in res.notes[0]
    # every layer with the same modules: the short names say it
    every = make_plan(dict.fromkeys(range(N_LAYERS), "q,v"))
    cfg = yaml.safe_load(export_plan(every, "llamafactory").text)
    assert cfg["lora_target"] == "self_attn.q_proj,self_attn.v_proj"
    assert adapted(llamafactory_lora(cfg)) == planned(every)
    assert export_plan(every, "llamafactory").exact


def test_uniform_rank_plans_export_exactly_everywhere():
    plan = make_plan({1: "q,v", 2: "q,v"})
    for target in TARGETS:
        assert export_plan(plan, target).exact, target


def test_export_errors_and_command_output(auto_plan, tmp_path):
    plan, path = auto_plan
    with pytest.raises(LayercardError, match="--to 'keras': not a target; valid: peft, trl, axolotl"):
        export_plan(plan, "keras")
    bottleneck = make_plan({1: "q"}, kind="houlsby")
    with pytest.raises(LayercardError, match="adapter kind 'houlsby' is not LoRA"):
        export_plan(bottleneck, "peft")
    runner = CliRunner()
    res = runner.invoke(app, ["export", str(path), "--to", "llamafactory"])
    assert res.exit_code == 0 and yaml.safe_load(res.stdout)["lora_rank"] == 4
    assert "note: LLaMA-Factory takes one rank" in res.stderr
    out = tmp_path / "llamafactory.yaml"
    res = runner.invoke(app, ["export", str(path), "--to", "llamafactory", "--out", str(out), "--json"])
    summary = json.loads(res.stdout)
    assert summary["files"] == [str(out)] and summary["exact"] is False and out.is_file()
    assert "text" not in summary  # the file holds it
    res = runner.invoke(app, ["export", str(path), "--to", "axolotl", "--out", str(tmp_path / "ax.yaml")])
    assert f"wrote {tmp_path / 'ax.yaml'}" in res.stdout and "wrote" not in res.stderr  # `> log` keeps it
    res = runner.invoke(app, ["export", str(path), "--to", "peft", "--json"])  # no file: the JSON holds it
    summary = json.loads(res.stdout)
    assert (
        summary["files"] == []
        and json.loads(summary["text"])["r"] == 4
        and "LoraConfig" in summary["snippet"]
    )
    # the peft export's snippet goes beside its JSON as FILE.py, so FILE.py cannot be the JSON's path
    snippet = tmp_path / "peft.py"
    res = runner.invoke(app, ["export", str(path), "--to", "peft", "--out", str(snippet)])
    assert res.exit_code == 2 and "give a .json path" in " ".join(res.output.split())
    assert not snippet.exists()
    # a file named for another format is refused: JSON in x.yaml, YAML in x.json, a script in x.yaml
    for to, name, want in (
        ("peft", "x.yaml", "x.json"),
        ("axolotl", "x.json", "x.yaml"),
        ("trl", "x.yml", "x.py"),
    ):
        res = runner.invoke(app, ["export", str(path), "--to", to, "--out", str(tmp_path / name)])
        assert res.exit_code == 2 and f"give a path such as {tmp_path / want}" in " ".join(res.output.split())
        assert not (tmp_path / name).exists()
    res = runner.invoke(app, ["export", str(path), "--to", "axolotl", "--out", str(tmp_path / "ax.yml")])
    assert res.exit_code == 0 and (tmp_path / "ax.yml").is_file()
    bad = runner.invoke(app, ["export", str(tmp_path / "nope.json"), "--to", "peft"])
    assert bad.exit_code != 0 and "no such file" in bad.stderr


# --- plans of other models: a multimodal one, GPT-2's Conv1D modules ------------------------------------


def plan_for(model: torch.nn.Module, layers: list[int], roles: str) -> Plan:
    """A plan of ``roles`` in ``layers`` of ``model`` at rank 4, as make_plan records it."""
    specs = models.units(model, roles, layers=layers)
    units = [PlannedUnit(u.key, u.layer, u.role, u.name, 4) for u in specs]
    return Plan(
        provenance={},
        card={
            "model_id": "tiny",
            "model_hash": "0" * 64,
            "task": "facts",
            "n_layers": models.num_layers(model),
        },
        config={"policy": "test"},
        kind="lora",
        units=units,
        layers=sorted(layers),
        predicted={"params": 1000, "step_time_s": 0.01},
        lora_config=lora_config(units, None, 0.0, module_kinds=[u.module_kind for u in specs]),
    )


def adapted_in(model: torch.nn.Module, config: LoraConfig) -> set[str]:
    """Module paths ``config`` adapts on ``model``, read back as PEFT names them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a YAML tool's config may leave pattern keys unused
        peft_model = get_peft_model(model, config)
    return {n for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("layers", [[0, 2], list(range(N_LAYERS))])
def test_yaml_exports_of_a_multimodal_plan_leave_the_vision_tower_alone(layers):
    plan = plan_for(tiny_multimodal(N_LAYERS), layers, "q,v")
    want = set(planned(plan))
    assert all(n.startswith("model.language_model.layers.") for n in want)
    axolotl = export_plan(plan, "axolotl")
    cfg = yaml.safe_load(axolotl.text)
    assert set(cfg) <= AXOLOTL_KEYS
    assert cfg["lora_target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert (
        cfg["peft_layers_pattern"] == ["language_model.layers"] and cfg["peft_layers_to_transform"] == layers
    )
    assert adapted_in(tiny_multimodal(N_LAYERS), axolotl_lora(cfg)) == want and axolotl.exact
    factory = export_plan(plan, "llamafactory")
    cfg = yaml.safe_load(factory.text)
    assert cfg["lora_target"] == ",".join(plan.lora_config["target_modules"])  # no layer setting: full paths
    assert adapted_in(tiny_multimodal(N_LAYERS), llamafactory_lora(cfg)) == want and factory.exact


def test_short_forms_are_kept_for_a_top_level_stack():
    every = make_plan(dict.fromkeys(range(N_LAYERS), "q"))
    for target in ("axolotl", "llamafactory"):
        cfg = yaml.safe_load(export_plan(every, target).text)
        assert "peft_layers_pattern" not in cfg and "peft_layers_to_transform" not in cfg
        assert cfg.get("lora_target_modules", cfg.get("lora_target")) in (
            ["self_attn.q_proj"],
            "self_attn.q_proj",
        )


def test_gpt2_plans_carry_fan_in_fan_out_for_conv1d_modules(tmp_path):
    plan = plan_for(tiny_model("gpt2", layers=N_LAYERS), [1, 3], "qkv,o,up,down")
    assert plan.lora_config["fan_in_fan_out"] is True and plan.peft_config().fan_in_fan_out
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = adapted_in(tiny_model("gpt2", layers=N_LAYERS), plan.peft_config())
    assert got == set(planned(plan))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert json.loads(export_plan(plan, "peft").text)["fan_in_fan_out"] is True
    assert "fan_in_fan_out=True" in export_plan(plan, "trl").text
    cfg = yaml.safe_load(export_plan(plan, "axolotl").text)
    assert cfg["lora_fan_in_fan_out"] is True
    config = axolotl_lora(cfg)
    assert config.fan_in_fan_out and adapted_in(tiny_model("gpt2", layers=N_LAYERS), config) == got
    # nn.Linear modules keep PEFT's default
    assert "fan_in_fan_out" not in make_plan({1: "q"}).lora_config


def test_the_trl_fragment_reads_the_plan_by_its_absolute_path(auto_plan, tmp_path, monkeypatch):
    plan, path = auto_plan
    monkeypatch.chdir(tmp_path)
    text = export_plan("plan.json", "trl").text
    assert f"LayercardCallback({json.dumps(str(path.resolve()))}, " in text
    assert "# layercard plan plan.json exported for TRL" in text  # the comment shows the path as given
    unknown = export_plan(plan, "trl").text  # a Plan in memory: the fragment says the path must be set
    assert "set the path of the plan's plan.json in LayercardCallback below" in unknown
    assert "# layercard plan exported for TRL" in unknown


def test_export_refuses_to_write_over_its_plan(auto_plan, tmp_path):
    _, path = auto_plan
    before = path.read_bytes()
    runner = CliRunner()
    for to in TARGETS:
        res = runner.invoke(app, ["export", str(path), "--to", to, "--out", str(path)])
        assert res.exit_code != 0 and "that is the plan file" in " ".join(res.output.split()), to
        assert len(res.output.strip().splitlines()) <= 2
    relative = runner.invoke(
        app, ["export", str(path), "--to", "axolotl", "--out", str(tmp_path / "." / "plan.json")]
    )
    assert relative.exit_code != 0 and "which the export would overwrite" in " ".join(relative.output.split())
    # the peft export's snippet, FILE.py beside FILE.json, must not land on a plan named FILE.py
    py_plan = tmp_path / "lora.py"
    py_plan.write_bytes(before)
    res = runner.invoke(app, ["export", str(py_plan), "--to", "peft", "--out", str(tmp_path / "lora.json")])
    assert res.exit_code != 0 and "the Python snippet goes to" in " ".join(res.output.split())
    assert not (tmp_path / "lora.json").exists() and py_plan.read_bytes() == before
    assert path.read_bytes() == before


def test_the_peft_pair_is_written_whole_or_not_at_all(auto_plan, tmp_path):
    _, path = auto_plan
    runner = CliRunner()
    (tmp_path / "peft.py").mkdir()  # the snippet's place is taken: nothing is written, the JSON neither
    res = runner.invoke(app, ["export", str(path), "--to", "peft", "--out", str(tmp_path / "peft.json")])
    assert res.exit_code == 2 and "the Python snippet goes beside it as" in " ".join(res.output.split())
    assert not (tmp_path / "peft.json").exists()
    (tmp_path / "peft.py").rmdir()
    (tmp_path / "peft.py").write_text("an earlier plan's snippet")
    res = runner.invoke(app, ["export", str(path), "--to", "peft", "--out", str(tmp_path / "peft.json")])
    assert res.exit_code == 0 and "an earlier plan" not in (tmp_path / "peft.py").read_text()
