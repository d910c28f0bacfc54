"""trim: logit lens, layer masking, boundary choice, trimmed export (PEFT and bottleneck) and the CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings

import pytest
import torch
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from typer.testing import CliRunner

from layercard import trim as T
from layercard.adapters import add_adapters, attached_adapters, load_adapter, save_adapters
from layercard.cli import app
from layercard.errors import LayercardError
from layercard.models import LoadedModel, load_model
from layercard.tasks import load_task
from layercard.trim import lens as trim_lens
from layercard.trim import run as trim_run

LAYERS = 4
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])


def _lora_config(**kw):
    from peft import LoraConfig

    # init_lora_weights=False: B is random, so every LoRA module changes the outputs
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)


def _peft(family: str = "llama", **kw):
    from peft import get_peft_model

    if family == "gemma3":  # soft-capped logits: the lens must cap them too
        extra = {"final_logit_softcapping": 0.3}  # tiny logits are ~0.4: a cap this low bites
    else:
        extra = {}
    if family == "gpt2":  # fused attention, Conv1D
        kw.setdefault("target_modules", ["c_attn"])
        kw.setdefault("fan_in_fan_out", True)
    model = get_peft_model(tiny_model(family, layers=LAYERS, **extra), _lora_config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)  # well beyond float noise
    return model.eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora") / "adapter"
    _peft().save_pretrained(d)
    return d


@pytest.fixture()
def capture_load(caplog):
    """Every warning and log record emitted while loading, to prove a load was silent."""

    def run(fn):
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            out = fn()
        messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
        return out, [m for m in messages if "key" in m.lower()]

    return run


# ---------------------------------------------------------------- logit lens


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_lens_last_layer_is_the_model_output(family):
    model = _peft(family)
    lens = T.lens_logits(model, IDS)
    assert lens.shape[:3] == (LAYERS, *IDS.shape)
    own = _logits(model).float()
    assert torch.allclose(lens[-1].softmax(-1), own.softmax(-1), atol=1e-6)
    assert not torch.allclose(lens[0], own, atol=1e-3)  # an earlier layer is really another read-out

    tok = tiny_tokenizer()
    task = load_task("synthetic:facts", split="test").subset(3)
    tr = T.trace(model, tok, task, task.examples, batch_size=2, max_length=64)
    assert len(tr.curve_on) == len(tr.curve_off) == LAYERS and tr.n_examples == 3
    assert tr.curve_on[-1] == pytest.approx(tr.model_prob, rel=1e-6)
    assert tr.curve_on != tr.curve_off  # the adapter changes the lens
    assert all(0.0 < p < 1.0 for p in (*tr.curve_on, *tr.curve_off))
    assert tr.adapted_layers == tuple(range(LAYERS))
    assert tr.candidates == T.boundary_candidates(tr.curve_on)


def test_trace_off_curve_is_the_base_model():
    base = tiny_model("llama", layers=LAYERS)
    tok = tiny_tokenizer()
    task = load_task("synthetic:facts", split="test").subset(2)
    with add_adapters(base, "houlsby", [1, 2], bottleneck=4) as aset:
        with torch.no_grad():
            for name, p in aset.named_parameters():
                if ".up." in name:
                    p.normal_(0.0, 0.5)
        tr = T.trace(base, tok, task, task.examples, batch_size=2, max_length=64)
        assert aset.enabled and aset.enabled_layers == (1, 2)  # restored after the off pass
    plain = tiny_model("llama", layers=LAYERS)
    with torch.no_grad():
        ref_probs, _ = trim_lens._gold_probs(plain, _batch(tok, task))
    assert list(tr.curve_off) == pytest.approx(ref_probs.mean(1).tolist(), rel=1e-6)
    assert tr.adapted_layers == (1, 2) and tr.curve_on[0] == pytest.approx(tr.curve_off[0], rel=1e-6)


def _batch(tok, task):
    from layercard.tasks import collate, encode_task

    return collate(encode_task(tok, task, max_length=64), tok.pad_token_id)


def test_boundary_candidates_hand_made():
    # sharpest rise from layer 2 to 3; half of the final 0.8 first reached at layer 3
    assert T.boundary_candidates([0.0, 0.05, 0.1, 0.5, 0.7, 0.8]) == {"sharpest_rise": 3, "half_final": 3}
    # a smooth early climb: half reached before the sharpest step
    assert T.boundary_candidates([0.1, 0.45, 0.5, 0.52, 0.9, 0.9]) == {"sharpest_rise": 4, "half_final": 1}
    # already above half at layer 0; ties in the rise go to the first layer
    assert T.boundary_candidates([0.6, 0.7, 0.8]) == {"sharpest_rise": 1, "half_final": 0}
    assert T.boundary_candidates([0.3]) == {"sharpest_rise": 0, "half_final": 0}
    # no layer raises P (falling, or flat): no rise is named
    assert T.boundary_candidates([0.2, 0.1, 0.0]) == {"half_final": 0}
    assert T.boundary_candidates([0.4, 0.4, 0.4]) == {"half_final": 0}
    with pytest.raises(LayercardError, match="empty"):
        T.boundary_candidates([])
    with pytest.raises(LayercardError, match="non-finite"):
        T.boundary_candidates([0.1, math.nan])


# ---------------------------------------------------------------- masking


def test_masking_every_layer_gives_the_base_model():
    from peft import get_peft_model

    model = tiny_model("llama", layers=LAYERS)
    base = _logits(model)
    peft_model = get_peft_model(model, _lora_config()).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    adapted = _logits(peft_model)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with T.masked_layers(peft_model, -1) as kept:
        assert kept == ()
        assert torch.equal(_logits(peft_model), base)
    with T.adapters_off(peft_model):
        assert torch.equal(_logits(peft_model), base)
    assert torch.equal(_logits(peft_model), adapted)  # everything restored
    with T.masked_layers(peft_model, LAYERS - 1) as kept:
        assert kept == tuple(range(LAYERS)) and torch.equal(_logits(peft_model), adapted)
    with T.masked_layers(peft_model, 1) as kept:
        assert kept == (0, 1)
        assert not torch.equal(_logits(peft_model), adapted) and not torch.equal(_logits(peft_model), base)
    assert len(T.adapted_modules(peft_model)) == 2 * LAYERS and len(T.adapted_modules(peft_model, 1)) == 4
    for bad in (LAYERS, -2, 1.5):
        with pytest.raises(LayercardError, match="keep_upto"):
            with T.masked_layers(peft_model, bad):
                pass
    with pytest.raises(LayercardError, match="no adapters"):
        with T.masked_layers(tiny_model("llama", layers=LAYERS), 1):
            pass


def test_masking_bottleneck_adapters():
    model = tiny_model("llama", layers=LAYERS)
    base = _logits(model)
    aset = add_adapters(model, "parallel", [0, 2, 3], bottleneck=4)
    with torch.no_grad():
        for name, p in aset.named_parameters():
            if ".up." in name:
                p.normal_(0.0, 0.5)
    adapted = _logits(model)
    with T.masked_layers(model, -1):
        assert torch.equal(_logits(model), base)
    with T.masked_layers(model, 2) as kept:
        assert kept == (0, 2) and aset.enabled_layers == (0, 2)
    assert aset.enabled_layers == (0, 2, 3) and torch.equal(_logits(model), adapted)
    assert T.adapted_layers(model) == (0, 2, 3) and len(T.adapted_modules(model, 2)) == 4
    aset.remove()


# ---------------------------------------------------------------- export


def test_trimmed_lora_equals_masked_and_loads_cleanly(tmp_path, capture_load):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    # patterns and a sparse layers_to_transform, so the config rewrite is exercised
    model = _peft(
        layers_to_transform=[0, 1, 3],
        rank_pattern={"model.layers.3.self_attn.q_proj": 2, "v_proj": 6},
        alpha_pattern={"layers.3.self_attn.v_proj": 3, "q_proj": 5},
    )
    src = tmp_path / "adapter"
    model.save_pretrained(src)
    assert T.adapted_layers(model) == (0, 1, 3)
    with T.masked_layers(model, 2) as kept:
        assert kept == (0, 1)
        masked = _logits(model)

    # companions carried over: a plain file and a link within the adapter, not a link out of it
    secret = tmp_path / "elsewhere" / "id_key"
    secret.parent.mkdir()
    secret.write_text("private")
    (src / "notes.md").write_text("notes")
    (src / "key.txt").symlink_to(secret)
    (src / "same.md").symlink_to(src / "notes.md")
    out = T.export_trimmed(src, tmp_path / "trimmed", 2, model)
    assert (out / "notes.md").read_text() == (out / "same.md").read_text() == "notes"
    assert not (out / "key.txt").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv"]
    assert cfg["layers_to_transform"] is None
    assert cfg["rank_pattern"] == {"v_proj": 6} and cfg["alpha_pattern"] == {"q_proj": 5}
    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert keys and all(".layers.3." not in k for k in keys)

    loaded, messages = capture_load(
        lambda: PeftModel.from_pretrained(tiny_model("llama", layers=LAYERS), out)
    )
    assert messages == []
    assert set(get_peft_model_state_dict(loaded)) == keys  # nothing missing, nothing unexpected
    assert torch.equal(_logits(loaded.eval()), masked)
    assert loaded.base_model.model.model.layers[0].self_attn.v_proj.lora_A["default"].weight.shape[0] == 6

    # control: the same weights under the original config do warn, so the capture above can see it
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes((out / "adapter_model.safetensors").read_bytes())
    _, messages = capture_load(lambda: PeftModel.from_pretrained(tiny_model("llama", layers=LAYERS), bad))
    assert any("missing adapter keys" in m for m in messages)

    with pytest.raises(LayercardError, match="keep_upto"):
        T.export_trimmed(src, tmp_path / "none", -1, model)
    assert not (tmp_path / "none").exists()
    with pytest.raises(LayercardError, match=rf"keep_upto={LAYERS}: the model has layers 0\.\.{LAYERS - 1}"):
        T.export_trimmed(src, tmp_path / "past", LAYERS, model)
    assert not (tmp_path / "past").exists()


def test_trimmed_bottleneck_equals_masked(tmp_path):
    model = tiny_model("llama", layers=LAYERS)
    aset = add_adapters(model, "houlsby", [1, 2, 3], bottleneck=4)
    with torch.no_grad():
        for name, p in aset.named_parameters():
            if ".up." in name:
                p.normal_(0.0, 0.5)
    save_adapters(aset, tmp_path / "adapter", base_model_hash="0" * 64)
    with T.masked_layers(model, 2):
        masked = _logits(model)
    aset.remove()
    out = T.export_trimmed(tmp_path / "adapter", tmp_path / "trimmed", 2, model)
    assert json.loads((out / "layercard_adapter.json").read_text())["layers"] == [1, 2]
    fresh = tiny_model("llama", layers=LAYERS)
    load_adapter(fresh, out)
    assert attached_adapters(fresh).layers == (1, 2)
    assert torch.equal(_logits(fresh), masked)
    with pytest.raises(LayercardError, match="no adapter layer"):
        T.export_trimmed(tmp_path / "adapter", tmp_path / "t0", 0, model)
    assert not (tmp_path / "t0").exists()


# ---------------------------------------------------------------- sweep and choice


def test_sweep_picks_best_with_ties_to_fewer_layers():
    model = _peft()
    peak = {0: 0.1, 1: 0.5, 2: 0.9, 3: 0.9}
    seen = []

    def fake(m, k):
        seen.append((k, T.adapted_layers(m), len(T.adapted_modules(m))))
        return {"metrics": {"exact_match": peak[k]}, "loss": 1.0 - peak[k] + 0.01 * k}

    rows = T.sweep(model, [0, 1, 2, 3], fake)
    assert [r["k"] for r in rows] == [0, 1, 2, 3]
    assert [r["adapted_layers"] for r in rows] == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]
    assert [r["adapted_modules"] for r in rows] == [2, 4, 6, 8]
    assert T.choose_boundary(rows, "exact_match") == 2
    assert T.choose_boundary(rows, "loss", higher_is_better=False) == 2
    # a tolerance makes "within 0.45 of the best" a tie: the fewest layers among 1, 2, 3 win
    assert T.choose_boundary(rows, "exact_match", tolerance=0.45) == 1
    # a metric that tells the boundaries apart, and one that does not (the tie rule alone chooses then)
    assert not T.metric_is_flat(rows, "exact_match") and T.metric_is_flat(rows, "exact_match", tolerance=0.9)
    flat = [{**r, "metrics": {"exact_match": 0.0}} for r in rows]
    assert T.metric_is_flat(flat, "exact_match") and not T.metric_is_flat(flat[:1], "exact_match")
    # a flat metric leaves the choice to the loss (lowest at K=2); the tie rule alone would keep one layer
    assert T.choose_boundary(flat, "exact_match") == 0
    assert T.boundary_choice(rows, "exact_match") == (2, "exact_match")
    assert T.boundary_choice(flat, "exact_match") == (2, "loss")
    assert T.boundary_choice(rows, "loss", higher_is_better=False) == (2, "loss")
    assert T.boundary_choice(rows, "exact_match", tolerance=0.9) == (2, "loss")  # flat within the tolerance
    same_loss = [{**r, "loss": 0.5} for r in flat]  # loss ties too: fewer layers
    assert T.boundary_choice(same_loss, "exact_match") == (0, "loss")
    no_loss = [{**r, "loss": None} if r["k"] == 3 else r for r in flat]  # a row without a loss: the tie rule
    assert T.boundary_choice(no_loss, "exact_match") == (0, "exact_match")
    # a NaN never wins, a lower-is-better read flips the choice
    rows[3]["metrics"]["exact_match"] = float("nan")
    rows[2]["metrics"]["exact_match"] = 0.2
    assert T.choose_boundary(rows, "exact_match") == 1
    assert T.choose_boundary(rows, "exact_match", higher_is_better=False) == 0
    with pytest.raises(LayercardError, match="no row"):
        T.choose_boundary(rows, "rouge_l")


def test_capped_text_names_the_boundaries_whose_generations_were_stopped():
    rows = [{"k": 1, "capped": 0}, {"k": 2, "capped": 3}, {"k": 3, "capped": 1}, {"k": 4}]
    assert T.capped_text(rows, 8, 64) == (
        "at K = 2, 3, up to 3 of 8 generations reached max_new_tokens 64 before an end token and were scored "
        "as cut there (raise --max-new-tokens to let them finish)"
    )
    assert T.capped_text(rows[:1] + rows[3:], 8, 64) is None


def test_candidate_ks_window_and_canonical_boundaries():
    # adapters on 1, 4, 5, 9 of 12 layers; candidates 4 and 9 with radius 1
    ks = T.candidate_ks(12, [1, 4, 5, 9], candidates=[4, 9], radius=1)
    assert ks == [1, 4, 5, 9]  # 3 -> 1, 8 -> 5, 10 and 11 -> 9 (no trimming)
    assert T.candidate_ks(12, [1, 4, 5, 9], all_layers=True) == [1, 4, 5, 9]
    assert T.candidate_ks(12, [3, 4], window=(0, 3)) == [3, 4]  # 0..2 keep no adapter: dropped
    with pytest.raises(LayercardError, match="^--window 2:12: the model has layers 0..11"):
        T.candidate_ks(12, [3], window=(2, 12))
    from layercard.errors import run_section

    with run_section("trim"), pytest.raises(LayercardError, match="^trim.window 2:12"):  # in a run
        T.candidate_ks(12, [3], window=(2, 12))
    with pytest.raises(
        LayercardError, match="^--window 0:1: lies below every adapted layer .the lowest is 3."
    ):
        T.candidate_ks(12, [3, 4], window=(0, 1))  # it had swept "no trimming" alone, without a word


def test_configs_validate_and_name_the_field():
    assert T.TrimConfig(window=[2, 5]).window == (2, 5)
    for kw, field in [
        ({"examples": 0}, "examples"),
        ({"batch_size": True}, "batch_size"),
        ({"metric": "bogus"}, "metric"),
        ({"window": (5, 2)}, "window"),
        ({"window": (1, 2), "all_layers": True}, "all_layers"),
        ({"tie_tolerance": -1.0}, "tie_tolerance"),
        ({"radius": -1}, "radius"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"latency_repeats": 0}, "latency_repeats"),
    ]:
        with pytest.raises(LayercardError, match=field):
            T.TrimConfig(**kw)
    with pytest.raises(LayercardError, match="max_length"):
        T.TraceConfig(max_length=1)
    assert T.TrimConfig(metric="loss").metric == "loss"


# ---------------------------------------------------------------- stage function


def _loaded(model):
    return LoadedModel(
        model=model, tokenizer=tiny_tokenizer(), model_id="tiny", model_hash="0" * 64, source="mem"
    )


def test_trim_refuses_an_export_that_differs_and_writes_nothing(lora_dir, tmp_path, monkeypatch):
    task = load_task("synthetic:facts", split="test")
    cfg = T.TrimConfig(examples=2, batch_size=2, max_new_tokens=2, max_length=64, window=(1, 2))
    monkeypatch.setattr(trim_run, "_max_diff", lambda *a: 1.0)
    with pytest.raises(LayercardError, match="does not reproduce"):
        T.trim(_loaded(tiny_model("llama", layers=LAYERS)), lora_dir, task, cfg, tmp_path / "run")
    assert (
        not (tmp_path / "run" / "adapter-trimmed").exists() and not (tmp_path / "run" / "trim.json").exists()
    )
    with pytest.raises(LayercardError, match="no such folder"):
        T.trim(_loaded(tiny_model("llama")), tmp_path / "nope", task, cfg, tmp_path / "run")


def test_a_trim_cut_in_its_sweep_leaves_no_earlier_trim_json_beside_its_trace(
    lora_dir, tmp_path, monkeypatch
):
    task = load_task("synthetic:facts", split="test")
    cfg = T.TrimConfig(examples=2, batch_size=2, max_new_tokens=2, max_length=64, metric="loss")
    out = tmp_path / "run"
    T.trim(_loaded(tiny_model("llama", layers=LAYERS)), lora_dir, task, cfg, out)
    assert (out / "trim.json").is_file() and (out / "trim.png").is_file()

    def cut(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trim_run, "sweep", cut)
    with pytest.raises(KeyboardInterrupt):
        T.trim(
            _loaded(tiny_model("llama", layers=LAYERS)),
            lora_dir,
            task,
            dataclasses.replace(cfg, radius=1),
            out,
        )
    assert (
        (out / "trace.json").is_file()
        and not (out / "trim.json").exists()
        and not (out / "trim.png").exists()
    )


def test_trim_bottleneck_adapter_end_to_end(tmp_path):
    model = tiny_model("llama", layers=LAYERS)
    aset = add_adapters(model, "houlsby", [0, 1, 2, 3], bottleneck=4)
    with torch.no_grad():
        for name, p in aset.named_parameters():
            if ".up." in name:
                p.normal_(0.0, 0.5)
    save_adapters(aset, tmp_path / "adapter")
    aset.remove()
    loaded = _loaded(tiny_model("llama", layers=LAYERS))
    task = load_task("synthetic:facts", split="test")
    cfg = T.TrimConfig(
        examples=2, batch_size=2, max_new_tokens=2, max_length=64, metric="loss", latency_repeats=1
    )
    res = T.trim(loaded, tmp_path / "adapter", task, cfg, tmp_path / "run")
    losses = {r["k"]: r["loss"] for r in res["sweep"]}
    assert res["chosen_k"] == min(losses, key=lambda k: (losses[k], k)) and res["higher_is_better"] is False
    assert res["adapter_format"] == "layercard" and res["export"]["max_abs_logit_diff_vs_masked"] == 0.0
    assert res["after"]["loss"] == pytest.approx(losses[res["chosen_k"]], rel=1e-6)
    assert res["after"]["adapted_modules"] == 2 * (res["chosen_k"] + 1)
    assert T.Trace.load(tmp_path / "run").candidates == res["candidates"]
    assert attached_adapters(loaded.model) is None  # the base is left clean
    with pytest.raises(LayercardError, match="cannot be merged"):
        T.trim(loaded, tmp_path / "adapter", task, cfg, tmp_path / "run", export_merged_dir=tmp_path / "m")


def test_loss_selected_sweep_never_generates_and_picks_the_same_k(lora_dir, tmp_path, monkeypatch):
    from layercard import inference
    from layercard.adapters import attached

    task = load_task("synthetic:facts", split="test")
    sub, tok = task.subset(4, seed=0), tiny_tokenizer()
    loaded = _loaded(tiny_model("llama", layers=LAYERS))
    ks = list(range(LAYERS))
    real_generate = inference.generate

    def boom(*a, **kw):
        raise AssertionError("a loss-selected sweep generated text")

    with attached(loaded.model, lora_dir) as model:
        # what a loss-selected sweep did before: generate and score text at every K, then read the loss
        full = T.sweep(
            model, ks, T.task_scorer(tok, sub, sub.examples, metrics=["exact_match"], batch_size=2,
                                     max_new_tokens=2, max_length=64),
        )  # fmt: skip
        with monkeypatch.context() as m:
            m.setattr(inference, "generate", boom)
            lean = T.sweep(model, ks, T.loss_scorer(tok, sub, sub.examples, batch_size=2, max_length=64))
    assert [r["loss"] for r in lean] == pytest.approx([r["loss"] for r in full], rel=1e-12)
    assert all(set(r) == {"k", "adapted_layers", "n_adapted_layers", "adapted_modules", "loss"} for r in lean)
    expected = T.choose_boundary(full, "loss", higher_is_better=False)
    assert T.choose_boundary(lean, "loss", higher_is_better=False) == expected

    # end to end: trim() generates for the before/after rows only, never inside its sweep
    in_sweep, calls = [], []

    def guarded(*a, **kw):
        if in_sweep:
            boom()
        calls.append(len(a[3]))  # the examples generated for
        return real_generate(*a, **kw)

    def watched(*a, **kw):
        in_sweep.append(True)
        try:
            return real_sweep(*a, **kw)
        finally:
            in_sweep.clear()

    real_sweep = trim_run.sweep
    monkeypatch.setattr(inference, "generate", guarded)
    monkeypatch.setattr(trim_run, "sweep", watched)
    cfg = T.TrimConfig(
        examples=4, batch_size=2, max_new_tokens=2, max_length=64, metric="loss", all_layers=True,
        latency_repeats=2,
    )  # fmt: skip
    res = T.trim(loaded, lora_dir, task, cfg, tmp_path / "run")
    assert res["ks"] == ks and res["chosen_k"] == expected
    assert [r["loss"] for r in res["sweep"]] == pytest.approx([r["loss"] for r in full], rel=1e-12)
    assert all("metrics" not in r and "s_per_example" not in r for r in res["sweep"])
    # an untimed warm-up on one batch (else 'before' times the process's first generation), then before
    # and after each: one scoring pass and latency_repeats - 1 timed passes over the 4 examples
    assert calls == [cfg.batch_size] + [4] * (2 * cfg.latency_repeats)
    for row in (res["before"], res["after"]):
        assert set(row["metrics"]) == set(res["metrics"]) and len(row["s_per_example_samples"]) == 2
    # the unmasked model's text scores, as the generating sweep's last row had them
    assert res["before"]["metrics"]["exact_match"] == full[-1]["metrics"]["exact_match"]
    chosen_row = next(r for r in full if r["k"] == expected)
    assert res["after"]["loss"] == pytest.approx(chosen_row["loss"], rel=1e-6)
    assert res["after_matches_sweep"] is True


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", layers=LAYERS).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_cli_trace_and_trim(tiny_folder, lora_dir, tmp_path, monkeypatch):
    from peft import PeftModel

    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    common = ["--model", str(tiny_folder), "--adapter", str(lora_dir), "--task", "synthetic:facts",
              "--examples", "3", "--batch-size", "3", "--max-length", "64"]  # fmt: skip
    r = CliRunner().invoke(app, ["trace", *common, "--out", str(run), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["kind"] == "trace" and summary["task"]["split"] == "test"  # synthetic has no validation
    tr = T.Trace.load(run)
    assert tr.n_layers == LAYERS and (run / "trace.png").stat().st_size > 1000
    assert tr.provenance["stage"] == "trace" and len(tr.provenance["config"]["adapter_hash"]) == 64
    assert T.Trace.from_dict(json.loads(json.dumps(tr.to_dict()))) == tr

    merged = tmp_path / "merged"
    r = CliRunner().invoke(
        app, ["trim", *common, "--max-new-tokens", "3", "--radius", "1", "--out", str(run),
              "--export-merged", str(merged), "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((run / "trim.json").read_text())
    assert res["kind"] == "trim" and res["schema_version"] == 1 and res["provenance"]["stage"] == "trim"
    assert "trace_s" not in res["timings"]  # the trace written by `layercard trace` was reused
    assert {"dtype": "float32", "device": "cpu"}.items() <= res["provenance"]["config"].items()
    assert {"dtype": "float32", "device": "cpu"}.items() <= tr.provenance["config"].items()
    r = CliRunner().invoke(app, ["trim", *common, "--radius", "1", "--out", str(run), "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output  # another dtype: the float32 trace is no trace of it
    assert "trace_s" in json.loads((run / "trim.json").read_text())["timings"]
    k = res["chosen_k"]
    assert k in res["ks"] and res["ks"][-1] == LAYERS - 1
    assert res["metrics"][:1] == ["exact_match"] and {"token_f1", "rouge_l"} <= set(res["metrics"])
    for row in res["sweep"]:
        assert set(row) >= {"k", "adapted_layers", "adapted_modules", "metrics", "loss", "s_per_example"}
    assert res["before"]["adapted_modules"] == 2 * LAYERS and res["after"]["adapted_modules"] == 2 * (k + 1)
    assert res["after"]["s_per_example"] > 0 and res["after_matches_sweep"] is True
    samples = res["before"]["s_per_example_samples"]
    assert len(samples) == 3 and res["before"]["s_per_example"] == min(samples)  # default 3 repeats
    assert res["export"]["max_abs_logit_diff_vs_masked"] == 0.0

    # the merged folder loads with layercard and matches the trimmed adapter
    m = load_model(str(merged))
    base = tiny_model("llama", layers=LAYERS)
    trimmed = PeftModel.from_pretrained(base, run / "adapter-trimmed").eval()
    assert torch.allclose(_logits(m.model), _logits(trimmed), atol=1e-4)
    assert res["merged"]["max_abs_logit_diff_vs_trimmed"] < 1e-4

    # table output path, explicit window
    r = CliRunner().invoke(
        app, ["trim", *common, "--max-new-tokens", "2", "--window", "1:2", "--out", str(run)]
    )
    assert r.exit_code == 0, r.output
    res = json.loads((run / "trim.json").read_text())
    assert res["ks"] == [1, 2, 3]
    flat = T.metric_is_flat(res["sweep"], res["metric"], tolerance=res["tie_tolerance"])
    assert res["metric_flat"] is flat
    # the sweep counts the generations stopped at --max-new-tokens 2, and says so where there are any
    assert res["max_new_tokens"] == 2 and all(0 <= r["capped"] <= 3 for r in res["sweep"])
    capped = any(r["capped"] for r in res["sweep"])
    assert ("generations reached max_new_tokens 2" in " ".join(r.output.split())) is capped
    assert res["chosen_by"] == ("loss" if flat else "exact_match")
    if flat:  # the loss chose: no boundary swept has a lower one
        assert res["after"]["loss"] == min(r["loss"] for r in res["sweep"])
    assert ("every K scored the same exact_match" in " ".join(r.output.split())) is flat


def test_cli_trim_by_loss_prints_rows_without_text_metrics(tiny_folder, lora_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    r = CliRunner().invoke(
        app, ["trim", "--model", str(tiny_folder), "--adapter", str(lora_dir), "--task", "synthetic:facts",
              "--examples", "2", "--batch-size", "2", "--max-length", "64", "--max-new-tokens", "2",
              "--metric", "loss", "--window", "2:3", "--latency-repeats", "1", "--out", str(run)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((run / "trim.json").read_text())
    assert res["metric"] == "loss" and res["ks"] == [2, 3]
    assert all("metrics" not in row and row["loss"] is not None for row in res["sweep"])
    assert set(res["after"]["metrics"]) == set(res["metrics"]) and res["after"]["s_per_example"] > 0


def test_cli_bad_inputs(tiny_folder, lora_dir, tmp_path):
    missing = tmp_path / "no-adapter"
    for cmd in (["trace", "--out", str(tmp_path / "o")], ["trim"]):
        r = CliRunner().invoke(app, [*cmd, "--model", str(tiny_folder), "--adapter", str(missing),
                                     "--task", "synthetic:facts"])  # fmt: skip
        assert r.exit_code != 0
        assert f"--adapter {missing}: no such folder" in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["trim", "--model", str(tiny_folder), "--adapter", str(lora_dir),
                                 "--task", "synthetic:facts", "--window", "3-5"])  # fmt: skip
    assert r.exit_code != 0 and "--window: must be two layer indices" in r.output and "'3-5'" in r.output
    assert not (tmp_path / "o").exists()


def test_export_merged_never_replaces_other_files(tiny_folder, lora_dir, tmp_path):
    """--export-merged refuses, before any work, a folder that is the trim's own or holds other files;
    a merged model it wrote before may be replaced."""
    run = tmp_path / "run"
    (run / "mine").mkdir(parents=True)
    (run / "mine" / "keep.txt").write_text("x")
    common = ["trim", "--model", str(tiny_folder), "--adapter", str(lora_dir), "--task", "synthetic:facts",
              "--examples", "2", "--batch-size", "2", "--max-length", "64", "--max-new-tokens", "2",
              "--window", "2:3", "--latency-repeats", "1", "--out", str(run)]  # fmt: skip
    for target, says in (
        (run, "which it holds"),
        (lora_dir.parent, "which it holds"),
        (run / "adapter-trimmed", "which it holds"),
        (run / "mine", "holds files that are not a merged model"),
        (lora_dir / "merged", "is inside the adapter folder"),
    ):
        r = CliRunner().invoke(app, [*common, "--export-merged", str(target)])
        assert r.exit_code == 2 and says in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert (run / "mine" / "keep.txt").read_text() == "x" and (lora_dir / "adapter_config.json").is_file()
    assert not (run / "trim.json").exists()
    merged = tmp_path / "merged"
    for _ in range(2):  # the second call replaces the first's merged model
        r = CliRunner().invoke(app, [*common, "--export-merged", str(merged)])
        assert r.exit_code == 0, r.output
    mark = json.loads((merged / "layercard_merged.json").read_text())
    assert mark["adapter"] == str(run / "adapter-trimmed") and mark["max_abs_logit_diff_vs_trimmed"] < 1e-4


def test_a_merge_that_changes_the_logits_writes_nothing(tmp_path, monkeypatch):
    """A LoRA on lm_head tied to the embeddings merges into both: the merged model is refused."""
    from peft import get_peft_model

    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    model = get_peft_model(
        tiny_model("llama", layers=LAYERS, tie_word_embeddings=True),
        _lora_config(target_modules=["q_proj", "v_proj", "lm_head"]),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    model.save_pretrained(tmp_path / "adapter")
    task = load_task("synthetic:facts", split="test")
    cfg = T.TrimConfig(examples=2, batch_size=2, max_new_tokens=2, max_length=64, window=(2, 3))
    base = _loaded(tiny_model("llama", layers=LAYERS, tie_word_embeddings=True))
    merged, run = tmp_path / "merged", tmp_path / "run"
    # refused before any work: the adapter's modules name the tied one
    with pytest.raises(LayercardError, match="adapts lm_head, whose weight another module shares"):
        T.trim(base, tmp_path / "adapter", task, cfg, run, export_merged_dir=merged)
    assert not merged.exists() and not run.exists()
    # and the check of the merged logits, which catches it where the names do not tell
    import layercard.trim.run as trim_run

    T.trim(base, tmp_path / "adapter", task, cfg, run)  # a trim.json of its own, to be outdated
    monkeypatch.setattr(trim_run, "check_mergeable", lambda *a: None)
    with pytest.raises(LayercardError, match="the merged model does not give the trimmed adapter's logits"):
        T.trim(base, tmp_path / "adapter", task, cfg, run, export_merged_dir=merged)
    assert not merged.exists() and not (run / "trim.json").exists()  # none that would describe another export


def test_an_adapter_trimming_cannot_export_is_refused_before_the_sweep(lora_dir, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    src = tmp_path / "bin-only"
    shutil.copytree(lora_dir, src)
    state = load_file(str(src / "adapter_model.safetensors"))
    torch.save(state, src / "adapter_model.bin")
    (src / "adapter_model.safetensors").unlink()
    monkeypatch.setattr(trim_run, "sweep", lambda *a, **k: pytest.fail("the sweep ran"))
    task = load_task("synthetic:facts", split="test")
    cfg = T.TrimConfig(examples=2, batch_size=2, max_new_tokens=2, max_length=64, window=(1, 2))
    with pytest.raises(LayercardError, match="no adapter_model.safetensors"):
        T.trim(_loaded(tiny_model("llama", layers=LAYERS)), src, task, cfg, tmp_path / "run")


def test_latency_text_says_when_the_two_generated_different_lengths():
    same = T.latency_text({"s_per_example": 0.04, "new_tokens_per_example": 8.0},
                          {"s_per_example": 0.03, "new_tokens_per_example": 8.0})  # fmt: skip
    assert same == "0.040 → 0.030 s/example"
    other = T.latency_text({"s_per_example": 0.005, "new_tokens_per_example": 1.0},
                           {"s_per_example": 0.024, "new_tokens_per_example": 16.0})  # fmt: skip
    assert other == "0.005 → 0.024 s/example (generating 1.0 → 16.0 tokens/example: not the same work)"
    assert T.latency_text({"s_per_example": 0.04}, {"s_per_example": 0.03}) == "0.040 → 0.030 s/example"


def test_a_scorer_checks_the_gold_answers_before_any_boundary_is_generated():
    from layercard.tasks import Example, Task, TaskFormat

    fmt = TaskFormat("math", "q: {input}", ("gsm8k_accuracy",), 48, 8, 6)
    examples = (Example("g1", "2+2", "#### 4", meta={"final_answer": "4"}), Example("g2", "1/0", "#### ?"))
    task = Task("math", "memory", "test", fmt, examples)
    with pytest.raises(LayercardError, match="example 'g2': no final_answer"):
        T.task_scorer(
            tiny_tokenizer(), task, examples, metrics=["gsm8k_accuracy"], batch_size=2, max_new_tokens=2,
            max_length=64,
        )  # fmt: skip


def test_a_generating_sweep_of_one_k_warms_up_before_it(lora_dir, tmp_path, monkeypatch):
    # its one pass is also the 'before' row, which would otherwise time the process's first generation
    from layercard import inference

    calls, real = [], inference.generate

    def counted(*a, **kw):
        calls.append(len(a[3]))  # the examples generated for
        return real(*a, **kw)

    monkeypatch.setattr(inference, "generate", counted)
    task = load_task("synthetic:facts", split="test")
    last = LAYERS - 1
    cfg = T.TrimConfig(
        examples=4, batch_size=2, max_new_tokens=2, max_length=64, window=(last, last), latency_repeats=1
    )
    res = T.trim(_loaded(tiny_model("llama", layers=LAYERS)), lora_dir, task, cfg, tmp_path / "run")
    assert res["ks"] == [last]
    assert calls[:2] == [cfg.batch_size, 4]  # one untimed batch, then the sweep's pass over the 4 examples


def test_the_sweep_legend_names_the_loss_line_on_the_twin_axis():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{"k": k, "loss": 2.0 - 0.1 * k, "metrics": {"exact_match": 0.1 * k}} for k in range(4)]
    fig, ax = plt.subplots()
    try:
        handles = T.draw_sweep(ax, {"sweep": rows, "metric": "exact_match", "chosen_k": 2})
        assert [h.get_label() for h in handles] == ["exact_match", "loss", "chosen K=2"]
        # by loss there is no twin axis, and no second loss line
        handles = T.draw_sweep(plt.subplots()[1], {"sweep": rows, "metric": "loss", "chosen_k": 1})
        assert [h.get_label() for h in handles] == ["loss", "chosen K=1"]
    finally:
        plt.close("all")


def test_a_merged_export_leaves_the_callers_random_numbers_alone(lora_dir, tmp_path, monkeypatch):
    """PEFT draws initial LoRA weights from the caller's generator before loading the saved ones: the
    merge draws from its own, so that the caller's next random numbers are the ones it seeded."""
    from layercard.trim.export import export_merged

    monkeypatch.setenv("LAYERCARD_CACHE", str(tmp_path / "cache"))
    loaded = _loaded(tiny_model("llama", layers=LAYERS))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    export_merged(loaded, lora_dir, tmp_path / "merged")
    assert torch.equal(torch.rand(3), expected)
