"""layercard beside one's own data and trainer: each data format through card → plan → train on a tiny
model, and a plain ``transformers.Trainer`` measured by :class:`LayercardCallback`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from data_files import write_format
from peft import LoraConfig, get_peft_model
from tiny import tiny_model
from tiny_tok import tiny_tokenizer

from layercard import models
from layercard.card import compute_card
from layercard.config import CardConfig, EvalConfig, PlanConfig, TrainConfig
from layercard.errors import LayercardError
from layercard.evaluate import evaluate
from layercard.integrations import LayercardCallback
from layercard.models import LoadedModel
from layercard.plan import make_plan
from layercard.report import build_report
from layercard.tasks import collate, count_target_tokens, encode_task, load_task
from layercard.train import TrainMetrics, train


def loaded_tiny(seed: int = 0) -> LoadedModel:
    model = tiny_model("llama", seed=seed)
    return LoadedModel(model, tiny_tokenizer(), "tiny", models.weights_hash(model), "memory")


@pytest.mark.parametrize("kind", ["chat", "alpaca", "csv", "saved_dataset"])
def test_each_format_runs_card_plan_train(kind, tmp_path):
    spec = write_format(kind, tmp_path)
    fields = {"input": "question", "target": "answer"} if kind == "csv" else None
    task = load_task(spec, field_map=fields, prompt="Task: {input}")
    loaded = loaded_tiny()
    cfg = CardConfig(examples=8, max_length=64, batch_size=4, roles="q,v", calibrate=False)
    card = compute_card(loaded, task, cfg, progress=False)
    assert card.task["data_hash"] == task.data_hash and math.isfinite(card.loss)
    plan = make_plan(card, PlanConfig(policy="top", budget="layers=2", rank=4))
    train_cfg = TrainConfig(steps=2, batch_size=4, max_length=64, eval_examples=0, checkpoint_every=0)
    metrics = train(loaded, plan, task, None, train_cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert metrics["steps"] == 2 and all(math.isfinite(loss) for _, loss in metrics["loss_curve"])
    assert metrics["task"]["prompt"]["template"] == "Task: {input}"
    if kind == "chat":  # both assistant turns of every conversation carry loss
        enc = encode_task(loaded.tokenizer, task, max_length=64)[0]
        assert loaded.tokenizer.decode([t for t in enc.labels if t != -100]) == "hello 0<eos>then 1<eos>"


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """Card and plan from layercard, training by a plain Trainer with the callback, in a run folder.

    Built with the one thread its tests train with (conftest's ``_threads``), or its calibrated card's
    machine would differ from theirs and every run would add a note saying so: a module fixture is set
    up before the function fixture that sets the thread count, whatever the tests before left it at.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _trainer_run(tmp_path_factory)
    finally:
        torch.set_num_threads(before)


def _trainer_run(tmp_path_factory):
    from transformers import Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("own")
    spec = write_format("alpaca", root)
    task = load_task(spec)
    loaded = loaded_tiny()
    cfg = CardConfig(examples=8, max_length=64, batch_size=4, roles="q,v", calibrate=True, calibrate_steps=1)
    card = compute_card(loaded, task, cfg, progress=False)
    plan = make_plan(card, PlanConfig(policy="top", budget="layers=2", rank=4))
    run = root / "run"
    card.save(run / "card" / "card.json")
    plan.save(run / "plan" / "mine" / "plan.json")
    encoded = encode_task(loaded.tokenizer, task, max_length=64)
    args = TrainingArguments(
        str(root / "trainer"), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0,
    )  # fmt: skip
    callback = LayercardCallback(run / "plan" / "mine" / "plan.json", run / "train" / "mine", task=task)
    trainer = Trainer(
        model=get_peft_model(loaded.model, plan.peft_config()),
        args=args,
        train_dataset=encoded,
        data_collator=lambda rows: collate(rows, loaded.tokenizer.pad_token_id),
        callbacks=[callback],
    )
    trainer.train()
    # layercard's evaluation of the trained model completes the run folder the report reads
    ev = EvalConfig(examples=4, batch_size=4, max_new_tokens=4)
    evaluate(loaded, task, ev, model=trainer.model, progress=False).save(run / "eval" / "mine")
    return {
        "run": run, "plan": plan, "trainer": trainer, "encoded": encoded, "task": task, "callback": callback,
        "pad_id": loaded.tokenizer.pad_token_id,
    }  # fmt: skip


def test_callback_writes_train_metrics_layercard_reads(trainer_run):
    m = TrainMetrics.load(trainer_run["run"] / "train" / "mine")
    plan, encoded = trainer_run["plan"], trainer_run["encoded"]
    logged = [[h["step"], h["loss"]] for h in trainer_run["trainer"].state.log_history if "loss" in h]
    assert m.steps == 3 and len(m.loss_curve) == 3
    assert [s for s, _ in m.loss_curve] == [1, 2, 3]
    assert [loss for _, loss in m.loss_curve] == pytest.approx([loss for _, loss in logged], rel=1e-3)
    assert m.first_train_loss == m.loss_curve[0][1] and m.final_train_loss == m.loss_curve[-1][1]
    # every example has the same length: 3 steps × 4 examples of it
    assert {len(e) for e in encoded} == {len(encoded[0])}
    assert m.tokens_seen == 3 * 4 * len(encoded[0]) and m.batch_tokens_per_step == 4 * len(encoded[0])
    assert m.target_tokens_seen == 3 * 4 * count_target_tokens(encoded[:1])
    assert m.s_per_step is not None and m.s_per_step > 0 and m.tokens_per_s > 0
    assert m.predicted_step_time_s == plan.predicted["step_time_s"] > 0
    assert m.step_time_ratio == pytest.approx(m.s_per_step / m.predicted_step_time_s)
    # scaled by padded positions per step (no padding here: every example has the same length)
    assert m.batch_positions_per_step == 4 * len(encoded[0]) == m.batch_tokens_per_step
    assert m.max_batch_positions == 4 * len(encoded[0])  # the largest micro-batch, for peak memory
    assert m.predicted_step_time_scaled_s == pytest.approx(
        m.predicted_step_time_s * m.batch_positions_per_step / plan.predicted["calibration_batch_positions"]
    )
    assert m.peak_memory_kind == "process_peak_rss" and m.peak_memory_mib > 0 and m.device == "cpu"
    # the card measured memory, so the plan predicted it and the run compares
    memory = plan.predicted["memory"]
    assert memory["peak_mib"] >= memory["resident_mib"] > 0
    assert m.predicted_peak_memory_mib == memory["peak_mib"]
    if m.peak_memory_start_mib is not None:  # a per-run window (Linux /proc): what training added
        assert m.peak_memory_mib >= m.peak_memory_start_mib
        added = m.predicted_peak_memory_scaled_mib - memory["resident_mib"]
        assert m.training_memory_ratio == pytest.approx((m.peak_memory_mib - m.peak_memory_start_mib) / added)
        assert m.predicted_peak_memory_at_start_mib == pytest.approx(m.peak_memory_start_mib + added)
    assert m.plan["layers"] == plan.layers and m.plan["units"] == [u.key for u in plan.units]
    assert m.trainable_params == plan.predicted["params"]
    assert m.task["data_hash"] == trainer_run["task"].data_hash == m.provenance["data_hash"]
    assert m.config["lr"] == 1e-2 and m.batch_size == 4 and m.resumed_from is None


def test_the_report_shows_the_trainer_run_against_the_plan(trainer_run):
    paths = build_report(trainer_run["run"])
    md = Path(paths["markdown"]).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| mine | 3 |"))
    m = TrainMetrics.load(trainer_run["run"] / "train" / "mine")
    assert f"{m.s_per_step:.3f}" in row


def test_callback_refuses_a_file_as_its_folder(trainer_run, tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(LayercardError, match="exists and is a file"):
        LayercardCallback(trainer_run["plan"], tmp_path / "f")


def test_only_training_forwards_are_counted(trainer_run):
    callback = LayercardCallback(trainer_run["plan"], "unused")
    model = torch.nn.Linear(2, 2)
    model.eval()
    callback._count(model, (), {"attention_mask": torch.ones(2, 3), "labels": torch.ones(2, 3)})
    model.train()
    callback._count(model, (), {"attention_mask": torch.ones(2, 3), "labels": torch.ones(2, 3)})
    assert (callback._step_tokens, callback.targets) == (6, 4)


def test_the_callback_reads_the_trainers_device_not_the_models(trainer_run, monkeypatch):
    # Under FSDP or DeepSpeed the Trainer places the model after on_train_begin: its parameters are still
    # on the CPU then, while the run computes on args.device.
    import types

    import layercard.integrations as integrations

    seen = []
    monkeypatch.setattr(integrations, "reset_peak_memory", lambda device: seen.append(device) or 0.0)
    callback = LayercardCallback(trainer_run["plan"], "unused")
    state = types.SimpleNamespace(global_step=0)
    model = get_peft_model(tiny_model("llama"), trainer_run["plan"].peft_config())
    callback.on_train_begin(types.SimpleNamespace(device="meta"), state, None, model=model)
    assert callback._device == torch.device("meta") and seen == [torch.device("meta")]
    callback._remove_hooks()


# ---- a Trainer run of one's own, measured: divergence, the model, resume, repeated runs -----------------


def own_trainer(trainer_run, folder: Path, callbacks: list, **settings):
    """A Trainer of a fresh tiny model with the plan's LoRA on the run's examples, 4 a step."""
    from transformers import Trainer, TrainingArguments

    args = dict(
        output_dir=str(folder), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    pad = trainer_run["pad_id"]
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in ("activation_checkpointing", "activation_checkpointing_kwargs"):
        if key in settings and key not in fields:  # transformers before 5.23 names it gradient_…
            settings[key.replace("activation", "gradient")] = settings.pop(key)
    return Trainer(
        model=get_peft_model(tiny_model("llama", seed=0), trainer_run["plan"].peft_config()),
        args=TrainingArguments(**{**args, **settings}),
        train_dataset=trainer_run["encoded"],
        data_collator=lambda rows: collate(rows, pad),
        callbacks=callbacks,
    )


def poison_at(step: int):
    """A callback that makes one LoRA weight NaN at the end of ``step``."""
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == step:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    return Poison()


def said_lines(monkeypatch) -> list[str]:
    import layercard.integrations as integrations

    lines: list[str] = []
    monkeypatch.setattr(integrations, "say", lambda text, **kw: lines.append(text))
    return lines


@pytest.mark.parametrize("nan_filter", [True, False])
def test_weights_turned_non_finite_stop_the_run_and_nothing_is_written(trainer_run, tmp_path, nan_filter):
    # The weights go NaN at step 2 (the poison runs before the callback): with the Trainer's default
    # logging_nan_inf_filter the later losses would be logged as stand-ins, never as NaN.
    callback = LayercardCallback(trainer_run["plan"], tmp_path / "m")
    trainer = own_trainer(
        trainer_run, tmp_path / "t", [poison_at(2), callback], max_steps=6, save_strategy="steps",
        save_steps=2, logging_nan_inf_filter=nan_filter,
    )  # fmt: skip
    with pytest.raises(LayercardError, match=r"step 2 of 6: the update of the trainable parameters is NaN"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert not (tmp_path / "m" / "train_metrics.json").exists()
    assert not (tmp_path / "t" / "checkpoint-2").exists()  # no checkpoint holds the diverged weights
    assert not callback._hooks


@pytest.mark.parametrize("nan_filter", [True, False])
def test_a_non_finite_loss_stops_the_run_at_its_step(trainer_run, tmp_path, nan_filter):
    # The poison runs after the callback's check at step 2: step 3's loss is the first non-finite value.
    callback = LayercardCallback(trainer_run["plan"], tmp_path / "m")
    trainer = own_trainer(
        trainer_run, tmp_path / "t", [callback, poison_at(2)], max_steps=6, logging_nan_inf_filter=nan_filter
    )
    with pytest.raises(LayercardError, match=r"step 3 of 6: the training loss is NaN or infinite; training"):
        trainer.train()
    assert trainer.state.global_step == 3 and not (tmp_path / "m" / "train_metrics.json").exists()


def test_a_non_finite_logged_value_stops_the_run(trainer_run, tmp_path):
    # a loss the model does not return (the Trainer's own compute_loss) is seen only in the logs
    import types

    from transformers import TrainerControl

    callback = LayercardCallback(trainer_run["plan"], tmp_path / "m")
    args, state = (
        types.SimpleNamespace(learning_rate=1e-3),
        types.SimpleNamespace(global_step=4, max_steps=10),
    )
    control = TrainerControl(should_save=True)
    callback.on_log(args, state, control, logs={"eval_loss": float("inf")})
    assert control.should_training_stop and not control.should_save
    with pytest.raises(LayercardError, match=r"step 4 of 10: the validation loss \(eval_loss\) is inf"):
        callback.on_train_end(args, state, control)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda lc: tiny_model("llama"), "the model has no LoRA modules .* the plan places 4 modules"),
        (
            lambda lc: LoraConfig(**{**lc, "r": 8}),
            r"\(4 adapted, 4 planned\): .* has LoRA rank 8, the plan says 4",
        ),
        (
            lambda lc: LoraConfig(**{**lc, "target_modules": lc["target_modules"][1:]}),
            r"\(3 adapted, 4 planned\): model\.layers\.\d\.self_attn\.q_proj \(rank 4\) is planned but not",
        ),
        (
            lambda lc: get_peft_model(tiny_model("gpt2"), LoraConfig(r=4, target_modules=["c_attn"])),
            r"transformer\.h\.0\.attn\.c_attn \(rank 4\) is adapted but not planned, and 3 more",
        ),
        (
            lambda lc: LoraConfig(**{**lc, "modules_to_save": ["lm_head"]}),
            r"the model trains [\d,]+ parameters outside its LoRA modules \(.*lm_head.*\), which the plan",
        ),
    ],
    ids=["full-fine-tune", "other-rank", "fewer-modules", "other-model", "modules-to-save"],
)
def test_the_callback_refuses_a_model_that_is_not_the_plans(trainer_run, build, message):
    import types

    plan = trainer_run["plan"]
    model = build(dict(plan.lora_config))
    if isinstance(model, LoraConfig):
        model = get_peft_model(tiny_model("llama"), model)
    callback = LayercardCallback(plan, "unused")
    with pytest.raises(LayercardError, match=message):
        callback.on_train_begin(
            types.SimpleNamespace(device="cpu"), types.SimpleNamespace(global_step=0), None, model
        )
    assert not callback._hooks


def test_eva_may_move_the_plans_ranks(trainer_run):
    # PEFT's EVA init redistributes the planned ranks: what it trains is still the plan's placement
    import types

    from peft import EvaConfig

    plan = trainer_run["plan"]
    lc = {**plan.lora_config, "init_lora_weights": "eva", "eva_config": EvaConfig()}
    lc["rank_pattern"] = {plan.units[0].name: 2, plan.units[1].name: 6}
    callback = LayercardCallback(plan, "unused")
    model = get_peft_model(tiny_model("llama"), LoraConfig(**lc))
    callback.on_train_begin(
        types.SimpleNamespace(device="cpu"), types.SimpleNamespace(global_step=0), None, model
    )
    callback._remove_hooks()


def test_gradient_checkpointing_is_recorded_and_said_to_be_unpriced(trainer_run, tmp_path, monkeypatch):
    said = said_lines(monkeypatch)
    plan = trainer_run["plan"]
    trainer = own_trainer(
        trainer_run, tmp_path / "t", [LayercardCallback(plan, tmp_path / "gc")], max_steps=2,
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
    )  # fmt: skip
    trainer.train()
    metrics = TrainMetrics.load(tmp_path / "gc")
    assert metrics.config["gradient_checkpointing"] is True
    mismatch = "trains with activation checkpointing, and the plan's costs were calibrated without it"
    assert sum(mismatch in line for line in said) == 1
    assert [mismatch in line for line in metrics.price_notes] == [True]  # the report says it too
    said.clear()
    own_trainer(
        trainer_run, tmp_path / "u", [LayercardCallback(plan, tmp_path / "plain")], max_steps=1
    ).train()
    assert TrainMetrics.load(tmp_path / "plain").config["gradient_checkpointing"] is False
    assert not any("activation checkpointing" in line for line in said)
    assert TrainMetrics.load(tmp_path / "plain").price_notes == []


def test_a_trainer_on_another_machine_than_the_calibration_is_said(trainer_run, tmp_path, monkeypatch):
    """A Trainer run is told, as layercard train is, when the plan's costs were measured on another
    machine (here: other torch threads), and its metrics keep the line."""
    from layercard.artifacts import machine_info

    said = said_lines(monkeypatch)
    plan = trainer_run["plan"]
    if plan.predicted.get("calibration_batch_size") is None:
        pytest.skip("the plan has no calibrated costs")
    other = {**machine_info(), "torch_threads": 99}
    plan = dataclasses.replace(plan, predicted={**plan.predicted, "calibration_machine": other})
    own_trainer(trainer_run, tmp_path / "t", [LayercardCallback(plan, tmp_path / "m")], max_steps=1).train()
    (line,) = TrainMetrics.load(tmp_path / "m").price_notes
    assert "99 torch threads" in line and "(other torch threads)" in line
    assert sum("(other torch threads)" in s for s in said) == 1


def test_a_trainer_whose_checkpointing_carries_backward_to_the_embeddings_is_said(
    trainer_run, tmp_path, monkeypatch
):
    """The plan's calibration checkpointed with no gradients at the embeddings' output; the Trainer's own
    checkpointing turns them on, and every backward then runs down to the embeddings."""
    said = said_lines(monkeypatch)
    plan = dataclasses.replace(
        trainer_run["plan"], predicted={**trainer_run["plan"].predicted, "calibration_checkpointing": True}
    )
    trainer = own_trainer(
        trainer_run, tmp_path / "t", [LayercardCallback(plan, tmp_path / "gc")], max_steps=1,
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
    )  # fmt: skip
    trainer.train()
    assert sum("keeps gradients at its embeddings' output" in line for line in said) == 1
    assert not any("trains with" in line for line in said)  # the setting is the plan's


@pytest.mark.parametrize("trainer_counts", [True, False], ids=["trainer-counts-tokens", "hook-counts-tokens"])
def test_a_resumed_run_records_the_whole_runs_curve(trainer_run, tmp_path, monkeypatch, trainer_counts):
    said = said_lines(monkeypatch)
    plan, per_step = trainer_run["plan"], 4 * len(trainer_run["encoded"][0])
    counting = {"include_num_input_tokens_seen": "non_padding"} if trainer_counts else {}
    first = LayercardCallback(plan, tmp_path / "first")
    own_trainer(trainer_run, tmp_path / "t", [first], save_strategy="steps", save_steps=2, **counting).train()
    whole = TrainMetrics.load(tmp_path / "first")
    resumed = own_trainer(trainer_run, tmp_path / "t", [LayercardCallback(plan, tmp_path / "m")], **counting)
    resumed.train(resume_from_checkpoint=str(tmp_path / "t" / "checkpoint-2"))
    m = TrainMetrics.load(tmp_path / "m")
    assert m.steps == 4 and m.resumed_from == 2
    assert [s for s, _ in m.loss_curve] == [1, 2, 3, 4] and m.loss_curve[:2] == whole.loss_curve[:2]
    assert m.first_train_loss == whole.first_train_loss and m.final_train_loss == m.loss_curve[-1][1]
    assert m.batch_tokens_per_step == per_step
    if trainer_counts:  # the Trainer's count, which the checkpoint carried
        assert m.tokens_seen == 4 * per_step == resumed.state.num_input_tokens_seen
        assert any("resumed at step 2: target_tokens_seen counts only this session" in line for line in said)
    else:  # the hook saw this session's steps only, and says so
        assert m.tokens_seen == 2 * per_step
        assert any(
            "tokens_seen and target_tokens_seen count only this session's steps" in line for line in said
        )


def test_training_twice_records_the_second_run_alone(trainer_run, tmp_path):
    callback = LayercardCallback(trainer_run["plan"], tmp_path / "m")
    trainer = own_trainer(trainer_run, tmp_path / "t", [callback], max_steps=2)
    trainer.train()
    trainer.args.max_steps = 3
    trainer.train()
    m = TrainMetrics.load(tmp_path / "m")
    assert m.steps == 3 and [s for s, _ in m.loss_curve] == [1, 2, 3] and len(callback.step_times) == 3
    assert m.tokens_seen == 3 * 4 * len(trainer_run["encoded"][0])


def test_a_run_that_raised_leaves_no_second_counter(trainer_run, tmp_path):
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    callback, boom = LayercardCallback(trainer_run["plan"], tmp_path / "m"), Boom()
    trainer = own_trainer(trainer_run, tmp_path / "t", [callback, boom], max_steps=2)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    trainer.callback_handler.remove_callback(boom)
    trainer.train()
    assert TrainMetrics.load(tmp_path / "m").tokens_seen == 2 * 4 * len(trainer_run["encoded"][0])
    assert not trainer.model._forward_pre_hooks and not trainer.model._forward_hooks


def test_loss_logged_every_other_step_and_warmup_as_a_share(trainer_run, tmp_path):
    callback = LayercardCallback(trainer_run["plan"], tmp_path / "m")
    trainer = own_trainer(trainer_run, tmp_path / "t", [callback], logging_steps=2, warmup_steps=0.5)
    trainer.train()
    m = TrainMetrics.load(tmp_path / "m")
    assert [s for s, _ in m.loss_curve] == [2, 4]
    assert m.first_train_loss is None  # step 2's entry is the mean over steps 1 and 2, not step 1's loss
    assert m.final_train_loss == m.loss_curve[-1][1]
    assert m.config["warmup_steps"] == 2 == trainer.args.get_warmup_steps(4)  # half of the 4 steps
    assert m.config["gradient_checkpointing"] is False


def test_a_run_that_logged_no_loss_says_so(trainer_run, tmp_path, monkeypatch):
    said = said_lines(monkeypatch)
    callback = LayercardCallback(trainer_run["plan"], tmp_path / "m")
    own_trainer(trainer_run, tmp_path / "t", [callback], max_steps=2, logging_steps=500).train()
    m = TrainMetrics.load(tmp_path / "m")
    assert m.loss_curve == [] and m.first_train_loss is None and m.final_train_loss is None
    assert any("logged no training loss in 2 steps (logging_steps 500)" in line for line in said)


def test_batch_size_is_per_process_as_layercard_train_records_it(trainer_run):
    trainer, callback = trainer_run["trainer"], trainer_run["callback"]

    class TwoProcesses:  # the fixture's arguments, as a launch of two processes would see them
        world_size = 2

        def __getattr__(self, name):
            return getattr(trainer.args, name)

    m = callback.metrics(TwoProcesses(), trainer.state, trainer.model)
    assert m.batch_size == 4 and m.world_size == 2
