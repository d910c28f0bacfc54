"""Keeping the best validation's weights (keep_best) and early stopping, on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_train import FAST, TRAIN, VAL, _loaded, _one_thread, make_plan  # noqa: F401  (a fixture: one thread)

from layercard.errors import LayercardError
from layercard.train import TrainConfig, TrainMetrics, train
from layercard.train.loop import early_stop_due, patience_anchor, stop_reason, swing_text

# A learning rate high enough that the tiny model's validation loss turns back up within the run.
HOT = dict(lr=0.1, eval_every=1, **FAST)


class Interrupt(Exception):
    pass


def _run(out: Path, *, stop_at: int | None = None, resume: bool = False, **settings: Any) -> dict[str, Any]:
    """Train the tiny model with ``settings`` over :data:`HOT`; record the LoRA weights after each step."""
    loaded = _loaded()
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def callback(step: int, _loss: float, model: torch.nn.Module) -> None:
        seen[step] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        if step == stop_at:
            raise Interrupt

    cfg = TrainConfig(**{**HOT, "steps": 20, **settings})
    metrics = train(loaded, make_plan(loaded, [1, 3]), TRAIN, VAL, cfg, out, resume=resume, callback=callback)
    return {"metrics": metrics, "seen": seen}


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _matches(adapter: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> bool:
    """Whether every saved adapter tensor equals the run's weight of the same module at one step."""
    by_module = {n.replace(".default", ""): t for n, t in weights.items()}
    return all(torch.equal(t, by_module[n]) for n, t in adapter.items())


@pytest.fixture(scope="module")
def plain_and_best(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("best")
    return {"plain": _run(root / "plain"), "best": _run(root / "best", keep_best=True), "root": root}


def test_early_stop_due_counts_the_validations_since_the_best():
    curve = [[1, 3.0], [2, 2.0], [3, 2.5], [4, 2.4]]
    assert not early_stop_due(curve, 3)
    assert early_stop_due(curve, 2)
    assert not early_stop_due([*curve, [5, 1.9]], 1)  # the best is the newest validation
    assert not early_stop_due([*curve[:2], [3, 2.0]], 2)  # a tie is no lower: one since the best
    assert early_stop_due([*curve[:2], [3, 2.0]], 1)
    assert not early_stop_due(curve, 0)  # off
    assert not early_stop_due([], 1)


def test_a_minimum_improvement_counts_only_drops_larger_than_it():
    curve = [[1, 3.0], [2, 2.0], [3, 1.95], [4, 1.92], [5, 1.5], [6, 1.48]]
    assert patience_anchor(curve) == (0, [6, 1.48])
    # 1.95 and 1.92 are not more than 0.1 below 2.0; 1.5 is, and 1.48 not below it by more
    assert patience_anchor(curve, 0.1) == (1, [5, 1.5])
    assert [s for s, _ in curve if early_stop_due(curve[:s], 2, 0.1)] == [4]
    assert not any(early_stop_due(curve[:s], 2) for s in range(1, 7))
    assert patience_anchor(curve, 5.0) == (5, [1, 3.0])  # no drop is large enough: the first counts
    cfg = TrainConfig(**{**HOT, "early_stopping": 2, "early_stopping_min_delta": 0.1})
    assert (
        stop_reason(curve[:4], cfg)
        == "2 validations in a row found no loss more than 0.1 below step 2's 2.0000"
    )
    plain = TrainConfig(**{**HOT, "early_stopping": 2})
    assert stop_reason([[1, 3.0], [2, 2.0], [3, 2.5], [4, 2.4]], plain) == (
        "2 validations in a row found no loss below step 2's 2.0000"
    )


def test_a_stop_over_a_curve_that_fell_again_is_said_to_swing():
    assert swing_text([[1, 3.0], [2, 2.0], [3, 2.5], [4, 2.8]]) is None  # a steady rise after the best
    assert swing_text([[1, 3.0], [2, 2.0], [3, 2.5], [4, 2.2]]) == "step 3's 2.5000 → step 4's 2.2000"
    assert swing_text([[1, 3.0], [2, 2.0]]) is None  # nothing counted yet
    # with a minimum improvement the count runs from the anchor: 1.95 below 2.0 is no swing, 1.97 is
    curve = [[1, 3.0], [2, 2.0], [3, 1.95], [4, 1.97]]
    assert swing_text(curve, 0.1) is None and swing_text(curve[:3] + [[4, 1.9]], 0.1) is not None


def test_the_swing_note_tells_the_benchmark_curves_apart():
    """On the committed best-weights runs: sst2's validation loss swung, and its early stop came before a
    lower loss that keep_best found; gsm8k's and e2e_nlg's rose steadily after their best."""
    runs = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "best_weights" / "runs"
    said = {}
    for task in ("gsm8k", "e2e_nlg", "sst2"):
        r = json.loads((runs / f"{task}-early_stopping.json").read_text())
        said[task] = swing_text(r["val_curve"])
        best = json.loads((runs / f"{task}-keep_best.json").read_text())["best_step"]
        assert (best > r["steps"]) == (said[task] is not None)
    assert said["sst2"] == "step 20's 0.5293 → step 25's 0.2941"


def test_keep_best_trains_the_same_run_and_keeps_the_lowest_validation(plain_and_best):
    plain, best = plain_and_best["plain"]["metrics"], plain_and_best["best"]["metrics"]
    # keeping the best changes nothing in training
    assert best["loss_curve"] == plain["loss_curve"] and best["val_curve"] == plain["val_curve"]
    losses = [loss for _, loss in best["val_curve"]]
    low = min(losses)
    step = best["val_curve"][losses.index(low)][0]
    assert step < best["steps"], "the run must turn back up for this test to say anything"
    assert (best["best_step"], best["best_val_loss"]) == (step, low)
    assert best["steps"] == best["planned_steps"] == 20 and best["stopped_early"] is False
    assert plain["best_step"] is None and plain["best_val_loss"] is None

    seen = plain_and_best["best"]["seen"]
    kept, last = _adapter(plain_and_best["root"] / "best"), _adapter(plain_and_best["root"] / "plain")
    assert _matches(kept, seen[step]) and not _matches(kept, seen[20])
    assert _matches(last, seen[20])
    text = TrainMetrics.from_dict(best).kept_text()
    assert text is not None and f"step {step}'s" in text and "early stopping" not in text
    assert TrainMetrics.from_dict(plain).kept_text() is None


def test_early_stopping_stops_after_patience_and_a_resume_finds_it_finished(tmp_path: Path, plain_and_best):
    full = plain_and_best["plain"]["metrics"]
    run = _run(tmp_path, early_stopping=2, checkpoint_every=5)
    m = run["metrics"]
    assert m["stopped_early"] is True and m["planned_steps"] == 20 and m["steps"] < 20
    # the curve is the full run's up to where it stopped, and it stopped at the first step it was due
    assert m["val_curve"] == full["val_curve"][: m["steps"]]
    due = [s for s, _ in full["val_curve"] if early_stop_due(full["val_curve"][:s], 2)]
    assert m["steps"] == due[0]
    assert _matches(_adapter(tmp_path), run["seen"][m["best_step"]])
    assert "early stopping ended the run" in (TrainMetrics.from_dict(m).kept_text() or "")
    # checkpointed where it stopped, though not a multiple of checkpoint_every
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"step-{m['steps']}"]
    state = json.loads((tmp_path / "checkpoints" / f"step-{m['steps']}" / "state.json").read_text())
    assert state["stopped_early"] is True and state["best"][0] == m["best_step"]

    adapter = _adapter(tmp_path)
    (tmp_path / "train_metrics.json").unlink()  # as if the session had died after its last checkpoint
    again = _run(tmp_path, early_stopping=2, checkpoint_every=5, resume=True)
    assert again["seen"] == {}  # no step trained
    assert again["metrics"]["steps"] == m["steps"] and again["metrics"]["best_step"] == m["best_step"]
    assert all(torch.equal(t, adapter[n]) for n, t in _adapter(tmp_path).items())


def test_a_minimum_improvement_stops_sooner_and_the_adapter_still_holds_the_lowest_loss(
    tmp_path: Path, plain_and_best
):
    full = plain_and_best["plain"]["metrics"]["val_curve"]
    # larger than any drop the run makes: only the first validation is ever the anchor
    delta = 2 * (full[0][1] - min(loss for _, loss in full)) + 1.0
    m = _run(tmp_path, early_stopping=2, early_stopping_min_delta=delta)
    assert m["metrics"]["stopped_early"] is True and m["metrics"]["steps"] == 3  # validations 2 and 3
    assert m["metrics"]["val_curve"] == full[:3]
    losses = [loss for _, loss in full[:3]]
    low = losses.index(min(losses))
    assert low > 0, "the run must fall within three steps for this test to say anything"
    assert (m["metrics"]["best_step"], m["metrics"]["best_val_loss"]) == tuple(full[low])
    assert _matches(_adapter(tmp_path), m["seen"][full[low][0]])
    assert m["metrics"]["config"]["early_stopping_min_delta"] == delta


def test_an_interrupted_run_keeps_its_best_across_the_resume(tmp_path: Path, plain_and_best):
    best = plain_and_best["best"]["metrics"]
    stop = best["best_step"] + 1  # the best is behind the checkpoint, in its best file
    with pytest.raises(Interrupt):
        _run(tmp_path, keep_best=True, checkpoint_every=stop, stop_at=stop)
    assert (tmp_path / "checkpoints" / f"step-{stop}" / "best.safetensors").is_file()
    resumed = _run(tmp_path, keep_best=True, checkpoint_every=stop, resume=True)["metrics"]
    assert resumed["resumed_from"] == stop
    assert (resumed["best_step"], resumed["best_val_loss"]) == (best["best_step"], best["best_val_loss"])
    kept = _adapter(plain_and_best["root"] / "best")
    assert all(torch.allclose(t, kept[n], atol=1e-6) for n, t in _adapter(tmp_path).items())


def test_a_resume_must_keep_the_best_as_the_run_did(tmp_path: Path):
    with pytest.raises(Interrupt):
        _run(tmp_path, checkpoint_every=2, stop_at=2)
    with pytest.raises(LayercardError, match="cannot resume: keep_best was False, now True"):
        _run(tmp_path, keep_best=True, checkpoint_every=2, resume=True)


def test_a_resume_must_keep_the_minimum_improvement(tmp_path: Path):
    with pytest.raises(Interrupt):
        _run(tmp_path, early_stopping=5, checkpoint_every=2, stop_at=2)
    with pytest.raises(LayercardError, match="cannot resume: early_stopping_min_delta was 0.0, now 0.5"):
        _run(tmp_path, early_stopping=5, early_stopping_min_delta=0.5, checkpoint_every=2, resume=True)


@pytest.mark.parametrize(
    ("settings", "field", "why"),
    [
        ({"keep_best": True, "eval_examples": 0}, "keep_best", "eval_examples is 0"),
        ({"early_stopping": 2, "eval_every": 0}, "early_stopping", "eval_every is 0"),
        ({"early_stopping": -1}, "early_stopping", "non-negative"),
        ({"early_stopping_min_delta": 0.1}, "early_stopping_min_delta", "early_stopping is 0"),
        ({"early_stopping": 2, "early_stopping_min_delta": -0.1}, "early_stopping_min_delta", ">= 0"),
    ],
)
def test_settings_that_leave_nothing_to_choose_from_are_refused(settings, field, why):
    with pytest.raises(LayercardError, match=f"^train.{field}:.*({why})"):
        TrainConfig(**settings)


def test_a_run_with_no_validation_task_cannot_keep_its_best(tmp_path: Path):
    loaded = _loaded()
    cfg = TrainConfig(steps=2, keep_best=True, **FAST)
    with pytest.raises(LayercardError, match="^train.keep_best: .*no validation task"):
        train(loaded, make_plan(loaded, [1]), TRAIN, None, cfg, tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_metrics_file_checks_the_new_fields(plain_and_best, tmp_path: Path):
    d = dict(plain_and_best["best"]["metrics"])
    path = tmp_path / "train_metrics.json"
    path.write_text(json.dumps(d))
    assert TrainMetrics.load(path).best_step == d["best_step"]
    for key, bad in (("stopped_early", "no"), ("best_step", -1), ("best_val_loss", "low")):
        path.write_text(json.dumps({**d, key: bad}))
        with pytest.raises(LayercardError, match=key):
            TrainMetrics.load(path)
    old = {
        k: v
        for k, v in d.items()
        if k not in ("best_step", "best_val_loss", "stopped_early", "planned_steps")
    }
    path.write_text(json.dumps(old))
    assert TrainMetrics.load(path).kept_text() is None


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


def test_cli_train_says_which_weights_the_adapter_holds(world, tmp_path: Path):
    from bad_world import FACTS, TRAIN, cli

    out = tmp_path / "run"
    r = cli(f"train -p {world.plan} -t {FACTS} -o {out} {TRAIN} --steps 4 --eval-every 1 --keep-best")
    assert r.exit_code == 0, r.output
    m = TrainMetrics.load(out)
    assert m.best_step is not None and m.best_val_loss == min(loss for _, loss in m.val_curve)
    assert "adapter weights" in r.output and f"step {m.best_step}'s" in r.output
    assert f"step {m.best_step}'s" in (out / "adapter" / "README.md").read_text()


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            "--early-stopping 2 --eval-every 0",
            "error: --early-stopping: chooses among validations, and eval_every is 0",
        ),
        (
            "--keep-best --eval-examples 0",
            "error: --keep-best: chooses among validations, and eval_examples is 0",
        ),
    ],
)
def test_cli_train_refuses_best_weights_without_validations(world, tmp_path: Path, extra: str, said: str):
    from bad_world import FACTS, TRAIN, cli, one_error_line

    out = tmp_path / "run"
    r = cli(f"train -p {world.plan} -t {FACTS} -o {out} {TRAIN} --steps 2 {extra}")
    assert said in one_error_line(r)
    assert not out.exists() or not any(out.iterdir())


def test_cli_train_refuses_best_weights_on_a_file_without_a_held_out_split(world, tmp_path: Path):
    from bad_world import cli

    out = tmp_path / "run"
    line = f"train -p {world.plan} -t {world.data} -o {out} --batch-size 2 --max-length 64 --steps 2"
    r = cli(f"{line} --early-stopping 2 --eval-every 1")
    assert r.exit_code == 2  # after the note that the file's prompts carry no instruction
    assert r.output.splitlines()[-1] == (
        f"error: --early-stopping: chooses among validations, and --task {world.data} is one file, with no "
        "other split; give --val-task"
    )
    assert not out.exists() or not any(out.iterdir())


def test_a_dry_run_says_early_stopping_may_end_the_run_sooner(world):
    from bad_world import FACTS, TRAIN, cli

    r = cli(f"train -p {world.plan} -t {FACTS} {TRAIN} --steps 6 --eval-every 2 --early-stopping 2 --dry-run")
    assert r.exit_code == 0, r.output
    assert "--early-stopping 2: the run may end at a validation (every 2 steps) before its 6" in r.output
    plain = cli(f"train -p {world.plan} -t {FACTS} {TRAIN} --steps 6 --dry-run")
    assert plain.exit_code == 0 and "early-stopping" not in plain.output


# ---------------------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------------------


def _norms_at_update(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **settings: Any) -> tuple[list, dict]:
    """The trainable gradients' global norm as each AdamW update saw them, and the run's metrics."""
    from layercard.cost import grad_norm

    seen: list[float] = []
    real = torch.optim.AdamW.step

    def step(self, *a: Any, **kw: Any) -> Any:
        seen.append(grad_norm([p for g in self.param_groups for p in g["params"]]))
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    loaded = _loaded()
    cfg = TrainConfig(**{**FAST, "steps": 4, "lr": 1e-2, "eval_examples": 0, **settings})
    return seen, train(loaded, make_plan(loaded, [1, 3]), TRAIN, None, cfg, tmp_path, progress=False)


def test_max_grad_norm_clips_each_update_and_counts_the_steps(tmp_path: Path, monkeypatch):
    free, plain = _norms_at_update(monkeypatch, tmp_path / "free")
    assert plain["clipped_steps"] is None and TrainMetrics.from_dict(plain).clipped_text() is None
    cap = min(free) / 2  # below every step's own norm: each is clipped
    clipped, m = _norms_at_update(monkeypatch, tmp_path / "clipped", max_grad_norm=cap)
    assert len(clipped) == 4 and all(n == pytest.approx(cap, rel=1e-4) for n in clipped)
    assert m["clipped_steps"] == 4
    assert TrainMetrics.from_dict(m).clipped_text() == f"4 of 4 steps (max_grad_norm {cap:g})"
    # above every norm: nothing clipped, and the run is the unclipped one
    _, loose = _norms_at_update(monkeypatch, tmp_path / "loose", max_grad_norm=max(free) * 100)
    assert loose["clipped_steps"] == 0 and loose["loss_curve"] == plain["loss_curve"]


def test_a_resume_must_clip_as_the_run_did(tmp_path: Path):
    with pytest.raises(Interrupt):
        _run(tmp_path, checkpoint_every=2, stop_at=2)
    with pytest.raises(LayercardError, match="cannot resume: max_grad_norm was None, now 1.0"):
        _run(tmp_path, max_grad_norm=1.0, checkpoint_every=2, resume=True)
    with pytest.raises(LayercardError, match="^train.max_grad_norm:"):
        TrainConfig(max_grad_norm=0.0)


@pytest.mark.parametrize(
    ("best", "said"), [([3], r"best: must be a \[step, loss\] pair"), ([0, 1.0], r"best\[0\]")]
)
def test_a_checkpoint_with_a_damaged_best_is_named(tmp_path: Path, best: list, said: str):
    with pytest.raises(Interrupt):
        _run(tmp_path, keep_best=True, checkpoint_every=2, stop_at=2)
    state_file = tmp_path / "checkpoints" / "step-2" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["best"][0] in (1, 2)
    state_file.write_text(json.dumps({**state, "best": best}))
    with pytest.raises(LayercardError, match=f"damaged checkpoint.*{said}"):
        _run(tmp_path, keep_best=True, checkpoint_every=2, resume=True)
