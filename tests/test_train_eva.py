"""EVA initialisation (train ``init: eva``) on tiny random models: ranks, LoRA A, saved adapter, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny import fixed_logits, tiny_model
from tiny_tok import tiny_tokenizer

from layercard import models
from layercard.adapters import attached, load_adapter
from layercard.errors import LayercardError
from layercard.models import LoadedModel
from layercard.plan import Plan
from layercard.tasks import load_task
from layercard.train import TrainConfig, TrainMetrics, train

TRAIN = load_task("synthetic:facts", split="train").subset(16)
VAL = load_task("synthetic:facts", split="test").subset(8)
FAST = dict(batch_size=4, max_length=64, train_examples=8, eval_examples=4, checkpoint_every=0)
RANK = 4
NARROW = "model.layers.1.self_attn.o_proj"  # its input spans at most two directions (see _loaded)


def _loaded() -> LoadedModel:
    """The tiny llama with one output row left in layer 1's v_proj.

    Layer 1's o_proj then sees only that row's value, once per query head sharing its kv head (two), so
    its input spans at most two directions: EVA must give it at most rank 2 and the rest elsewhere.
    """
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[1:] = 0
    return LoadedModel(model, tiny_tokenizer(), "tiny-llama-eva", models.weights_hash(model), "tiny")


def _plan(
    loaded: LoadedModel, layers: list[int], *, kind: str = "lora", roles: str = "q,v,o", low: int = RANK
) -> Plan:
    """A plan as `layercard plan` writes it: ``roles`` on ``layers`` at rank RANK, on layer 2 at ``low``.

    The commonest rank is ``r``; the others are rank and alpha patterns, alpha = 2·rank (scale 2).
    """
    units = models.units(loaded.model, roles, layers=layers)
    rank = {u.name: low if u.layer == 2 else RANK for u in units}
    other = {n: r for n, r in rank.items() if r != RANK}
    return Plan.from_dict(
        {
            "kind": "plan",
            "schema_version": 1,
            "provenance": {},
            "card": {"model_id": loaded.model_id, "model_hash": loaded.model_hash, "task": "facts"},
            "config": {"policy": "test"},
            "adapter_kind": kind,
            "units": [
                {"key": u.key, "layer": u.layer, "role": u.role, "name": u.name, "rank": rank[u.name]}
                for u in units
            ],
            "layers": layers,
            "predicted": {"step_time_s": 0.05, "params": 0, "modules": len(units), "gain": 1.0},
            "lora_config": {
                "r": RANK,
                "lora_alpha": 2 * RANK,
                "lora_dropout": 0.0,
                "target_modules": [u.name for u in units],
                "rank_pattern": other,
                "alpha_pattern": {n: 2 * r for n, r in other.items()},
                "bias": "none",
                "task_type": "CAUSAL_LM",
            },
            "adapter_config": {"kind": kind, "bottleneck": 4, "layers": layers} if kind != "lora" else None,
        }
    )


def _lora(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """LoRA layers by their path in the base model."""
    from peft.tuners.lora import LoraLayer

    inner = model.base_model.model
    return {n: m for n, m in inner.named_modules() if isinstance(m, LoraLayer)}


def _params(model: torch.nn.Module, ranks: dict[str, int]) -> int:
    """LoRA parameters of ``ranks`` on the base model's modules."""
    shapes = {n: model.get_submodule(n).weight.shape for n in ranks}
    return sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items())


@pytest.fixture(scope="module")
def eva_run(tmp_path_factory) -> dict[str, Any]:
    loaded = _loaded()
    base_logits = fixed_logits(loaded.model)
    plan = _plan(loaded, [1, 2], low=2)
    out = tmp_path_factory.mktemp("eva")
    seen: dict[str, Any] = {}

    def callback(step: int, loss: float, model: torch.nn.Module) -> None:
        if step == 1:  # B started at zero, so A had no gradient yet: it is still EVA's
            seen["A"] = {n: m.lora_A["default"].weight.detach().clone() for n, m in _lora(model).items()}
        seen["logits"] = fixed_logits(model)

    cfg = TrainConfig(steps=3, lr=1e-2, init="eva", eva_rho=2.0, **FAST)
    metrics = train(loaded, plan, TRAIN, VAL, cfg, out, callback=callback)
    return {"loaded": loaded, "plan": plan, "out": out, "metrics": metrics, "seen": seen, "base": base_logits}


def test_eva_moves_rank_and_keeps_the_planned_total(eva_run):
    m, plan = eva_run["metrics"], eva_run["plan"]
    ranks, planned = m["eva_ranks"], {u.name: u.rank for u in plan.units}
    assert set(ranks) == set(planned) and len(ranks) == 6
    assert sum(ranks.values()) == sum(planned.values()) == 18  # EVA moves the planned budget, no more
    assert ranks[NARROW] <= 2 < planned[NARROW]  # no rank on directions its input never takes
    assert all(ranks[n] <= 2 * planned[n] for n in ranks)  # eva_rho=2 caps the growth
    assert any(ranks[n] > planned[n] for n in ranks)
    # The trainable count is that of the ranks EVA chose, not the plan's.
    model = eva_run["loaded"].model
    assert m["trainable_params"] == _params(model, ranks) != _params(model, planned)


def test_eva_sets_lora_a_to_orthonormal_rows(eva_run):
    a = eva_run["seen"]["A"]
    assert {n: w.shape[0] for n, w in a.items()} == {
        n: r for n, r in eva_run["metrics"]["eva_ranks"].items() if r
    }
    for name, w in a.items():
        torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-4, rtol=0, msg=name)
    # PEFT's default init (Kaiming-uniform rows) is far from that, so the check tells the two apart.
    from peft import get_peft_model

    default = get_peft_model(tiny_model("llama"), eva_run["plan"].peft_config())
    w = next(iter(_lora(default).values())).lora_A["default"].weight.detach()
    assert not torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=0.1)


def test_eva_adapter_loads_with_layercard_loader(eva_run):
    folder = eva_run["out"] / "adapter"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    ranks = eva_run["metrics"]["eva_ranks"]
    assert sorted(cfg["target_modules"]) == sorted(n for n, r in ranks.items() if r)  # full paths
    assert cfg["rank_pattern"] == {n: r for n, r in ranks.items() if r not in (0, cfg["r"])}
    base = _loaded().model
    with attached(base, folder) as model:
        lora = _lora(model)
        assert {n: m.lora_A["default"].out_features for n, m in lora.items()} == {
            n: r for n, r in ranks.items() if r
        }
        assert {m.scaling["default"] for m in lora.values()} == {2.0}  # the planned scale, at any rank
        logits = fixed_logits(model)
    torch.testing.assert_close(logits, eva_run["seen"]["logits"], rtol=0, atol=0)
    assert not torch.equal(logits, eva_run["base"])
    torch.testing.assert_close(fixed_logits(base), eva_run["base"], rtol=0, atol=0)  # detached again


def test_eva_metrics_fields(eva_run, tmp_path: Path):
    m = eva_run["metrics"]
    assert m["init"] == "eva" and m["config"]["init"] == "eva" and m["config"]["eva_rho"] == 2.0
    assert 0 < m["init_s"] < m["wall_time_s"]
    tm = TrainMetrics.load(eva_run["out"])
    assert tm.eva_ranks == m["eva_ranks"] and tm.init_s == m["init_s"]
    # Files written before EVA existed read with the new fields as None.
    raw = json.loads((eva_run["out"] / "train_metrics.json").read_text())
    for key in ("init", "init_s", "eva_ranks"):
        del raw[key]
    (tmp_path / "old.json").write_text(json.dumps(raw))
    old = TrainMetrics.load(tmp_path / "old.json")
    assert (old.init, old.init_s, old.eva_ranks) == (None, None, None)


class Interrupt(Exception):
    pass


def test_eva_resume_equals_uninterrupted(tmp_path: Path, monkeypatch):
    def run(out: Path, *, resume: bool = False, stop_at: int | None = None, init: str = "eva") -> dict:
        loaded = _loaded()

        def callback(step: int, _loss: float, _model: torch.nn.Module) -> None:
            if step == stop_at:
                raise Interrupt

        cfg = TrainConfig(steps=4, lr=1e-2, init=init, **{**FAST, "checkpoint_every": 2, "eval_examples": 0})
        return train(loaded, _plan(loaded, [1, 2]), TRAIN, None, cfg, out, resume=resume, callback=callback)

    full = run(tmp_path / "full")
    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        run(part, stop_at=2)
    with pytest.raises(LayercardError, match="cannot resume: init was 'eva', now 'default'"):
        run(part, resume=True, init="default")
    import peft

    def no_svd(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a resumed run takes its ranks from the checkpoint")

    monkeypatch.setattr(peft, "get_eva_state_dict", no_svd)
    resumed = run(part, resume=True)
    assert resumed["resumed_from"] == 2 and resumed["eva_ranks"] == full["eva_ranks"]
    for (s1, a), (s2, b) in zip(resumed["loss_curve"], full["loss_curve"], strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-6, abs=1e-6)
    assert resumed["trainable_params"] == full["trainable_params"]
    assert resumed["init_s"] > 0


def test_a_checkpoint_from_before_init_existed_resumes(tmp_path: Path):
    loaded = _loaded()
    plan = _plan(loaded, [1])
    cfg = TrainConfig(steps=2, **{**FAST, "checkpoint_every": 2, "eval_examples": 0})
    first = train(loaded, plan, TRAIN, None, cfg, tmp_path)
    assert (first["init"], first["init_s"], first["eva_ranks"]) == ("default", None, None)
    state_file = tmp_path / "checkpoints" / "step-2" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("init", "eva_rho"):
        del state["fingerprint"][key]
    state_file.write_text(json.dumps(state))
    more = train(
        loaded, plan, TRAIN, None, TrainConfig(**{**cfg.to_dict(), "steps": 3}), tmp_path, resume=True
    )
    assert more["resumed_from"] == 2 and more["steps"] == 3


def test_eva_refuses_bottleneck_adapters(tmp_path: Path):
    loaded = _loaded()
    with pytest.raises(LayercardError, match="^train.init: eva initialises LoRA") as e:
        train(
            loaded, _plan(loaded, [1], kind="houlsby"), TRAIN, None, TrainConfig(init="eva"), tmp_path / "o"
        )
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"eva_rho": 0.5}, "^train.eva_rho: must be a number >= 1"), ({"init": "pissa"}, "^train.init:")],
)
def test_eva_settings_are_checked(kwargs: dict[str, Any], match: str):
    with pytest.raises(LayercardError, match=match):
        TrainConfig(**kwargs)


def test_eva_rho_beyond_a_module_input_width(tmp_path: Path):
    loaded = _loaded()
    cfg = TrainConfig(steps=1, init="eva", eva_rho=9.0, **FAST)  # 36 components of a 32-wide input
    with pytest.raises(LayercardError, match=r"^train.eva_rho: 9 asks .* use at most 8$"):
        train(loaded, _plan(loaded, [1]), TRAIN, None, cfg, tmp_path / "o")
    torch.testing.assert_close(fixed_logits(loaded.model), fixed_logits(_loaded().model), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:lora with eva initialization used with low_cpu_mem_usage")
def test_a_module_eva_drops_stays_dropped_when_loaded(tmp_path: Path):
    """With 20+ targets PEFT would save name suffixes, which also match a module EVA set to rank 0."""
    from peft import get_peft_model

    from layercard.train.eva import apply_eva, eva_lora_config

    loaded = _loaded()
    plan = _plan(loaded, [0, 1, 2, 3], roles="q,k,v,o,gate,up,down")
    model = get_peft_model(loaded.model, eva_lora_config(plan.peft_config(), 2.0))
    gone = "model.layers.2.self_attn.q_proj"
    torch.manual_seed(0)
    components = {
        f"base_model.model.{n}": torch.linalg.qr(torch.randn(m.in_features, RANK))[0].T
        for n, m in _lora(model).items()
    }
    components[f"base_model.model.{gone}"] = torch.zeros(0, 32)  # rank 0: EVA removes the LoRA
    assert len(components) >= 20
    apply_eva(model, components)
    for m in _lora(model).values():
        torch.nn.init.normal_(m.lora_B["default"].weight)
    model.save_pretrained(str(tmp_path / "adapter"))
    kept = set(_lora(model))
    assert gone not in kept and len(kept) == len(components) - 1
    reloaded = load_adapter(tiny_model("llama"), tmp_path / "adapter")
    assert set(_lora(reloaded)) == kept


def test_the_readme_and_metrics_say_the_ranks_eva_trained(eva_run):
    from layercard.train.readme import _rank_text

    m, plan = eva_run["metrics"], eva_run["plan"]
    kept = {n: r for n, r in m["eva_ranks"].items() if r}
    assert m["adapted"]["ranks"] == kept and m["adapted"]["modules"] == len(kept)
    assert set(m["adapted"]["lora_alpha"]) == set(kept)
    # the plan's placement stays as planned, labelled the plan's
    assert m["plan"]["kind"] == "lora" and m["plan"]["modules"] == len(plan.units) == 6
    text = (eva_run["out"] / "adapter" / "README.md").read_text()
    trained = f"The placement: {len(kept)} LoRA modules: q, v, o of layers 1–2 (2 layers), "
    assert trained + _rank_text(list(kept.values())) + ", lora_alpha 2 × rank; " in text
    assert (
        "EVA set these ranks from the plan's 6 LoRA modules: q, v, o of layers 1–2 (2 layers), ranks 2 (3 "
        in text
    )
