"""Bad input through the real CLI on a tiny model: each case of the table exits non-zero with exactly one
line naming what is wrong, and leaves no partial artifact or temporary file behind.

Each row failed before layercard checked it (a diverged run saved an all-NaN adapter, an edited card
planned "successfully", a second writer interleaved with the first...). Cases a row cannot hold are in
test_bad_state.py.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from bad_world import (
    EVAL,
    FACTS,
    ONE_STEP,
    TRAIN,
    World,
    a_config,
    cli,
    edited,
    lock_record,
    one_error_line,
    run_config,
)

from layercard import artifacts

# ---------------------------------------------------------------------------------------------------------
# The table: (command line, the start of its one line, paths that must not exist afterwards)
# ---------------------------------------------------------------------------------------------------------

Row = tuple[str | list[str], str, list[Path]]
CASES: dict[str, Callable[[World, Path], Row]] = {}


def case(name: str) -> Callable[[Callable[[World, Path], Row]], Callable[[World, Path], Row]]:
    def register(fn: Callable[[World, Path], Row]) -> Callable[[World, Path], Row]:
        CASES[name] = fn
        return fn

    return register


def card_case(name: str, change: Callable[[dict[str, Any]], None], message: str) -> None:
    """A card.json edited by ``change`` must fail `plan` with ``message`` (after the file name)."""

    def row(w: World, tmp: Path) -> Row:
        card = edited(w.card, tmp / "card" / "card.json", change)
        cmd = f"plan --policy card --budget layers=2 -c {card} -o {tmp / 'p.json'}"
        return cmd, f"error: {card}: {message}", [tmp / "p.json"]

    CASES[name] = row


def setter(*path: Any) -> Callable[[Any], Callable[[dict[str, Any]], None]]:
    """``setter("units", 3, "grad_norm")(v)``: a change that sets that field to ``v``."""

    def to(value: Any) -> Callable[[dict[str, Any]], None]:
        def change(d: dict[str, Any]) -> None:
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value

        return change

    return to


# point 2: card.json checked field by field (each edit used to plan "successfully" or crash)
card_case("card-nan-grad-norm", setter("units", 3, "grad_norm")(math.nan),
          "units[3].grad_norm: must be a finite number, got NaN")  # fmt: skip
card_case("card-number-as-text", setter("units", 0, "resnorm")("0.5"),
          "units[0].resnorm: must be a finite number >= 0, got '0.5' (text)")  # fmt: skip
card_case("card-unit-on-layer-99", setter("units", 0, "layer")(99),
          "units[0].layer: must be an integer in 0..3, got 99")  # fmt: skip
# the model's layer count itself is one past its last layer
card_case("card-unit-on-layer-4-of-4", setter("units", 0, "layer")(4),
          "units[0].layer: must be an integer in 0..3, got 4")  # fmt: skip
card_case("card-negative-energy", setter("groups", 0, "energy")(-1.0),
          "groups[0].energy: must be a finite number >= 0, got -1.0")  # fmt: skip
card_case("card-infinite-loss", setter("loss")(math.inf), "loss: must be a finite number, got Infinity")
card_case("card-missing-field", lambda d: d["units"][1].pop("grad_norm"), "units[1].grad_norm: missing")
card_case("card-nan-eigenvalue", setter("groups", 2, "eigenvalues", 5)(math.nan),
          "groups[2].eigenvalues[5]: must be a finite number, got NaN")  # fmt: skip
card_case(
    "card-nan-cost",
    setter("cost", "intercept_s")(math.nan),
    "cost.intercept_s: must be a finite number, got NaN",
)
card_case("card-negative-target-entropy", setter("task", "target_entropy")(-0.5),
          "task.target_entropy: must be a finite number >= 0, got -0.5")  # fmt: skip
card_case(
    "card-unknown-group",
    setter("units", 0, "group")("7.attn_in"),
    "units[0].group: names no group of the card",
)


def plan_case(name: str, change: Callable[[dict[str, Any]], None], message: str) -> None:
    """A plan.json edited by ``change`` must fail `train` with ``message``, writing nothing."""

    def row(w: World, tmp: Path) -> Row:
        plan = edited(w.plan, tmp / "plan.json", change)
        out = tmp / "run"
        return f"train -p {plan} -t {FACTS} -o {out} {TRAIN} {ONE_STEP}", f"error: {plan}: {message}", [out]

    CASES[name] = row


# a plan whose layers were edited used to train other layers than it records
plan_case("plan-edited-layers", setter("layers")([0]), "layers: must be the layers of the plan's units")
plan_case(
    "plan-rank-as-text", setter("units", 0, "rank")("4"), "units[0].rank: must be an integer >= 1, got '4'"
)
plan_case("plan-unit-outside-the-model", setter("units", 0, "layer")(99),
          "units[0].layer: must be an integer in 0..3, got 99")  # fmt: skip
plan_case("plan-unit-one-past-the-last-layer", setter("units", 0, "layer")(4),
          "units[0].layer: must be an integer in 0..3, got 4")  # fmt: skip
plan_case(
    "plan-nan-gain", setter("predicted", "gain")(math.nan), "predicted.gain: must be a finite number, got NaN"
)
plan_case("plan-edited-targets", lambda d: d["lora_config"]["target_modules"].pop(),
          "lora_config.target_modules: must be the modules of the plan's units")  # fmt: skip
plan_case("plan-unknown-kind", setter("adapter_kind")("prefix"),
          "adapter_kind: must be one of lora, houlsby, parallel, got 'prefix'")  # fmt: skip


def a_file(tmp: Path) -> Path:
    f = tmp / "taken"
    f.write_text("mine")
    return f


IS_A_FILE = "exists and is a file, not a folder"


# point 3: output paths checked before any work (these used to fail after it, naming a temporary path)
@case("card-out-is-a-file")
def _(w: World, tmp: Path) -> Row:
    f = a_file(tmp)
    return f"card -m {w.model} -t {FACTS} -o {f}", f"error: --out {f}: {IS_A_FILE}", []


@case("plan-out-is-a-folder")
def _(w: World, tmp: Path) -> Row:
    msg = f"error: --out {tmp}: is a folder; give a file path such as {tmp / 'plan.json'}"
    return f"plan --policy all -c {w.card} -o {tmp}", msg, [tmp / "plan.json"]


@case("plan-out-names-no-json-file")
def _(w: World, tmp: Path) -> Row:
    out = tmp / "newdir"  # meant as a folder, not yet made: it would have become a file of that name
    msg = f"error: --out {out}: give a file path ending in .json, such as {out / 'plan.json'}"
    return f"plan --policy all -c {w.card} -o {out}", msg, [out]


@case("train-out-holds-a-finished-run")
def _(w: World, tmp: Path) -> Row:
    out = tmp / "run"
    out.mkdir()
    (out / "train_metrics.json").write_text("{}")
    msg = f"error: --out {out}: holds a finished run (train_metrics.json); use a new --out"
    return f"train -p {w.plan} -t {FACTS} -o {out} {TRAIN} {ONE_STEP}", msg, [out / "adapter"]


@case("train-val-task-missing")
def _(w: World, tmp: Path) -> Row:
    out, missing = tmp / "run", tmp / "nofile.jsonl"
    cmd = f"train -p {w.plan} -t {FACTS} --val-task {missing} -o {out} {TRAIN} {ONE_STEP}"
    return cmd, f"error: --val-task: {missing}", [out]


@case("plan-out-below-a-file")
def _(w: World, tmp: Path) -> Row:
    f = a_file(tmp)
    return (
        f"plan --policy all -c {w.card} -o {f / 'p.json'}",
        f"error: --out {f / 'p.json'}: {f} is a file",
        [],
    )


@case("train-out-is-a-file")
def _(w: World, tmp: Path) -> Row:
    f = a_file(tmp)
    return f"train -p {w.plan} -t {FACTS} -o {f} {TRAIN} {ONE_STEP}", f"error: --out {f}: {IS_A_FILE}", []


@case("eval-out-is-a-file")
def _(w: World, tmp: Path) -> Row:
    f = a_file(tmp)
    return f"eval -m {w.model} -t {FACTS} -o {f} {EVAL}", f"error: --out {f}: {IS_A_FILE}", []


@case("trim-out-is-a-file")
def _(w: World, tmp: Path) -> Row:
    f = a_file(tmp)
    return f"trim -m {w.model} -a {w.adapter} -t {FACTS} -o {f}", f"error: --out {f}: {IS_A_FILE}", []


@case("run-out-is-a-file")
def _(w: World, tmp: Path) -> Row:
    f = a_file(tmp)
    return f"run {a_config(w, tmp)} -o {f}", f"error: run folder {f}: {IS_A_FILE}", []


@case("report-out-is-a-folder")
def _(w: World, tmp: Path) -> Row:
    msg = f"error: --out {tmp}: is a folder; give a file path such as {tmp / 'report.html'}"
    return f"report {tmp} -o {tmp}", msg, [tmp / "report.md"]


@case("plan-out-x8-txt-is-no-json-file")
def _(w: World, tmp: Path) -> Row:
    out = tmp / "x8.txt"  # a file meant: the hint keeps it a file
    msg = f"error: --out {out}: give a file path ending in .json, such as {tmp / 'x8.json'}"
    return f"plan --policy all -c {w.card} -o {out}", msg, [out, tmp / "x8.json"]


if Path("/proc/self").is_dir():  # a folder that takes no new files

    @case("plan-out-cannot-be-written")
    def _(w: World, tmp: Path) -> Row:
        out = Path("/proc/layercard/plan.json")
        return (
            f"plan --policy all -c {w.card} -o {out}",
            f"error: --out {out}: cannot create files in /proc",
            [],
        )

    @case("report-out-cannot-be-written")
    def _(w: World, tmp: Path) -> Row:
        out = Path("/proc/report.html")
        return f"report {tmp} -o {out}", f"error: --out {out}: cannot create files in /proc", []


@case("eval-adapter-is-no-adapter-folder")
def _(w: World, tmp: Path) -> Row:
    empty = tmp / "t1"
    empty.mkdir()
    msg = f"error: --adapter {empty}: not an adapter folder"
    return f"eval -m {w.model} -t {FACTS} -o {tmp / 'e'} -a {empty} {EVAL}", msg, [tmp / "e"]


@case("usage-error-is-one-line")
def _(w: World, tmp: Path) -> Row:
    return "card --examples abc", "error: Invalid value for '--examples'", []


@case("steps-at-its-default-with-epochs")
def _(w: World, tmp: Path) -> Row:
    msg = "error: --steps: give exactly one of steps and epochs"
    return f"train -p {w.plan} -t {FACTS} --dry-run --steps 100 --epochs 1", msg, []


@case("yaml-device-not-a-device")
def _(w: World, tmp: Path) -> Row:
    cfg = a_config(w, tmp, yaml.safe_dump({**run_config(w), "device": "gpu"}, sort_keys=False))
    return (
        f"run {cfg} -o {tmp / 'run'}",
        f"error: {cfg}: device: must be auto, cpu, cuda, cuda:N or mps",
        [tmp / "run"],
    )


# point 4: a YAML key given twice (the last one used to win silently)
@case("yaml-duplicate-key")
def _(w: World, tmp: Path) -> Row:
    text = yaml.safe_dump(run_config(w), sort_keys=False).replace(
        "  steps: 3\n", "  steps: 3\n  lr: 0.001\n  steps: 30\n"
    )
    first = text.splitlines().index("  steps: 3") + 1
    cfg = a_config(w, tmp, text)
    msg = f"error: {cfg}: line {first + 2}: duplicate key 'steps' (first at line {first})"
    return f"run {cfg} -o {tmp / 'run'}", msg, [tmp / "run"]


# nested aliases: a few hundred bytes that stand for millions of values
@case("yaml-alias-bomb")
def _(w: World, tmp: Path) -> Row:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    cfg = a_config(w, tmp, "\n".join(lines) + "\n")
    sizes = [10]  # the list and its nine values; each next list, itself and nine of the one before
    for _ in range(6):
        sizes.append(1 + 9 * sizes[-1])
    n = 1 + len(sizes) + sum(sizes)  # the mapping, its keys and their values
    msg = (
        f"error: {cfg}: holds {n:,} values once its aliases are expanded, more than the 100,000 a config "
        "may; write the settings out rather than nesting aliases"
    )
    return f"run {cfg} -o {tmp / 'run'}", msg, [tmp / "run"]


@case("yaml-duplicate-key-in-a-placement")
def _(w: World, tmp: Path) -> Row:
    text = yaml.safe_dump(run_config(w), sort_keys=False).replace(
        "  policy: all\n", "  policy: all\n  policy: top\n"
    )
    n = text.splitlines().index("  policy: all") + 1
    cfg = a_config(w, tmp, text)
    return (
        f"run {cfg} -o {tmp / 'run'}",
        f"error: {cfg}: line {n + 1}: duplicate key 'policy' (first at line {n})",
        [tmp / "run"],
    )


@case("set-duplicate-key")
def _(w: World, tmp: Path) -> Row:
    cmd = ["run", str(a_config(w, tmp)), "-o", str(tmp / "run"), "--set", "train={steps: 1, steps: 2}"]
    msg = "error: --set 'train={steps: 1, steps: 2}': the value: line 1: duplicate key 'steps'"
    return cmd, msg, [tmp / "run"]


# point 6: one writer per folder (a second writer used to interleave with the first)
def held(w: World, folder: Path, what: str) -> str:
    artifacts.lock_path(folder).write_text(lock_record(w.live.pid))
    return f"error: {folder}: another layercard process is writing this {what} (pid {w.live.pid} on "


@case("card-folder-held-by-a-live-process")
def _(w: World, tmp: Path) -> Row:
    return f"card -m {w.model} -t {FACTS} -o {tmp / 'c'}", held(w, tmp / "c", "card folder"), [tmp / "c"]


@case("train-folder-held-by-a-live-process")
def _(w: World, tmp: Path) -> Row:
    return (
        f"train -p {w.plan} -t {FACTS} -o {tmp / 'r'} {TRAIN} {ONE_STEP}",
        held(w, tmp / "r", "training folder"),
        [tmp / "r"],
    )


@case("run-folder-held-by-a-live-process")
def _(w: World, tmp: Path) -> Row:
    return f"run {a_config(w, tmp)} -o {tmp / 'r'}", held(w, tmp / "r", "run folder"), [tmp / "r"]


@case("eval-folder-held-by-a-live-process")
def _(w: World, tmp: Path) -> Row:
    return (
        f"eval -m {w.model} -t {FACTS} -o {tmp / 'e'} {EVAL}",
        held(w, tmp / "e", "eval folder"),
        [tmp / "e"],
    )


# point 7: a folder named like a file ("no such file" before), units in budget messages
@case("card-json-is-a-folder")
def _(w: World, tmp: Path) -> Row:
    (tmp / "card.json").mkdir()
    cmd = f"plan --policy all -c {tmp / 'card.json'} -o {tmp / 'p.json'}"
    return cmd, f"error: {tmp / 'card.json'}: is a folder, not a JSON file", [tmp / "p.json"]


@case("config-is-a-folder")
def _(w: World, tmp: Path) -> Row:
    (tmp / "c.yaml").mkdir()
    return (
        f"run {tmp / 'c.yaml'} -o {tmp / 'r'}",
        f"error: {tmp / 'c.yaml'}: is a folder, not a config file",
        [tmp / "r"],
    )


@case("config-is-a-plan")
def _(w: World, tmp: Path) -> Row:
    plan = w.plan  # JSON reads as YAML: a config mistaken for the plan is named as what it is
    return (
        f"run {plan} -o {tmp / 'r'}",
        f"error: {plan}: a layercard plan artifact, not a run config (a YAML file of model, task and "
        "placements: see src/layercard/configs/reference.yaml)",
        [tmp / "r"],
    )


@case("eval-adapter-is-a-file")
def _(w: World, tmp: Path) -> Row:
    f = a_file(tmp)
    cmd = f"eval -m {w.model} -t {FACTS} -o {tmp / 'e'} -a {f}"
    return cmd, f"error: --adapter {f}: is a file, not an adapter folder", [tmp / "e"]


@case("trim-adapter-is-a-file")
def _(w: World, tmp: Path) -> Row:
    f = a_file(tmp)
    cmd = f"trim -m {w.model} -t {FACTS} -o {tmp / 't'} -a {f}"
    return cmd, f"error: --adapter {f}: is a file, not an adapter folder", [tmp / "t"]


@case("step-time-budget-has-units")
def _(w: World, tmp: Path) -> Row:
    cmd = f"plan --policy card --budget step_time=0.000001 -c {w.card} -o {tmp / 'p.json'}"
    msg = "error: budget step_time=1e-06 s: fits no layer; the cheapest single layer of roles q,v costs "
    return cmd, msg, [tmp / "p.json"]


# point 1: non-finite numbers stop the stage that met them (training used to save an all-NaN adapter)
@case("train-lr-1e30-diverges")
def _(w: World, tmp: Path) -> Row:
    out = tmp / "run"
    cmd = f"train -p {w.plan} -t {FACTS} -o {out} {TRAIN} --steps 3 --lr 1e30 --checkpoint-every 0"
    msg = (
        "error: train: step 2 of 3: the gradient norm of the trainable parameters is NaN; training diverged "
        "(lr=1e+30; try a lower learning rate). No adapter or train_metrics.json was written"
    )
    return cmd, msg, [out / "adapter", out / "train_metrics.json"]


@case("eval-of-a-nan-model")
def _(w: World, tmp: Path) -> Row:
    msg = "error: eval: the loss on facts (test) is NaN: the model gives non-finite outputs; no eval.json"
    return f"eval -m {w.nan_model} -t {FACTS} -o {tmp / 'e'} {EVAL}", msg, [tmp / "e" / "eval.json"]


@case("eval-without-loss-of-a-nan-adapter")
def _(w: World, tmp: Path) -> Row:
    msg = f"error: eval: the model with adapter {w.nan_adapter} gives non-finite logits on the prompts of"
    cmd = f"eval -m {w.model} -a {w.nan_adapter} -t {FACTS} -o {tmp / 'e'} {EVAL} --no-loss"
    return cmd, msg, [tmp / "e" / "eval.json", tmp / "e" / "predictions.jsonl"]


@case("eval-of-a-nan-adapter")
def _(w: World, tmp: Path) -> Row:
    msg = f"error: eval: the loss on facts (test) is NaN: the model with adapter {w.nan_adapter} gives"
    return (
        f"eval -m {w.model} -a {w.nan_adapter} -t {FACTS} -o {tmp / 'e'} {EVAL}",
        msg,
        [tmp / "e" / "eval.json"],
    )


@case("trace-of-a-nan-adapter")
def _(w: World, tmp: Path) -> Row:
    cmd = f"trace -m {w.model} -a {w.nan_adapter} -t {FACTS} -o {tmp / 't'} --examples 4 --device cpu"
    msg = "error: trace: the lens probability with the adapter on is NaN at layer 0: the model gives"
    return cmd, msg, [tmp / "t" / "trace.json"]


@case("trim-sweep-of-a-nan-adapter")
def _(w: World, tmp: Path) -> Row:
    out = tmp / "t"
    cmd = f"trim -m {w.model} -a {w.nan_adapter} -t {FACTS} -o {out} --all-layers --metric loss --examples 4"
    msg = "error: trim: the loss with adapters kept in layers <= 0 is NaN: the adapted model gives non-finite"
    return cmd, msg, [out / "trim.json", out / "adapter-trimmed"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(world: World, tmp_path: Path, name: str) -> None:
    cmd, expect, absent = CASES[name](world, tmp_path)
    line = one_error_line(cli(cmd))
    assert line.startswith(expect), f"{line}\n  expected: {expect}"
    assert not [p for p in absent if p.exists()], f"partial artifacts: {[p for p in absent if p.exists()]}"
    assert not list(tmp_path.rglob(".*.tmp")), "temporary files left behind"


def test_zero_budget_prints_as_given(world: World, tmp_path: Path) -> None:
    r = cli(f"plan --policy card --budget layers=0 -c {world.card} -o {tmp_path / 'p.json'}")
    assert "budget layers=0:" in one_error_line(r) and not (tmp_path / "p.json").exists()


def test_error_text_in_square_brackets_reaches_the_user(world: World, tmp_path: Path) -> None:
    """The CLI prints with markup; a message naming placements[mine] must not lose it as a style tag."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {world.model}\ntask: synthetic:facts\nplacements:\n  - name: mine\n    rank: 2\n")
    line = one_error_line(cli(["run", str(cfg), "--out", str(tmp_path / "out")]))
    need = "policy recommend needs a budget (e.g. params=0.25x) or a target"
    assert line == f"error: {cfg}: placements[mine].budget: {need}"
    assert not (tmp_path / "out").exists()


def test_run_stops_at_the_diverged_stage(world: World, tmp_path: Path) -> None:
    """`layercard run` stops at the train stage, non-zero, with nothing of that stage or after it written."""
    out = tmp_path / "run"
    r = cli(f"run {a_config(world, tmp_path)} -o {out} --set train.lr=1e30")
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == r.output.strip().splitlines()[-1]
    assert errors[0].startswith("error: stage train:all: train: step 2 of 3: the ")
    assert (out / "card" / "card.json").is_file() and (out / "plan" / "all" / "plan.json").is_file()
    assert not (out / "train" / "all" / "adapter").exists()
    assert not (out / "train" / "all" / "train_metrics.json").exists()
    assert not (out / "eval").exists() and not (out / "report.html").exists()
    assert not artifacts.lock_path(out).exists()  # the run's lock is released on failure
    record = json.loads((out / "train" / "all" / "stage.json").read_text())  # says it failed, and why
    assert record["status"] == "failed" and record["error"].startswith("train: step 2 of 3: the ")


def test_the_api_refuses_wrong_arguments_in_one_line(world: World, tmp_path: Path) -> None:
    """The library's entry points name what they expected, as the command line does."""
    import layercard
    from layercard import (
        CardConfig,
        EvalConfig,
        LayercardError,
        PlanConfig,
        check_plan,
        evaluate_model,
        load_model,
        make_plan,
    )
    from layercard.pipeline import load_config

    card = layercard.Card.load(world.card)
    with pytest.raises(LayercardError, match="^make_plan: cfg must be a PlanConfig"):
        make_plan(card, "params=0.2x")
    with pytest.raises(LayercardError, match="^make_plan: card must be a Card or a card.json path, got int"):
        make_plan(3, PlanConfig(policy="all"))
    by_path = make_plan(str(world.card), PlanConfig(policy="all"))  # a card.json path is read
    assert by_path.layers == make_plan(card, PlanConfig(policy="all")).layers
    with pytest.raises(LayercardError, match="^measure_card: cfg must be a CardConfig"):
        layercard.measure_card(world.model, "synthetic:facts", {"examples": 2})
    with pytest.raises(LayercardError, match="^model: expected a name, folder or .gguf path, got int"):
        load_model(123)
    loaded = load_model(world.model)  # a Path, as load_task takes one
    assert check_plan(layercard.Plan.load(world.plan), loaded)  # the loaded model, as elsewhere
    with pytest.raises(LayercardError, match="^evaluate: cfg must be an EvalConfig"):
        evaluate_model(loaded, "synthetic:facts", CardConfig())
    result = evaluate_model(loaded, "synthetic:facts", EvalConfig(examples=2, max_new_tokens=2))  # a spec
    assert result.n == 2
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": str(world.model), "task": "synthetic:facts",
                                        "placements": [{"name": "all", "policy": "all"}]}))  # fmt: skip
    assert load_config(cfg_path, "train.steps=3").train.steps == 3  # one override, not its characters
    assert {"make_plan", "measure_card", "Card", "Plan"} <= set(dir(layercard))
    task = layercard.load_task("synthetic:facts", split="train")
    plan, steps = layercard.Plan.load(world.plan), layercard.TrainConfig(steps=1, checkpoint_every=0)
    train, trim, t = layercard.train_adapter, layercard.trim_adapter, tmp_path / "t"
    for call, said in [
        (
            lambda: train(loaded, plan, task, None, {"steps": 1}, t),
            "train: cfg must be a TrainConfig, got dict",
        ),
        (lambda: train(loaded, str(world.plan), task, None, steps, t), "train: plan must be a Plan, got str"),
        (lambda: train(loaded, plan, "synthetic:facts", None, steps, t), "train: train_task must be a Task"),
        (lambda: train(str(world.model), plan, task, None, steps, t), "train: loaded must be a LoadedModel"),
        (
            lambda: layercard.estimate_training(loaded, plan, task, "x", steps),
            "estimate_training: val_task must be a Task or None",
        ),
        (lambda: trim(loaded, world.adapter, "synthetic:facts", layercard.TrimConfig(), t), "trim: task"),
        (lambda: trim(loaded, world.adapter, task, None, t), "trim: cfg must be a TrimConfig, got NoneType"),
        (lambda: check_plan(card, loaded), "check_plan: plan must be a Plan, got Card"),
        (lambda: layercard.run_pipeline(str(cfg_path), t), "run_pipeline: cfg must be a RunConfig, got str"),
        (
            lambda: evaluate_model(loaded.model, task, EvalConfig(examples=2)),
            "evaluate: loaded must be a LoadedModel, got LlamaForCausalLM",
        ),
        (
            lambda: layercard.load_adapter(loaded, world.adapter),
            "load_adapter: model must be a Module, got LoadedModel; pass the loaded model's .model",
        ),
    ]:  # each had been an AttributeError or TypeError from inside the stage
        with pytest.raises(LayercardError, match="^" + re.escape(said)):
            call()
    assert not t.exists()


def test_debug_is_taken_after_the_command(tmp_path: Path) -> None:
    """``--debug`` after the command shows the traceback as before it does; without it, one line."""
    missing = tmp_path / "no-model"
    for args in (["--debug", "card", "-m", str(missing)], ["card", "-m", str(missing), "--debug"]):
        r = cli(args)
        assert r.exit_code != 0 and "Traceback" in r.output, args
    assert "Traceback" not in cli(["card", "-m", str(missing)]).output
