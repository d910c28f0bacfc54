"""Activation (gradient) checkpointing: in training, in the cost calibration that prices it, and in what
the plan, the run config, resume and the exports say of it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_train import FAST, TRAIN, VAL, _loaded, make_plan
from tiny import tiny_model

from layercard.card import compute_card
from layercard.config import CardConfig
from layercard.errors import LayercardError
from layercard.models import activation_checkpointing, decoder_layers
from layercard.train import TrainConfig, train
from layercard.train.loop import _checkpointing_notes


def _checkpointed_layers(model: torch.nn.Module) -> list[bool]:
    return [bool(getattr(layer, "gradient_checkpointing", False)) for layer in decoder_layers(model)]


def _saved_bytes(model: torch.nn.Module) -> int:
    """Bytes a training forward of ``model`` keeps for its backward."""
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    ids = torch.randint(0, 90, (2, 32))
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    next(iter(decoder_layers(model)[0].parameters())).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, use_cache=False).logits.sum()
    return saved[0]


def test_the_context_checkpoints_the_decoder_layers_and_restores_the_model():
    model = tiny_model("llama", seed=0)
    plain = _saved_bytes(model)
    with activation_checkpointing(model):
        assert all(_checkpointed_layers(model))
        kept = _saved_bytes(model)
    assert not any(_checkpointed_layers(model))
    assert kept < plain / 2  # each layer keeps its input alone, not its activations
    with activation_checkpointing(model, on=False):
        assert not any(_checkpointed_layers(model))


def test_checkpointing_keeps_backward_from_going_below_the_lowest_adapted_layer():
    """transformers turns on input gradients with checkpointing, which would carry every backward down to
    the embeddings (a placement of the last layers then stepped as slowly as one of every layer)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_model("llama", seed=0), LoraConfig(r=2, target_modules=["layers.3.self_attn.q_proj"])
    )
    ids = torch.randint(0, 90, (2, 16))
    with activation_checkpointing(model):
        assert not model.get_input_embeddings()(ids).requires_grad
        model.train()
        model(input_ids=ids, use_cache=False).logits.float().pow(2).mean().backward()
    trained = [p for n, p in model.named_parameters() if "lora_" in n]
    assert trained and all(p.grad is not None for p in trained)  # the adapted layer still learns


def test_the_context_leaves_checkpointing_on_where_it_was_on_and_refuses_a_model_without_it():
    model = tiny_model("gpt2", seed=0)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before 5.23
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with activation_checkpointing(model):
        pass
    assert all(_checkpointed_layers(model))
    with pytest.raises(LayercardError, match="Linear offers no activation checkpointing"):
        with activation_checkpointing(torch.nn.Linear(2, 2)):
            pass


def test_training_with_checkpointing_trains_the_same_adapter_and_says_so(tmp_path: Path):
    seen: list[list[bool]] = []

    def during(step: int, loss: float, model: torch.nn.Module) -> None:
        seen.append(_checkpointed_layers(model))

    runs = {}
    for on in (False, True):
        loaded = _loaded()
        cfg = TrainConfig(steps=3, gradient_checkpointing=on, **FAST)
        out = tmp_path / f"gc{on}"
        plan = make_plan(loaded, [1, 2])
        runs[on] = train(loaded, plan, TRAIN, VAL, cfg, out, progress=False, callback=during if on else None)
        assert not any(_checkpointed_layers(loaded.model))  # the caller's model is as it was
    assert seen and all(all(s) for s in seen)
    assert runs[True]["config"]["gradient_checkpointing"] is True
    assert runs[False]["config"]["gradient_checkpointing"] is False
    # recomputing the forward in backward changes no gradient: the same curve and adapter
    curves = [[loss for _, loss in runs[on]["loss_curve"]] for on in (False, True)]
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / f"gc{on}" / "adapter" / "adapter_model.safetensors") for on in (False, True))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_resume_refuses_another_checkpointing_setting(tmp_path: Path):
    loaded = _loaded()
    cfg = TrainConfig(steps=4, **{**FAST, "checkpoint_every": 2})
    out = tmp_path / "run"
    first = dataclasses.replace(cfg, steps=2)
    train(loaded, make_plan(loaded, [1, 2]), TRAIN, VAL, first, out, progress=False)
    (out / "train_metrics.json").unlink()
    other = dataclasses.replace(cfg, gradient_checkpointing=True)
    with pytest.raises(LayercardError, match="gradient_checkpointing was False, now True"):
        train(loaded, make_plan(loaded, [1, 2]), TRAIN, VAL, other, out, resume=True, progress=False)


def test_training_otherwise_than_the_calibration_is_said():
    priced = {"calibration_batch_size": 4, "calibration_checkpointing": False}
    assert _checkpointing_notes(priced, False) == []
    (line,) = _checkpointing_notes(priced, True)
    assert "trains with activation checkpointing" in line and "slower steps and a lower peak" in line
    assert "--calibrate-checkpointing" in line
    (line,) = _checkpointing_notes({**priced, "calibration_checkpointing": True}, False)
    assert "calibrated with it" in line and "faster steps and a higher peak" in line
    assert _checkpointing_notes({"calibration_checkpointing": True}, False) == []  # no calibrated costs
    assert _checkpointing_notes({"calibration_batch_size": 4}, True)  # a card made before it: off


def test_the_calibration_trains_with_checkpointing_and_records_it(monkeypatch):
    import layercard.cost as cost

    timed: list[bool] = []
    real = cost._steps_timed

    def spy(peft_model, *args, **kwargs):
        timed.append(all(_checkpointed_layers(peft_model)))
        return real(peft_model, *args, **kwargs)

    monkeypatch.setattr(cost, "_steps_timed", spy)
    loaded = _loaded()
    cfg = CardConfig(
        examples=8, max_length=64, batch_size=4, roles="q,v", calibrate=True, calibrate_steps=1,
        calibrate_checkpointing=True,
    )  # fmt: skip
    card = compute_card(loaded, TRAIN, cfg, progress=False)
    assert card.cost["checkpointing"] is True
    assert timed and all(timed)  # every timed placement stepped with its layers checkpointed
    assert not any(_checkpointed_layers(loaded.model))
    off = dataclasses.replace(cfg, calibrate_checkpointing=False)
    timed.clear()
    plain = compute_card(loaded, TRAIN, off, progress=False)
    assert plain.cost["checkpointing"] is False
    assert timed and not any(timed)

    from layercard.config import PlanConfig
    from layercard.export import export_plan
    from layercard.plan import make_plan as plan_from_card

    for c, on in ((card, True), (plain, False)):
        plan = plan_from_card(c, PlanConfig(policy="top", budget="layers=1", rank=2))
        assert plan.predicted["calibration_checkpointing"] is on
        assert c.cost["dtype"] == plan.predicted["calibration_dtype"] == "float32"
        assert f"gradient_checkpointing={on}," in export_plan(plan, "trl").text


def test_a_card_whose_checkpointing_flag_is_not_a_bool_is_refused(tmp_path: Path):
    from layercard.card import Card

    loaded = _loaded()
    cfg = CardConfig(examples=4, max_length=64, batch_size=4, roles="q,v", calibrate=True, calibrate_steps=1)
    d = compute_card(loaded, TRAIN, cfg, progress=False).to_dict()
    d["cost"]["checkpointing"] = "yes"
    with pytest.raises(LayercardError, match="cost.checkpointing: must be true or false"):
        Card.from_dict(d)


@pytest.mark.parametrize(
    ("card", "calibrated"),
    [({}, True), ({"calibrate_checkpointing": False}, False)],
    ids=["derived", "given"],
)
def test_a_run_calibrates_as_its_training_checkpoints_unless_told(card, calibrated):
    from layercard.pipeline import parse_config

    raw = {
        "task": "synthetic:facts",
        "placements": [{"name": "all", "policy": "all"}],
        "train": {"gradient_checkpointing": True},
    }
    if card:
        raw["card"] = card
    cfg = parse_config(raw)
    assert cfg.train.gradient_checkpointing is True and cfg.card.calibrate_checkpointing is calibrated


def test_a_run_in_another_dtype_than_the_calibration_is_told_so():
    from layercard.train.loop import _dtype_notes

    priced = {"calibration_batch_size": 8, "calibration_dtype": "float32"}
    assert _dtype_notes(priced, "float32", "float32") == []
    (line,) = _dtype_notes(priced, "float32", "bfloat16")  # autocast: computes in the precision
    assert line.startswith("this run computes in bfloat16 and the plan's costs were calibrated in float32")
    assert _dtype_notes(priced, "bfloat16", "float32")  # weights loaded in bfloat16, no autocast
    assert _dtype_notes({**priced, "calibration_dtype": None}, "bfloat16", "float32") == []  # an older card
    assert _dtype_notes({"calibration_dtype": "float32"}, "bfloat16", "float32") == []  # no calibrated costs


def test_a_run_on_another_machine_than_the_calibration_is_told_so(tmp_path: Path):
    """A plan's costs are the card's machine's: a run on another device, processor, CPU count or torch
    thread count is told that its steps and peak are priced for the other, and its metrics keep the line."""
    from layercard.artifacts import machine_info
    from layercard.train.metrics import machine_mismatch

    here = {"processor": "x86_64", "cpu_model": "Xeon A", "cpu_count": 2, "torch_threads": 2}
    priced = {"calibration_batch_size": 4, "calibration_device": "cpu", "calibration_machine": here}
    assert machine_mismatch(priced, "cpu", dict(here)) is None
    line = machine_mismatch(priced, "cpu", {**here, "torch_threads": 1})
    assert "measured on cpu on Xeon A with 2 CPUs, 2 torch threads" in line
    assert "this run trains on cpu on Xeon A with 2 CPUs, 1 torch thread (other torch threads)" in line
    line = machine_mismatch(priced, "cpu", {**here, "cpu_model": "Epyc B", "cpu_count": 16})
    assert "(another processor, other CPUs)" in line
    line = machine_mismatch(priced, "cuda", {**here, "cuda_device": "H100"})
    assert "(another device)" in line
    gpu = {**priced, "calibration_device": "cuda", "calibration_machine": {**here, "cuda_device": "H100"}}
    assert machine_mismatch(gpu, "cuda", {**here, "cpu_count": 16, "cuda_device": "H100"}) is None  # CPUs: no
    assert machine_mismatch(gpu, "cuda", {**here, "cuda_device": "A100"})
    older = {k: v for k, v in here.items() if k != "cpu_model"}  # a card from before the model was kept
    newer = {**here, "cpu_model": "B"}
    assert machine_mismatch({**priced, "calibration_machine": older}, "cpu", newer) is None
    unpriced = {**priced, "calibration_batch_size": None}
    assert machine_mismatch(unpriced, "cuda", here) is None  # nothing priced

    loaded = _loaded()
    plan = make_plan(loaded, [1, 2])
    other = {**machine_info(), "torch_threads": 99}
    plan = dataclasses.replace(plan, predicted={**plan.predicted, **priced, "calibration_machine": other})
    m = train(loaded, plan, TRAIN, VAL, TrainConfig(steps=1, **FAST), tmp_path / "run", progress=False)
    (line,) = m["price_notes"]
    assert "99 torch threads" in line and "(other torch threads)" in line


def test_a_macs_processor_is_named_by_its_model(monkeypatch):
    """Every Apple silicon Mac reports its architecture alike ("arm"): the processor's model comes from
    sysctl there, so that another Mac's costs are told apart."""
    import subprocess

    from layercard import artifacts

    seen = []

    def sysctl(args, **kw):
        seen.append(args)
        return subprocess.CompletedProcess(args, 0, stdout="Apple M3 Pro\n", stderr="")

    artifacts._cpu_model.cache_clear()
    monkeypatch.setattr(artifacts.sys, "platform", "darwin")
    monkeypatch.setattr(artifacts.subprocess, "run", sysctl)
    try:
        assert artifacts._cpu_model() == "Apple M3 Pro"
        assert seen == [["sysctl", "-n", "machdep.cpu.brand_string"]]
    finally:
        artifacts._cpu_model.cache_clear()
