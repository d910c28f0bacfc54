"""Training on tiny random models: LoRA through PEFT, bottleneck adapters, checkpoints and resume, CLI."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import fixed_logits, tiny_model
from tiny_tok import tiny_tokenizer

from layercard import models
from layercard.errors import LayercardError
from layercard.models import LoadedModel
from layercard.plan import Plan
from layercard.tasks import Encoded, load_task
from layercard.train import TrainConfig, TrainMetrics, estimate, train
from layercard.train.readme import front_matter, is_layercard_readme, layer_spans

TRAIN = load_task("synthetic:facts", split="train").subset(16)
VAL = load_task("synthetic:facts", split="test").subset(8)
# Small and fast: 8 examples of ≤ 64 characters (the tiny tokenizer is character-level).
FAST = dict(batch_size=4, max_length=64, train_examples=8, eval_examples=4, checkpoint_every=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run ~10x faster on one intra-op thread on a shared CPU (no oversubscription spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _loaded(seed: int = 0) -> LoadedModel:
    model = tiny_model("llama", seed=seed)
    return LoadedModel(model, tiny_tokenizer(), f"tiny-llama-{seed}", models.weights_hash(model), "tiny")


def make_plan(
    loaded: LoadedModel, layers: list[int], *, kind: str = "lora", rank: int = 4, dropout: float = 0.0
) -> Plan:
    """A plan as `layercard plan` writes it (q,v on ``layers``)."""
    return Plan.from_dict(plan_dict(loaded, layers, kind=kind, rank=rank, dropout=dropout))


def plan_dict(
    loaded: LoadedModel, layers: list[int], *, kind: str = "lora", rank: int = 4, dropout: float = 0.0
) -> dict[str, Any]:
    """The plan.json dict of :func:`make_plan`."""
    units = models.units(loaded.model, "q,v", layers=layers)
    names = [u.name for u in units]
    return {
        "kind": "plan",
        "schema_version": 1,
        "provenance": {},
        "card": {"model_id": loaded.model_id, "model_hash": loaded.model_hash, "task": "facts"},
        "config": {"policy": "test"},
        "adapter_kind": kind,
        "units": [
            {"key": u.key, "layer": u.layer, "role": u.role, "name": u.name, "rank": rank} for u in units
        ],
        "layers": layers,
        "predicted": {
            "step_time_s": 0.05,
            "params": 0,
            "modules": len(units),
            "gain": 1.0,
            "forward_s": 0.01,
            "forward_position_share": 0.5,
            "calibration_batch_positions": 200,
        },  # fmt: skip
        "lora_config": {
            "r": rank,
            "lora_alpha": 2 * rank,
            "lora_dropout": dropout,
            "target_modules": names,
            "rank_pattern": dict.fromkeys(names, rank),
            "alpha_pattern": {},
            "bias": "none",
            "task_type": "CAUSAL_LM",
        },
        "adapter_config": {"kind": kind, "bottleneck": 4, "layers": layers} if kind != "lora" else None,
    }


# ---------------------------------------------------------------------------------------------------------
# One LoRA run, inspected by several tests
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from peft.tuners.lora import LoraLayer

    loaded = _loaded()
    base_logits = fixed_logits(loaded.model)
    plan = make_plan(loaded, [1, 3])
    out = tmp_path_factory.mktemp("lora")
    seen: dict[str, Any] = {}

    def callback(step: int, loss: float, model: torch.nn.Module) -> None:
        if step == 1:
            seen["lora_modules"] = {
                n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)
            }
        seen["logits"] = fixed_logits(model)  # the last call leaves the trained model's logits

    cfg = TrainConfig(steps=20, lr=1e-2, eval_every=10, **FAST)
    metrics = train(loaded, plan, TRAIN, VAL, cfg, out, callback=callback)
    return {"loaded": loaded, "plan": plan, "out": out, "metrics": metrics, "seen": seen, "base": base_logits}


def test_lora_loss_decreases(lora_run):
    curve = [loss for _, loss in lora_run["metrics"]["loss_curve"]]
    assert len(curve) == 20
    assert sum(curve[-5:]) / 5 < curve[0] - 0.1
    val = lora_run["metrics"]["val_curve"]
    assert [s for s, _ in val] == [10, 20] and val[-1][1] < val[0][1] + 1e-9


def test_only_planned_modules_have_lora(lora_run):
    planned = {u.name for u in lora_run["plan"].units}
    assert lora_run["seen"]["lora_modules"] == planned
    from safetensors.torch import load_file

    keys = load_file(str(lora_run["out"] / "adapter" / "adapter_model.safetensors"))
    saved = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in keys}
    assert saved == planned


def test_base_model_restored(lora_run):
    model = lora_run["loaded"].model
    torch.testing.assert_close(fixed_logits(model), lora_run["base"], rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())  # as the caller left them
    assert not model.training
    assert models.weights_hash(model) == lora_run["loaded"].model_hash


def test_saved_adapter_loads_in_vanilla_peft(lora_run):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(_loaded().model, str(lora_run["out"] / "adapter"))
    torch.testing.assert_close(fixed_logits(peft_model), lora_run["seen"]["logits"], rtol=0, atol=0)
    assert not torch.equal(lora_run["seen"]["logits"], lora_run["base"])


def test_train_metrics(lora_run):
    m = json.loads((lora_run["out"] / "train_metrics.json").read_text())
    assert m == json.loads(json.dumps(lora_run["metrics"]))
    assert m["kind"] == "train_metrics" and m["schema_version"] == 1 and m["adapter_kind"] == "lora"
    prov = m["provenance"]
    assert prov["stage"] == "train" and prov["model_hash"] == lora_run["loaded"].model_hash
    assert prov["seed"] == 0 and prov["data_hash"] == m["task"]["data_hash"] and prov["task"] == "facts"
    # q (32→32) and v (32→16) at r=4 on 2 layers: 2 · 4 · (64 + 48)
    assert m["trainable_params"] == 896
    assert m["total_params"] > m["trainable_params"]
    assert m["steps"] == 20 and m["epochs"] == pytest.approx(10.0)
    assert 0 < m["s_per_step"] < 5 and m["tokens_per_s"] > 0
    spread = m["s_per_step_spread"]  # over the 19 steps after the session's first, as the median
    assert spread["steps"] == 19
    assert spread["fastest"] <= spread["p10"] <= m["s_per_step"] <= spread["p90"] <= spread["slowest"]
    assert 0 < m["s_per_step_data"] < m["s_per_step"]  # building and placing the batch is part of a step
    assert m["tokens_seen"] >= m["target_tokens_seen"] > 0
    assert m["peak_memory_mib"] > 0 and m["peak_memory_kind"] == "process_peak_rss"
    assert m["predicted_step_time_s"] == 0.05
    assert m["step_time_ratio"] == pytest.approx(m["s_per_step"] / 0.05)
    assert m["plan"]["layers"] == [1, 3] and m["plan"]["modules"] == 4 and m["plan"]["kind"] == "lora"
    assert m["adapted"]["ranks"] == {u.name: 4 for u in lora_run["plan"].units}  # as trained: as planned
    assert m["peak_memory_steps"] == [1, 20]
    # one unmerged forward, timed on the run's first micro-batch, against the plan's at those positions
    assert m["forward_s"] > 0 and 0 < m["forward_positions"] <= m["max_batch_positions"]
    assert m["predicted_forward_s"] == 0.01
    assert m["predicted_forward_scaled_s"] == pytest.approx(0.01 * (0.5 + 0.5 * m["forward_positions"] / 200))
    assert m["forward_ratio"] == pytest.approx(m["forward_s"] / m["predicted_forward_scaled_s"])
    assert m["final_val_loss"] == m["val_curve"][-1][1]
    assert m["first_train_loss"] == m["loss_curve"][0][1] and m["resumed_from"] is None
    assert m["wall_time_s"] > 0
    assert not (lora_run["out"] / "checkpoints").exists()  # checkpoint_every=0


def test_step_time_spread_leaves_out_the_first_step():
    from layercard.train.metrics import median_time, step_time_spread

    rows = [[1, 9.0, 10, True]] + [[i + 2, float(s), 10, False] for i, s in enumerate(range(1, 12))]
    spread = step_time_spread(rows)
    assert spread == {"fastest": 1.0, "p10": 2.0, "p90": 10.0, "slowest": 11.0, "steps": 11}
    assert median_time(rows)[0] == 6.0
    # a session of one step has only its first to go by; no step, no spread
    assert step_time_spread([[1, 3.0, 10, True]])["slowest"] == 3.0 and step_time_spread([]) is None


def test_data_time_is_the_median_of_the_timed_steps_and_none_where_a_step_lacks_it():
    from layercard.train.metrics import data_time

    rows = [[1, 9.0, 10, True, 5.0]] + [[i + 2, 2.0, 10, False, d] for i, d in enumerate([0.1, 0.3, 0.2])]
    assert data_time(rows) == pytest.approx(0.2)  # the first step's 5.0 left out, as from the median
    # a session resumed from a checkpoint written before steps kept it: no figure rather than a partial one
    assert data_time(rows + [[5, 2.0, 10, False]]) is None and data_time([]) is None


@pytest.mark.parametrize("calibrated_here", [False, True])
def test_a_run_prices_its_peak_by_where_it_trains(tmp_path: Path, monkeypatch, calibrated_here: bool):
    import layercard.cost as cost

    window = {"peak_mib": 900.0, "activations_mib": 100.0, "resident_mib": 500.0}
    first = {"peak_mib": 800.0, "activations_mib": 80.0, "resident_mib": 500.0}
    d = plan_dict(_loaded(), [1, 3])
    d["predicted"]["memory"] = window | {"first_step": first}
    plan = Plan.from_dict(d)
    monkeypatch.setattr(cost, "_calibrated_here", calibrated_here)
    m = train(_loaded(), plan, TRAIN, None, TrainConfig(steps=2, **FAST), tmp_path / "run", progress=False)
    # a process that ran no calibration takes the first step's figure; one that did, the window's
    figure, peak = ("window", 900.0) if calibrated_here else ("first_step", 800.0)
    assert m["predicted_memory_figure"] == figure and m["predicted_peak_memory_mib"] == peak
    assert m["predicted_training_memory_mib"] == pytest.approx(m["predicted_peak_memory_scaled_mib"] - 500.0)


def test_a_budget_the_runs_own_batches_exceed_is_said_before_training(tmp_path: Path, monkeypatch):
    import layercard.cost as cost
    from layercard.train.metrics import over_budget, priced_at

    monkeypatch.setattr(cost, "_calibrated_here", True)  # the window's figure, whatever ran before
    d = plan_dict(_loaded(), [1, 3])
    # a card whose calibration batch was short: every micro-batch of this run is longer
    d["predicted"] |= {
        "calibration_batch_positions": 40,
        "step_time_position_share": 1.0,
        "memory": {"peak_mib": 900.0, "activations_mib": 100.0, "resident_mib": 500.0},
    }
    d["config"]["budget"] = "memory=901,step_time=0.051,params=10"
    cfg = TrainConfig(steps=3, grad_accum=2, **FAST)
    m = train(_loaded(), Plan.from_dict(d), TRAIN, None, cfg, tmp_path / "run", progress=False)
    notes = m["budget_notes"]
    assert [x.split(":")[0] for x in notes] == ["budget memory=901 MiB", "budget step_time=0.051 s"]
    # said before the first step, from the data stream alone: the positions the run then counted
    assert f"({m['max_batch_positions']:,} padded positions" in notes[0]
    assert f"({m['batch_positions_per_step']:,.0f} padded positions per step" in notes[1]
    at = priced_at(d["predicted"], m["batch_positions_per_step"], m["max_batch_positions"])
    assert notes == over_budget(d["config"]["budget"], d["predicted"], at)
    assert f"{m['predicted_peak_memory_scaled_mib']:,.0f} MiB" in notes[0]
    d["config"]["budget"] = "memory=100000,step_time=100"
    m = train(_loaded(), Plan.from_dict(d), TRAIN, None, cfg, tmp_path / "fits", progress=False)
    assert m["budget_notes"] == []


def test_data_prepared_once_trains_as_the_run_would_encode_it(tmp_path: Path):
    from layercard.train import planned_positions, prepare_data

    loaded = _loaded()
    plan = Plan.from_dict(plan_dict(loaded, [1, 3]))
    cfg = TrainConfig(steps=3, grad_accum=2, **FAST)
    data = prepare_data(loaded, TRAIN, VAL, cfg)
    given = train(loaded, plan, TRAIN, VAL, cfg, tmp_path / "given", progress=False, data=data)
    own = train(loaded, plan, TRAIN, VAL, cfg, tmp_path / "own", progress=False)
    assert given["loss_curve"] == own["loss_curve"] and given["val_curve"] == own["val_curve"]
    assert given["provenance"]["data_hash"] == own["provenance"]["data_hash"]
    assert given["task"] == own["task"] and given["val_task"] == own["val_task"]
    assert planned_positions(data, cfg) == (given["batch_positions_per_step"], given["max_batch_positions"])
    # examples encoded for another run are refused before any work
    others = [
        (loaded, VAL, VAL, cfg),
        (loaded, TRAIN, None, cfg),
        (loaded, TRAIN, VAL, dataclasses.replace(cfg, max_length=32)),
        (loaded, TRAIN, VAL, dataclasses.replace(cfg, seed=1)),
        (_loaded(), TRAIN, VAL, cfg),
    ]
    for i, (model, task, val, other) in enumerate(others):
        with pytest.raises(LayercardError, match="^data: prepared for other tasks"):
            train(model, plan, task, val, other, tmp_path / f"other{i}", progress=False, data=data)
        assert not (tmp_path / f"other{i}" / "train_metrics.json").exists()


@pytest.mark.parametrize("calibrated_here", [True, False])
def test_a_dry_run_says_what_the_run_then_does(tmp_path: Path, monkeypatch, calibrated_here: bool):
    import layercard.cost as cost
    from layercard.train import estimate

    monkeypatch.setattr(cost, "_calibrated_here", calibrated_here)
    loaded = _loaded()
    d = plan_dict(loaded, [1, 3])
    first = {"peak_mib": 700.0, "activations_mib": 50.0, "resident_mib": 500.0}
    d["predicted"] |= {
        "calibration_batch_positions": 40,
        "step_time_position_share": 0.5,
        "memory": {"peak_mib": 900.0, "activations_mib": 100.0, "resident_mib": 500.0, "first_step": first},
    }
    d["config"]["budget"] = "memory=1100,step_time=0.051"
    plan = Plan.from_dict(d)
    cfg = TrainConfig(steps=3, grad_accum=2, **FAST)
    est = estimate(loaded, plan, TRAIN, VAL, cfg)
    assert not list(tmp_path.iterdir())  # nothing written
    m = train(loaded, plan, TRAIN, VAL, cfg, tmp_path / "run", progress=False)
    assert (est["steps"], est["epochs"]) == (m["steps"], pytest.approx(m["epochs"]))
    assert (est["positions_per_step"], est["max_positions"]) == (
        m["batch_positions_per_step"],
        m["max_batch_positions"],
    )
    assert est["step_time_at_run_s"] == pytest.approx(m["predicted_step_time_scaled_s"])
    assert est["steps_s"] == pytest.approx(3 * m["predicted_step_time_scaled_s"])
    assert est["processes"] == 1
    assert est["peak_memory_at_run_mib"] == pytest.approx(m["predicted_peak_memory_scaled_mib"])
    assert (
        est["memory_figure"]
        == m["predicted_memory_figure"]
        == ("window" if calibrated_here else "first_step")
    )
    assert est["budget_notes"] == m["budget_notes"]
    assert [x.split(":")[0] for x in est["budget_notes"]] == [
        "budget memory=1100 MiB",
        "budget step_time=0.051 s",
    ][int(calibrated_here is False) :]


def test_stream_positions_are_those_of_the_batches_it_builds():
    from layercard.train.data import Stream, launch_positions, run_positions

    encoded = [Encoded(tuple(range(n)), tuple(range(n)), 0) for n in (3, 9, 4, 7, 5)]
    stream = Stream(encoded, 2, 0, seed=1)
    built = [stream.batch(k)["input_ids"].numel() for k in range(8)]  # three epochs of 3 micro-batches
    assert [stream.positions(k) for k in range(8)] == built
    # two steps of two micro-batches, two processes, this one the second: micro-batches 1, 3, 5, 7
    per_step, largest = run_positions(stream, 2, 2, world=2, rank=1)
    mine = [built[k] for k in (1, 3, 5, 7)]
    assert per_step == pytest.approx(sum(mine) / 2) and largest == max(mine)
    # the launch is priced at its busiest process and at the largest micro-batch of any
    first = [built[k] for k in (0, 2, 4, 6)]
    assert sum(first) != sum(mine)  # the two processes differ, so the maximum is a choice
    assert launch_positions(stream, 2, 2, world=2) == (max(sum(first), sum(mine)) / 2, max(built))


def test_a_run_of_any_length_is_priced_from_its_first_micro_batches(monkeypatch):
    """Pricing counts at most EXACT_MICRO_BATCHES micro-batches of a process: a run of 10^12 steps is
    priced at once, at the mean and largest of its first ones, and a shorter run exactly."""
    from layercard.train import data

    encoded = [Encoded(tuple(range(n)), tuple(range(n)), 0) for n in (3, 9, 4, 7, 5)]
    stream = data.Stream(encoded, 2, 0, seed=1)
    monkeypatch.setattr(data, "EXACT_MICRO_BATCHES", 6)
    built = [stream.batch(k)["input_ids"].numel() for k in range(12)]
    # three steps of two micro-batches: the six counted, exactly
    assert data.run_positions(stream, 3, 2, world=1, rank=0) == (sum(built[:6]) / 3, max(built[:6]))
    # 10^12 steps of two, two processes, this one the first: micro-batches 0, 2, ..., 10 counted
    mine = built[0:12:2]
    per_step, largest = data.run_positions(stream, 10**12, 2, world=2, rank=0)
    assert per_step == pytest.approx(2 * sum(mine) / 6) and largest == max(mine)


def test_seed_replicates_share_no_epoch_order():
    from layercard.train.data import Stream

    encoded = [Encoded((i,), (i,), 0) for i in range(12)]

    def epochs(seed: int, order: list[int]) -> dict[int, list[int]]:
        stream = Stream(encoded, 12, 0, seed=seed)  # one micro-batch per epoch
        return {k: stream.batch(k)["input_ids"].flatten().tolist() for k in order}

    ahead = epochs(0, [0, 1, 2, 3])
    assert epochs(0, [3, 1, 0, 2]) == ahead  # any access order gives the same epochs
    assert sorted(ahead[0]) == list(range(12)) and len({tuple(v) for v in ahead.values()}) == 4
    first = torch.randperm(12, generator=torch.Generator().manual_seed(0)).tolist()
    assert ahead[0] == first  # the first epoch is the seed's own permutation
    other = epochs(1, [0, 1, 2, 3])
    assert not {tuple(v) for v in ahead.values()} & {tuple(v) for v in other.values()}


def test_train_metrics_artifact_roundtrip(lora_run, tmp_path: Path):
    path = lora_run["out"] / "train_metrics.json"
    tm = TrainMetrics.load(path)
    assert TrainMetrics.load(lora_run["out"]) == tm  # the run folder names its metrics file
    assert tm.to_dict() == lora_run["metrics"]
    assert tm.adapter_kind == "lora" and tm.steps == 20 and tm.trainable_params == 896
    again = tm.save(tmp_path / "again.json")
    assert again.read_bytes() == path.read_bytes()  # the same bytes train wrote
    raw = json.loads(path.read_text())
    (tmp_path / "wrong.json").write_text(json.dumps({**raw, "kind": "plan"}))
    with pytest.raises(LayercardError, match="expected a train_metrics artifact"):
        TrainMetrics.load(tmp_path / "wrong.json")
    (tmp_path / "old.json").write_text(json.dumps({**raw, "schema_version": 0}))
    with pytest.raises(LayercardError, match="schema_version=0"):
        TrainMetrics.load(tmp_path / "old.json")
    del raw["s_per_step"]
    (tmp_path / "short.json").write_text(json.dumps(raw))
    with pytest.raises(LayercardError, match="short.json: s_per_step: missing") as e:
        TrainMetrics.load(tmp_path / "short.json")
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Determinism, gradient accumulation, resume
# ---------------------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("kind", ["lora", "houlsby"])
def test_resume_equals_uninterrupted(tmp_path: Path, kind: str):
    def run(out: Path, *, resume: bool = False, stop_at: int | None = None) -> dict[str, Any]:
        loaded = _loaded()

        def callback(step: int, _loss: float, _model: torch.nn.Module) -> None:
            if step == stop_at:
                raise Interrupt

        # Dropout on, so the resumed run must also restore the RNG state to match.
        plan = make_plan(loaded, [0, 2], kind=kind, dropout=0.2)
        cfg = TrainConfig(steps=6, lr=1e-2, eval_every=2, **{**FAST, "checkpoint_every": 3})
        return train(loaded, plan, TRAIN, VAL, cfg, out, resume=resume, callback=callback)

    full = run(tmp_path / "full")
    again = run(tmp_path / "again")
    assert again["loss_curve"] == full["loss_curve"]  # same seed, same curve

    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        run(part, stop_at=3)
    # Interrupted: checkpoints only, no half-written outputs.
    assert not (part / "adapter").exists() and not (part / "train_metrics.json").exists()
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-3"]
    with pytest.raises(LayercardError, match="--resume"):
        run(part)
    resumed = run(part, resume=True)
    assert resumed["resumed_from"] == 3
    assert [s for s, _ in resumed["loss_curve"]] == list(range(1, 7))
    for key in ("loss_curve", "val_curve"):
        for (s1, a), (s2, b) in zip(resumed[key], full[key], strict=True):
            assert s1 == s2 and a == pytest.approx(b, rel=1e-6, abs=1e-6)
    # finished: the newest checkpoint alone, the one a longer run could go on from
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-6"]
    assert resumed["tokens_seen"] == full["tokens_seen"]


def test_resume_refuses_changed_settings(tmp_path: Path):
    loaded = _loaded()
    plan = make_plan(loaded, [1])
    cfg = TrainConfig(steps=2, **{**FAST, "checkpoint_every": 2, "eval_examples": 0})
    train(loaded, plan, TRAIN, None, cfg, tmp_path)
    with pytest.raises(LayercardError, match="lr was 0.001, now 0.01"):
        train(loaded, plan, TRAIN, None, TrainConfig(**{**cfg.to_dict(), "lr": 1e-2}), tmp_path, resume=True)
    # More steps on a constant schedule is fine: training continues from step 2.
    more = train(
        loaded, plan, TRAIN, None, TrainConfig(**{**cfg.to_dict(), "steps": 3}), tmp_path, resume=True
    )
    assert more["resumed_from"] == 2 and len(more["loss_curve"]) == 3


def test_grad_accum_matches_one_big_batch(tmp_path: Path):
    """Two micro-batches of 4 normalised by their joint token count equal one batch of 8."""
    curves = []
    for bs, ga in ((8, 1), (4, 2)):
        loaded = _loaded()
        cfg = TrainConfig(steps=2, lr=1e-2, **{**FAST, "batch_size": bs, "eval_examples": 0}, grad_accum=ga)
        m = train(loaded, make_plan(loaded, [1]), TRAIN, None, cfg, tmp_path / f"{bs}x{ga}")
        curves.append([loss for _, loss in m["loss_curve"]])
        assert m["epochs"] == pytest.approx(2.0) and m["val_curve"] == [] and m["final_val_loss"] is None
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)


def test_epochs_and_parallel_kind_override(tmp_path: Path):
    loaded = _loaded()
    cfg = TrainConfig(steps=None, epochs=1.5, bottleneck=3, **FAST)
    m = train(loaded, make_plan(loaded, [2, 3]), TRAIN, VAL, cfg, tmp_path, kind="parallel")
    assert m["steps"] == 3 and m["adapter_kind"] == "parallel"  # ceil(1.5 · 8 / 4)
    assert m["trainable_params"] == 2 * 2 * (32 * 3 * 2 + 3 + 32)
    cfg_json = json.loads((tmp_path / "adapter" / "layercard_adapter.json").read_text())
    assert cfg_json["kind"] == "parallel" and cfg_json["layers"] == [2, 3] and cfg_json["bottleneck"] == 3
    assert cfg_json["base_model_hash"] == loaded.model_hash
    assert not hasattr(loaded.model, "layercard_adapters")  # removed after training


def test_plan_object_is_accepted(tmp_path: Path):
    plan_mod = pytest.importorskip("layercard.plan")
    loaded = _loaded()
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict(loaded, [3])))
    plan = plan_mod.Plan.load(path)
    m = train(loaded, plan, TRAIN, None, TrainConfig(steps=1, **{**FAST, "eval_examples": 0}), tmp_path / "r")
    assert m["plan"]["layers"] == [3] and m["trainable_params"] == 4 * (64 + 48)


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_plan_for_another_model(tmp_path: Path):
    plan = make_plan(_loaded(seed=1), [1])
    with pytest.raises(
        LayercardError, match="plan is for model tiny-llama-1 .* loaded model is tiny-llama-0"
    ):
        train(_loaded(), plan, TRAIN, VAL, TrainConfig(steps=1), tmp_path)
    assert not any(tmp_path.iterdir())


def test_plan_must_be_a_plan(tmp_path: Path):
    loaded = _loaded()
    with pytest.raises(
        LayercardError, match="train: plan must be a Plan, got dict; read plan.json with Plan.load"
    ):
        train(loaded, plan_dict(loaded, [1]), TRAIN, VAL, TrainConfig(steps=1), tmp_path)
    assert not any(tmp_path.iterdir())


def test_unknown_kind_and_mismatched_targets(tmp_path: Path):
    loaded = _loaded()
    plan = make_plan(loaded, [1])
    with pytest.raises(LayercardError, match="lora, houlsby, parallel"):
        train(loaded, plan, TRAIN, VAL, TrainConfig(steps=1), tmp_path, kind="prefix")
    plan = dataclasses.replace(plan, units=plan.units[:1])  # target_modules still lists v_proj
    with pytest.raises(LayercardError, match="adapted but not planned: model.layers.1.self_attn.v_proj"):
        train(loaded, plan, TRAIN, VAL, TrainConfig(steps=1, **FAST), tmp_path)
    assert not any(hasattr(m, "lora_A") for m in loaded.model.modules())  # restored after the error
    no_lora = dataclasses.replace(make_plan(loaded, [1], kind="houlsby"), lora_config=None)
    with pytest.raises(LayercardError, match="no lora_config"):
        train(loaded, no_lora, TRAIN, VAL, TrainConfig(steps=1), tmp_path, kind="lora")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_4bit_needs_cuda(tmp_path: Path):
    loaded = _loaded()
    with pytest.raises(LayercardError, match="--load-in-4bit needs a CUDA GPU and bitsandbytes; none found"):
        train(
            loaded,
            make_plan(loaded, [1]),
            TRAIN,
            VAL,
            TrainConfig(steps=1, load_in_4bit=True),
            tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"steps": 5, "epochs": 1.0}, "steps"),
        ({"steps": None}, "steps"),
        ({"steps": 0}, "steps"),
        ({"steps": None, "epochs": -1.0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"scheduler": "step"}, "scheduler"),
        ({"dtype": "int8"}, "dtype"),
        ({"train_examples": 0}, "train_examples"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], field: str):
    with pytest.raises(LayercardError, match=f"^train.{field}:"):
        TrainConfig(**kwargs)


def test_schedules():
    from layercard.train.data import lr_lambda

    lin = lr_lambda(TrainConfig(steps=10, scheduler="linear", warmup_steps=2), 10)
    assert [round(lin(s), 3) for s in (0, 1, 2, 6, 9)] == [0.333, 0.667, 1.0, 0.5, 0.125]
    cos = lr_lambda(TrainConfig(steps=10, scheduler="cosine"), 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and 0 < cos(9) < 0.05


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def test_cli_train(tmp_path: Path, monkeypatch):
    from typer.testing import CliRunner

    from layercard.cli import app
    from layercard.models import load_model

    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    loaded = load_model(str(folder))
    plan = plan_dict(loaded, [1, 2], kind="houlsby")
    # make_plan records the batch shape the card's cost model was timed at.
    plan["predicted"] |= {"calibration_batch_size": 8, "calibration_batch_tokens": 1000}
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    args = ["train", "--plan", str(plan_path), "--task", "synthetic:facts", "--out", str(tmp_path / "run")]
    args += ["--steps", "2", "--batch-size", "2", "--max-length", "64", "--train-examples", "4"]
    args += ["--eval-examples", "2", "--checkpoint-every", "2"]
    runner = CliRunner()
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert m["adapter_kind"] == "houlsby" and m["steps"] == 2 and m["plan"]["bottleneck"] == 4
    assert m["predicted_batch_size"] == 8 and m["predicted_batch_tokens"] == 1000 and m["batch_size"] == 2
    assert m["val_task"]["split"] == "test" and m["final_val_loss"] is not None  # held-out split by default
    assert (tmp_path / "run" / "adapter" / "layercard_adapter.json").is_file()
    assert m["config"]["dtype"] == "float32"  # the compute precision; --precision sets it
    elsewhere = [str(tmp_path / "bf16") if a == str(tmp_path / "run") else a for a in args]
    res = runner.invoke(app, [*elsewhere, "--steps", "1", "--precision", "bfloat16"])
    assert res.exit_code == 0, res.output
    bf16 = json.loads((tmp_path / "bf16" / "train_metrics.json").read_text())
    assert bf16["config"]["dtype"] == "bfloat16" and math.isfinite(bf16["final_train_loss"])
    cut = [str(tmp_path / "cut") if a == str(tmp_path / "bf16") else a for a in elsewhere]
    res = runner.invoke(app, [*cut, "--steps", "1", "--max-length", "8", "--json"])  # no bars: still said
    assert res.exit_code == 0 and json.loads(res.stdout)["task"]["cut"]["to_max_length"] == 4, res.output
    assert "of 4 training examples are longer than max_length 8 tokens" in " ".join(res.stderr.split())
    assert TrainMetrics.load(tmp_path / "cut" / "train_metrics.json").task["cut"]["to_max_length"] == 4
    shutil.rmtree(tmp_path / "cut")
    res = runner.invoke(app, [*elsewhere, "--precision", "fp8"])
    said = "--precision: must be one of float32, bfloat16, float16; got 'fp8'"
    assert res.exit_code == 2 and said in res.output
    shutil.rmtree(tmp_path / "bf16")

    # a finished run is not trained over, --resume or not: its adapter and figures stay as they were
    written = {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    res = runner.invoke(app, [*args, "--resume", "--steps", "3"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "holds a finished run (train_metrics.json)" in res.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == written

    # killed after its last checkpoint, before it wrote the adapter: --resume continues it
    shutil.rmtree(tmp_path / "run" / "adapter")
    (tmp_path / "run" / "train_metrics.json").unlink()
    res = runner.invoke(app, [*args, "--resume", "--steps", "3"])  # the rich summary
    assert res.exit_code == 0, res.output
    assert "trainable params" in res.output and "resumed from step" in res.output
    m = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    spread = m["s_per_step_spread"]  # both sessions' steps after each one's first
    assert spread["steps"] == 1 and f"{m['s_per_step']:.3f}, one step" in res.output

    # a dry run trains and writes nothing, and needs no run folder
    dry = [a for a in args if a not in ("--out", str(tmp_path / "run"))]
    res = runner.invoke(app, [*dry, "--steps", "5", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    est = json.loads(res.stdout)
    assert est["steps"] == 5 and est["kind"] == "houlsby" and est["train_examples"] == 4
    assert est["max_positions"] >= est["positions_per_step"]  # one micro-batch per step: the mean
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "plan.json", "run", "tiny"]
    res = runner.invoke(app, [*dry, "--dry-run"])
    assert res.exit_code == 0 and "--step-positions" in res.output, res.output
    assert "(one process)" in res.output and "exchange of gradients" not in res.output
    res = runner.invoke(app, [*dry, "--steps", "5", "--dry-run", "--processes", "2"])
    said = " ".join(res.output.split())  # as read, whatever the terminal's width
    assert res.exit_code == 0 and "(2 processes)" in said and "the busiest process's" in said, said
    assert "exchange of gradients" in said
    res = runner.invoke(app, [*dry, "--dry-run", "--max-length", "8"])  # every example cut: said
    assert res.exit_code == 0, res.output
    assert "of 4 training examples are longer than max_length 8 tokens" in " ".join(res.output.split())
    res = runner.invoke(app, [*dry, "--steps", "null", "--epochs", "1", "--dry-run", "--json"])  # as in YAML
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["epochs"] == pytest.approx(1.0)
    res = runner.invoke(app, [*dry, "--steps", "many", "--dry-run"])
    assert res.exit_code == 2 and "'many' is not an integer or null" in res.output
    res = runner.invoke(app, [*args, "--processes", "2"])
    assert res.exit_code == 2 and "--processes: only with --dry-run" in res.output
    res = runner.invoke(app, dry)
    assert res.exit_code == 2 and "--out: required" in res.output

    fresh = [str(tmp_path / "new") if a == str(tmp_path / "run") else a for a in args]
    res = runner.invoke(app, [*fresh, "--model", "nowhere-model"])
    assert res.exit_code == 2 and "nowhere-model" in res.output
    res = runner.invoke(app, [*fresh, "--epochs", "1"])
    assert (
        res.exit_code == 2
        and "give exactly one of steps and epochs" in res.output
        and len(res.output.strip().splitlines()) == 1
    )

    # a launched process other than the first prints nothing of the files the first one writes
    import layercard.train

    monkeypatch.setattr(layercard.train, "is_launch_main", lambda: False)
    res = runner.invoke(app, fresh)
    assert res.exit_code == 0 and "wrote" not in res.output and "trainable params" not in res.output


def test_the_adapter_readme_names_the_placement_and_the_run(lora_run):
    text = (lora_run["out"] / "adapter" / "README.md").read_text()
    assert is_layercard_readme(text) and "More Information Needed" not in text
    assert "4 LoRA modules: q, v of layers 1, 3 (2 layers), rank 4, lora_alpha 8" in text
    m = lora_run["metrics"]
    assert f"| trainable parameters | {m['trainable_params']:,} of {m['total_params']:,} |" in text
    assert f"{m['final_val_loss']:.4f} on facts" in text and "base_model:" not in text


def test_readme_helpers():
    assert layer_spans([8, 7, 0, 1, 2, 5]) == "0–2, 5, 7–8" and layer_spans([]) == ""
    assert "base_model: org/name" in front_matter("org/name", "/hub/models--org--name/snapshots/abc")
    assert "base_model" not in front_matter("smollm2", "/cache/gguf/x")
    assert "base_model" not in front_matter("org/name", "/home/me/org/name")  # a folder of that name
    assert not is_layercard_readme("---\nlibrary_name: peft\ntags:\n- lora\n---\n# Model Card for Model ID")


def test_an_adapter_is_refused_on_another_base(lora_run):
    from layercard.config import EvalConfig
    from layercard.evaluate import evaluate

    adapter = lora_run["out"] / "adapter"
    base = json.loads((adapter / "layercard_base.json").read_text())
    assert base == {"model_id": "tiny-llama-0", "model_hash": lora_run["loaded"].model_hash}
    other = _loaded(seed=1)  # the same architecture, other weights: PEFT itself would load it
    with pytest.raises(LayercardError, match="adapter was trained on base model"):
        evaluate(other, VAL, EvalConfig(examples=2), adapter=adapter)
    assert evaluate(lora_run["loaded"], VAL, EvalConfig(examples=2), adapter=adapter).n == 2


def test_a_weight_blow_up_that_stays_finite_stops_the_run(tmp_path: Path):
    # at lr 1e30 the adapters overflow a norm inside the model, which zeroes the hidden state: the loss is
    # then ln(vocab) and every gradient exactly zero, all finite
    with pytest.raises(LayercardError, match="gradient of the trainable parameters is exactly zero"):
        train(
            _loaded(),
            make_plan(_loaded(), [1, 3]),
            TRAIN,
            VAL,
            TrainConfig(steps=6, lr=1e30, **FAST),
            tmp_path,
        )
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "train_metrics.json").exists()


def test_a_loss_that_never_depended_on_the_adapters_is_not_called_a_divergence(tmp_path: Path):
    loaded = _loaded()
    with torch.no_grad():
        models.lm_head(loaded.model).weight.zero_()  # constant logits: no gradient reaches any layer
    with pytest.raises(LayercardError, match=r"^train: step 1 of 2: .* exactly zero before any update") as e:
        train(loaded, make_plan(loaded, [1, 3]), TRAIN, VAL, TrainConfig(steps=2, **FAST), tmp_path)
    assert "diverged" not in str(e.value) and "lower learning rate" not in str(e.value)
    assert not (tmp_path / "adapter").exists()


def test_float16_is_refused_on_a_cpu(tmp_path: Path):
    # Accelerate runs neither float16 autocast nor a loss scaler on a CPU: float32 would be recorded float16
    cfg = TrainConfig(steps=1, dtype="float16", **FAST)
    with pytest.raises(LayercardError, match="^--precision: float16 trains on a GPU only"):
        train(_loaded(), make_plan(_loaded(), [1]), TRAIN, VAL, cfg, tmp_path)
    assert not any(tmp_path.iterdir())
    with pytest.raises(LayercardError, match="^--precision: float16"):  # the dry run says so too
        estimate(_loaded(), make_plan(_loaded(), [1]), TRAIN, VAL, cfg)


def test_the_dry_run_takes_the_device_training_takes_on_a_mac(monkeypatch):
    """Training takes a CUDA GPU, else the CPU, also where Apple's MPS is there: the dry run judges
    float16 on that device too, and refuses it as the run would."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    cfg = TrainConfig(steps=1, dtype="float16", **FAST)
    with pytest.raises(LayercardError, match="^--precision: float16 trains on a GPU only"):
        estimate(_loaded(), make_plan(_loaded(), [1]), TRAIN, VAL, cfg)


def _skipping(monkeypatch: pytest.MonkeyPatch, first: int | None) -> None:
    """Have Accelerate report the first ``first`` optimizer steps (None: every one) as skipped by a loss
    scaler, as float16's does on a GPU while its gradients overflow (a CPU runs no scaler)."""
    from accelerate import Accelerator

    calls = {"n": 0}

    def skipped(self: Any) -> bool:
        calls["n"] += 1
        return first is None or calls["n"] <= first

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(skipped))


def test_steps_a_loss_scaler_skipped_are_counted_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    _skipping(monkeypatch, 2)
    cfg = TrainConfig(steps=3, **{**FAST, "checkpoint_every": 2})
    m = train(_loaded(), make_plan(_loaded(), [1]), TRAIN, VAL, cfg, tmp_path / "a", progress=False)
    assert m["skipped_steps"] == 2 and m["steps"] == 3
    assert TrainMetrics.load(tmp_path / "a").skipped_steps == 2
    err = capsys.readouterr().err
    assert "float16's loss scaler skipped 2 of the 3 optimizer steps" in err and "moved on 1" in err
    # a checkpoint keeps the count, so that a resumed run adds to it
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["skipped_steps"] == 2
    monkeypatch.undo()
    plain = train(
        _loaded(), make_plan(_loaded(), [1]), TRAIN, VAL, TrainConfig(steps=1, **FAST), tmp_path / "b"
    )
    assert plain["skipped_steps"] == 0 and "loss scaler" not in capsys.readouterr().err


def test_a_run_whose_every_step_was_skipped_writes_no_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    _skipping(monkeypatch, None)
    with pytest.raises(
        LayercardError, match=r"^train: float16's loss scaler skipped all 2 optimizer steps"
    ) as e:
        train(_loaded(), make_plan(_loaded(), [1]), TRAIN, VAL, TrainConfig(steps=2, **FAST), tmp_path)
    assert "--precision bfloat16 or float32" in str(e.value)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "train_metrics.json").exists()


def test_a_metric_that_is_not_finite_leaves_no_adapter(tmp_path: Path):
    loaded = _loaded()
    d = plan_dict(loaded, [1])
    d["predicted"]["step_time_s"] = 1e308  # restated at the run's positions, it overflows
    cfg = TrainConfig(steps=2, **{**FAST, "eval_examples": 0, "max_length": 120})
    with pytest.raises(LayercardError, match="is not finite .*no adapter or train_metrics.json was written"):
        train(loaded, Plan.from_dict(d), TRAIN, None, cfg, tmp_path)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "train_metrics.json").exists()


def test_a_checkpoint_keeps_the_loss_scale(tmp_path: Path):
    from layercard.train.checkpoints import _ABSENT_MEANS, load_checkpoint, save_checkpoint

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    scaler.scale(torch.ones(1))  # the scale is made on first use
    scaler.update(new_scale=2.0**19)  # where float16 had backed off to when the checkpoint was written
    run = dict(_ABSENT_MEANS)  # the settings a fingerprint compares where they are absent
    counts = {"step": 4, "micro_batches": 4, "tokens_seen": 8, "target_tokens_seen": 4, "wall_time_s": 1.0}
    state = {
        **counts,
        "loss_curve": [],
        "val_curve": [],
        "step_times": [],
        "init_s": None,
        "fingerprint": run,
    }
    path = save_checkpoint(tmp_path, 4, {"w": weight}, optimizer, scheduler, state, scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    load_checkpoint(path, {"w": weight}, optimizer, scheduler, run, fresh)
    assert fresh.get_scale() == 2.0**19


def test_an_update_the_loss_scaler_skipped_does_not_advance_the_schedule(tmp_path: Path, monkeypatch):
    # float16's scaler runs on a GPU only; here the accelerator reports every update skipped, as the
    # scaler does where the gradients overflowed
    from accelerate import Accelerator

    from layercard.train.checkpoints import TRAINER_FILE

    cfg = TrainConfig(steps=2, warmup_steps=4, scheduler="linear", **{**FAST, "checkpoint_every": 2})
    for skipped in (False, True):
        monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self, s=skipped: s))
        out = tmp_path / str(skipped)
        # every update skipped: refused at the end, once its checkpoints are written
        with pytest.raises(LayercardError, match="skipped all 2") if skipped else contextlib.nullcontext():
            train(_loaded(), make_plan(_loaded(), [1]), TRAIN, None, cfg, out)
        saved = torch.load(out / "checkpoints" / "step-2" / TRAINER_FILE, weights_only=False)
        assert saved["scheduler"]["last_epoch"] == (0 if skipped else 2)


@pytest.mark.parametrize("progress", [True, False])  # False: --json; a warning is no progress to hide
def test_a_warm_up_as_long_as_the_run_is_said(tmp_path: Path, capsys, progress):
    cfg = TrainConfig(steps=2, warmup_steps=2, **FAST)
    train(_loaded(), make_plan(_loaded(), [1]), TRAIN, None, cfg, tmp_path, progress=progress)
    said = " ".join(capsys.readouterr().err.split())
    assert "warning: --warmup-steps 2 is not below the run's 2 steps: the learning rate never reaches" in said


def test_a_gradient_too_small_for_its_norm_is_no_divergence(tmp_path: Path):
    # squared in float32, a gradient under about 1e-22 has a norm of 0 though none of its elements is
    loaded = _loaded()
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(1e-24)
    m = train(
        loaded,
        make_plan(loaded, [1]),
        TRAIN,
        None,
        TrainConfig(steps=2, **{**FAST, "eval_examples": 0}),
        tmp_path,
    )
    assert m["steps"] == 2 and (tmp_path / "adapter").is_dir()


def test_a_validation_task_named_without_a_split_is_held_out():
    from layercard.cli.train import _val_task

    train_t = load_task("synthetic:facts")
    for val_task in (None, "synthetic:facts", "facts"):  # --task alone, or named again without a split
        assert _val_task(train_t, "synthetic:facts", val_task, None, 0, {}).split == "test"
    # --task naming its split, alone: the task's held-out split
    assert _val_task(train_t, "synthetic:facts:train", None, None, 0, {}).split == "test"
    assert _val_task(train_t, "synthetic:facts", "format", None, 0, {}).name == "format"
    # the training examples themselves are refused, however they are named
    for val_task, val_split in (("synthetic:facts", "train"), (None, "train"), ("facts:train", None)):
        with pytest.raises(LayercardError, match=r"holds the same examples as --task \(train\)"):
            _val_task(train_t, "synthetic:facts", val_task, val_split, 0, {})


def test_a_renamed_copy_of_the_training_data_is_no_validation_task(tmp_path, capsys):
    from layercard.cli.train import _val_task

    rows = [json.dumps({"input": f"q{i}", "target": f"a{i}"}) + "\n" for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(rows))
    (tmp_path / "copy.jsonl").write_text("".join(reversed(rows)))
    (tmp_path / "part.jsonl").write_text("".join(rows[5:]) + json.dumps({"input": "new", "target": "b"}))
    train_t = load_task(str(tmp_path / "train.jsonl"))
    with pytest.raises(LayercardError, match=r"copy.jsonl \(copy\) holds the same examples as --task"):
        _val_task(train_t, str(tmp_path / "train.jsonl"), str(tmp_path / "copy.jsonl"), None, 0, {})
    val = _val_task(train_t, str(tmp_path / "train.jsonl"), str(tmp_path / "part.jsonl"), None, 0, {})
    assert len(val) == 4 and val.shared_with(train_t) == 3
    assert "--val-task: 3 of 4 validation examples are also training examples" in capsys.readouterr().err


def test_an_empty_validation_split_is_no_copy_of_the_training_data(monkeypatch):
    import layercard.tasks
    from layercard.cli.train import _val_task

    empty = dataclasses.replace(load_task("synthetic:format", split="test"), examples=())
    monkeypatch.setattr(layercard.tasks, "validation_task", lambda *a, **k: empty)
    assert len(_val_task(load_task("synthetic:facts"), "synthetic:facts", "other", None, 0, {})) == 0


def test_a_finished_run_is_not_trained_over(lora_run, tmp_path):
    # checked under the folder's lock, where two processes cannot both pass it
    run = tmp_path / "run"
    shutil.copytree(lora_run["out"], run)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # a run that kept none (checkpoint_every 0)
    before = (run / "train_metrics.json").read_bytes()
    cfg = TrainConfig(steps=2, **FAST)
    for resume in (False, True):
        with pytest.raises(LayercardError, match=r"holds a finished run \(train_metrics\.json\)"):
            train(lora_run["loaded"], lora_run["plan"], TRAIN, None, cfg, run, resume=resume)
    assert (run / "train_metrics.json").read_bytes() == before
    # nor resumed from a checkpoint short of its last step (a second `train --resume` of a finished run
    # whose last step was not checkpointed)
    kept = TrainConfig(steps=5, **{**FAST, "checkpoint_every": 2, "eval_examples": 0})
    train(lora_run["loaded"], lora_run["plan"], TRAIN, None, kept, tmp_path / "kept")
    assert [p.name for p in (tmp_path / "kept" / "checkpoints").iterdir()] == ["step-4"]  # the newest alone
    before = (tmp_path / "kept" / "train_metrics.json").read_bytes()
    with pytest.raises(LayercardError, match=r"a finished run of 5 steps .* its checkpoint step-4 is short"):
        train(lora_run["loaded"], lora_run["plan"], TRAIN, None, kept, tmp_path / "kept", resume=True)
    assert (tmp_path / "kept" / "train_metrics.json").read_bytes() == before


def test_the_4bit_copy_is_read_from_safetensors_and_runs_no_code_the_base_did_not(monkeypatch):
    """QLoRA reloads the base from its folder: from safetensors alone, and with custom code only where the
    base itself was loaded with it (its class then comes from transformers' dynamic modules)."""
    import peft
    import transformers

    from layercard.train import model as train_model

    seen: dict[str, Any] = {}

    def fake_load(source: str, **kw: Any) -> torch.nn.Module:
        seen.update(kw)
        return tiny_model("llama")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_load)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda m, **_: m)
    train_model.load_4bit(_loaded(), 0)
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    custom = _loaded()
    monkeypatch.setattr(type(custom.model), "__module__", "transformers_modules.someone.model")
    train_model.load_4bit(custom, 0)
    assert seen["trust_remote_code"] is True


def test_a_run_gives_the_caller_back_its_random_and_accelerate_state(tmp_path: Path):
    """A script that trains in a loop draws on as it would have (the run seeds for itself), and an
    Accelerator it makes afterwards may take any precision."""
    import random

    import numpy as np
    from accelerate.state import AcceleratorState

    loaded = _loaded()  # built from a seed of its own
    plan = make_plan(loaded, [1])
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    py, npy, pt = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    shared = dict(AcceleratorState._shared_state)
    train(loaded, plan, TRAIN, None, TrainConfig(steps=1, **FAST), tmp_path)
    assert random.getstate() == py and (np.random.get_state()[1] == npy).all()
    assert torch.equal(torch.get_rng_state(), pt)
    assert AcceleratorState._shared_state == shared


def test_an_interrupt_while_peft_wraps_the_model_leaves_the_base_as_it_was(tmp_path: Path, monkeypatch):
    """PEFT wraps module after module: cut after the first, the wrapper it left had the next run train the
    base weights themselves, in place and without an error."""
    from peft.tuners.lora import LoraModel

    loaded = _loaded()
    flags = {n: p.requires_grad for n, p in loaded.model.named_parameters()}
    weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    wrap, calls = LoraModel._create_and_replace, {"n": 0}

    def cut(self: Any, *a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return wrap(self, *a, **k)

    monkeypatch.setattr(LoraModel, "_create_and_replace", cut)
    with pytest.raises(KeyboardInterrupt):
        train(loaded, make_plan(loaded, [1, 3]), TRAIN, None, TrainConfig(steps=1, **FAST), tmp_path / "a")
    monkeypatch.undo()
    assert {n: p.requires_grad for n, p in loaded.model.named_parameters()} == flags
    assert not any("lora" in type(m).__module__ for m in loaded.model.modules())
    train(loaded, make_plan(loaded, [1, 3]), TRAIN, None, TrainConfig(steps=1, **FAST), tmp_path / "b")
    assert all(torch.equal(p, weights[n]) for n, p in loaded.model.named_parameters())


def test_the_same_training_in_two_processes_gives_one_adapter_identity(tmp_path: Path):
    """PEFT keeps target_modules as a set and safetensors writes several metadata keys in an order that
    varies per process, and the README records measured times and the path: none may make the same weights,
    trained twice, two adapters (a run would evaluate and trim them again)."""
    import subprocess
    import sys

    script = (
        "import sys; sys.path.insert(0, 'tests'); import test_train as T\n"
        "from layercard.artifacts import hash_folder\n"
        "from layercard.train import TrainConfig, train\n"
        "for kind in ('lora', 'houlsby'):\n"
        "    out = sys.argv[1] + '/' + kind\n"
        "    train(T._loaded(), T.make_plan(T._loaded(), [1, 3]), T.TRAIN, None, "
        "TrainConfig(steps=1, **T.FAST), out, kind=kind, progress=False)\n"
        "    print(hash_folder(out + '/adapter'))\n"
    )
    hashes = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / seed)], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        hashes.append(r.stdout.split())
    assert hashes[0] == hashes[1] and len(hashes[0]) == 2


def test_the_training_record_names_its_plan_by_the_plans_content(tmp_path: Path):
    from layercard.artifacts import content_hash

    plan = make_plan(_loaded(), [1])
    plan_file = plan.save(tmp_path / "plan.json")
    records = []
    for lr in (1e-3, 2e-3):
        m = train(_loaded(), plan, TRAIN, None, TrainConfig(steps=1, lr=lr, **FAST), tmp_path / str(lr))
        records.append(m["provenance"]["config"])
    assert records[0]["plan"] == records[1]["plan"] == content_hash(plan_file)
    assert records[0]["resume_fingerprint"] != records[1]["resume_fingerprint"]  # the lr is one of them
    assert records[0]["device"] == records[1]["device"] == "cpu"  # where its step time was measured


def test_a_large_training_set_is_encoded_as_the_run_reads_it(tmp_path: Path, monkeypatch):
    import layercard.train.loop as loop
    from layercard.tasks import EncodedTask
    from layercard.train import prepare_data

    task = load_task("synthetic:facts", split="train").subset(40)
    loaded = _loaded()
    plan = make_plan(loaded, [1, 3])
    # 3 steps of 2 micro-batches of 4 read at most 24 of the 40 examples
    cfg = TrainConfig(steps=3, grad_accum=2, lr=1e-2, eval_every=3, **{**FAST, "train_examples": None})
    ahead = train(loaded, plan, task, VAL, cfg, tmp_path / "ahead", progress=False)
    monkeypatch.setattr(loop, "ENCODE_AHEAD", 10)
    est = estimate(loaded, plan, task, VAL, cfg)
    data = prepare_data(loaded, task, VAL, cfg)
    assert isinstance(data.encoded, EncodedTask) and not data.encoded.read()
    read = train(loaded, plan, task, VAL, cfg, tmp_path / "read", progress=False, data=data)
    n_read = len(data.encoded.read())
    assert 4 <= n_read <= 24 < len(task)
    # the same batches, so the same run, with the whole task's size and hash on record
    for key in ("loss_curve", "val_curve", "batch_positions_per_step", "max_batch_positions", "tokens_seen"):
        assert read[key] == ahead[key], key
    assert read["task"]["n_examples"] == 40 and read["task"]["data_hash"] == ahead["task"]["data_hash"]
    assert est["train_examples"] == 40 and est["positions_per_step"] == ahead["batch_positions_per_step"]
    # cut counts are of the examples read: a length that cuts every example cuts those alone
    short = dataclasses.replace(cfg, max_length=8)
    cut = estimate(loaded, plan, task, VAL, short)
    assert cut["train_examples_cut"] == n_read
    # an example longer than the model reads is refused before any step, among those the run reads
    monkeypatch.setattr(models, "past_context", lambda model, n: "past its context" if n > 20 else None)
    with pytest.raises(LayercardError, match="past its context"):
        train(loaded, plan, task, VAL, cfg, tmp_path / "long", progress=False)
    assert not (tmp_path / "long" / "train_metrics.json").exists()


def test_a_resumed_runs_progress_counts_on_from_its_checkpoint(tmp_path: Path, capsys):
    loaded = _loaded()
    plan = make_plan(loaded, [1])
    cfg = TrainConfig(steps=4, lr=1e-2, eval_every=0, **{**FAST, "checkpoint_every": 2})

    def stop(step: int, _loss: float, _model: torch.nn.Module) -> None:
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(loaded, plan, TRAIN, VAL, cfg, tmp_path, callback=stop, progress=False)
    capsys.readouterr()
    train(loaded, plan, TRAIN, VAL, cfg, tmp_path, resume=True, progress=True)
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train lora:")]
    assert said[0] == "train lora: 2/4" and said[-1].startswith("train lora: 4/4 (")


def test_ctrl_c_is_held_to_the_end_of_its_step_which_is_checkpointed(tmp_path: Path, capsys):
    import signal

    loaded = _loaded()
    plan = make_plan(loaded, [0, 2], dropout=0.2)
    cfg = TrainConfig(steps=6, lr=1e-2, eval_every=2, **{**FAST, "checkpoint_every": 50})

    def ctrl_c(step: int, _loss: float, _model: torch.nn.Module) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    full = train(loaded, plan, TRAIN, VAL, cfg, tmp_path / "full", progress=False)
    # Python's own Ctrl-C handler, as a terminal's command has it: a suite started in the background
    # inherits SIGINT ignored, which training leaves alone
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(loaded, plan, TRAIN, VAL, cfg, tmp_path / "part", callback=ctrl_c, progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
        # with checkpoints off there is nothing to keep: Ctrl-C interrupts where it lands
        off = dataclasses.replace(cfg, checkpoint_every=0)
        with pytest.raises(KeyboardInterrupt):
            train(loaded, plan, TRAIN, VAL, off, tmp_path / "off", callback=ctrl_c, progress=False)
        # a process that ignores SIGINT (a background job) keeps ignoring it: the run goes to its end
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        train(loaded, plan, TRAIN, VAL, cfg, tmp_path / "ignored", callback=ctrl_c, progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert not (tmp_path / "off" / "checkpoints").exists()
    assert (tmp_path / "ignored" / "train_metrics.json").is_file()
    said = capsys.readouterr().err
    assert said.count("interrupted after") == 1
    assert "interrupted after step 3 of 6: checkpoint checkpoints/step-3 kept" in said
    assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["step-3"]
    resumed = train(loaded, plan, TRAIN, VAL, cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed["resumed_from"] == 3
    for key in ("loss_curve", "val_curve"):
        for (s1, a), (s2, b) in zip(resumed[key], full[key], strict=True):
            assert s1 == s2 and a == pytest.approx(b, rel=1e-6, abs=1e-6)


def test_the_command_lines_sigterm_is_held_to_the_end_of_its_step_too(tmp_path: Path, capsys):
    import signal

    from layercard.errors import stop_as_interrupted

    loaded = _loaded()
    plan = make_plan(loaded, [0, 2])
    cfg = TrainConfig(steps=4, lr=1e-2, eval_every=0, **{**FAST, "checkpoint_every": 50})

    def term(step: int, _loss: float, _model: torch.nn.Module) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.signal(signal.SIGTERM, stop_as_interrupted)  # as `layercard` sets it
    try:
        with pytest.raises(KeyboardInterrupt):
            train(loaded, plan, TRAIN, VAL, cfg, tmp_path, callback=term, progress=False)
        assert signal.getsignal(signal.SIGTERM) is stop_as_interrupted
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "interrupted after step 2 of 4" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]
