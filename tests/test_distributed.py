"""Several processes on the CPU (gloo): the card and training equal their one-process runs.

Run as a script, this file is the worker the launched tests start: ``train OUT BATCH`` under ``accelerate
launch``, ``fsdp-card OUT`` under ``torch.distributed.run``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model
from tiny_tok import tiny_tokenizer
from typer.testing import CliRunner

from layercard import models
from layercard.cli import app
from layercard.models import LoadedModel
from layercard.plan import Plan
from layercard.tasks import load_task
from layercard.train import TrainConfig, estimate, prepare_data, train
from layercard.train.data import Stream, run_positions
from layercard.train.metrics import priced_at

REPO = Path(__file__).resolve().parents[1]
DDP_CPU = REPO / "src" / "layercard" / "configs" / "accelerate" / "ddp_cpu.yaml"
CARD = "-t synthetic:facts --examples 8 --max-length 48 --no-calibrate --device cpu"
TRAIN_STEPS = 4


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist") / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _env() -> dict[str, str]:
    """The environment of a launched command: one thread per process (2 cores), no progress bars."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "LAYERCARD_PROGRESS": "0",
        "PYTHONPATH": str(REPO / "tests"),
    }


def _launch(
    args: list[str], tmp: Path, timeout: float = 120, torchrun: bool = False
) -> subprocess.CompletedProcess:
    """``accelerate launch`` with the shipped two-process CPU config (or ``torch.distributed.run``); the
    launcher's own temporary folders go under ``tmp``, not the machine's /tmp."""
    launcher = ["torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [
        "accelerate.commands.launch", "--config_file", str(DDP_CPU)
    ]  # fmt: skip
    cmd = [sys.executable, "-m", *launcher, *args]
    (tmp / "launcher-tmp").mkdir(parents=True, exist_ok=True)
    env = {**_env(), "TMPDIR": str(tmp / "launcher-tmp")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


KAPPA_REL = 1e-3


def _numbers_equal(a: Any, b: Any, path: str = "card", rel: float = 1e-4, scale: float = 0.0) -> None:
    """Every number of ``a`` within ``rel`` of ``b``'s, everything else equal, field by field.

    The sums are float32, added in another order when two processes share them: a condition number κ
    divides by the smallest eigenvalue, whose rounding it magnifies (it has moved by 1e-5 to 1.1e-4 between
    library versions), so κ is compared at KAPPA_REL; and a list of numbers (a spectrum, say) is compared
    at ``rel`` of its largest entry, since its tiny entries are rounding either way.
    """
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: fields differ: {sorted(set(a) ^ set(b))}"
        for k in a:
            _numbers_equal(a[k], b[k], f"{path}.{k}", rel)
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} != {len(b)} items"
        top = max((abs(x) for x in a if isinstance(x, float)), default=0.0)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _numbers_equal(x, y, f"{path}[{i}]", rel, top)
    elif isinstance(a, float) or isinstance(b, float):
        rel = max(rel, KAPPA_REL) if path.endswith(".kappa") else rel
        assert b == pytest.approx(a, rel=rel, abs=max(rel * scale, 1e-300)), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _card_numbers(path: Path) -> dict[str, Any]:
    d = json.loads((path / "card.json").read_text())
    d.pop("timings")
    d.pop("provenance")  # wall time, creation time, machine
    return d


def _card(folder: Path, out: Path, extra: str) -> Path:
    r = CliRunner().invoke(app, f"card -m {folder} -o {out} {CARD} {extra}".split())
    assert r.exit_code == 0, r.output
    return out


def test_card_in_two_processes_equals_one(tiny_folder: Path, tmp_path: Path) -> None:
    """--processes 2 (gloo): 4 batches dealt 2 and 2, two layer-group passes, coupling on the first."""
    opts = "--batch-size 2 --layer-groups 2 --coupling"
    one = _card(tiny_folder, tmp_path / "one", opts)
    two = _card(tiny_folder, tmp_path / "two", f"{opts} --processes 2")
    a, b = _card_numbers(one), _card_numbers(two)
    assert a["n_positions"] > 0 and b["coupling"] is not None
    _numbers_equal(a, b)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_card_under_accelerate_launch_equals_one(tiny_folder: Path, tmp_path: Path) -> None:
    """`accelerate launch -m layercard card`: one batch, so the second process has none to take."""
    opts = "--batch-size 8"
    one = _card(tiny_folder, tmp_path / "one", opts)
    out = tmp_path / "launched"
    _launch(
        ["-m", "layercard", "card", "-m", str(tiny_folder), "-o", str(out), *f"{CARD} {opts}".split()],
        tmp_path,
    )
    _numbers_equal(_card_numbers(one), _card_numbers(out))


FSDP_CARD = dict(examples=8, max_length=48, batch_size=2, calibrate=False, coupling=False)


def _fsdp_card(out: Path) -> None:
    """The card of the tiny model with its weights sharded over the launched processes (FSDP)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from layercard.card import CardConfig, compute_card
    from layercard.card.probe import is_sharded
    from layercard.errors import LayercardError

    dist.init_process_group("gloo")
    try:
        model = tiny_model("llama")
        loaded = LoadedModel(model, tiny_tokenizer(), "tiny-llama", models.weights_hash(model), "tiny")
        for layer in models.decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        task = load_task("synthetic:facts", split="train")
        assert is_sharded(model)
        with pytest.raises(LayercardError, match="sharded over 2 processes"):  # coupling needs it whole
            compute_card(loaded, task, CardConfig(**{**FSDP_CARD, "coupling": True}))
        # 3 micro-batches for 2 processes: one would wait in the other's weight gather for good
        with pytest.raises(LayercardError, match=r"sharded over 2 processes .* 3 micro-batches of 2 must"):
            compute_card(loaded, task, CardConfig(**{**FSDP_CARD, "examples": 6}))
        card = compute_card(loaded, task, CardConfig(**FSDP_CARD), progress=False)
        if dist.get_rank() == 0:
            card.save(out / "card.json")
    finally:
        dist.destroy_process_group()


def test_card_of_an_fsdp_sharded_model_equals_one(tmp_path: Path) -> None:
    """Sharded weights, whole activations and output gradients: the hooks' sums are those of one process."""
    from layercard.card import CardConfig, compute_card

    loaded = _loaded()
    one = compute_card(loaded, load_task("synthetic:facts", split="train"), CardConfig(**FSDP_CARD))
    one.save(tmp_path / "one" / "card.json")
    _launch([__file__, "fsdp-card", str(tmp_path / "two")], tmp_path, torchrun=True)
    _numbers_equal(_card_numbers(tmp_path / "one"), _card_numbers(tmp_path / "two"))


@pytest.mark.parametrize(
    ("model", "extra", "says"),
    [
        ("tiny", "--processes 0", "--processes 0: must be at least 1"),
        ("tiny", "--processes -2", "--processes -2: must be at least 1"),
        pytest.param(
            "tiny",
            "--processes 2 --device cuda",
            "--processes 2: device 'cuda': CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
        # found by the workers: their error comes back as the command's one line
        ("missing", "--processes 2 --device cpu", "no such local folder"),
    ],
)
def test_bad_processes_say_so_in_one_line(
    tiny_folder: Path, tmp_path: Path, model: str, extra: str, says: str
) -> None:
    out = tmp_path / "card"
    folder = tiny_folder if model == "tiny" else tmp_path / "missing"
    r = CliRunner().invoke(
        app, f"card -m {folder} -o {out} -t synthetic:facts --no-calibrate {extra}".split()
    )
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and says in lines[0], r.output
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# Training


def _loaded() -> LoadedModel:
    model = tiny_model("llama")
    return LoadedModel(model, tiny_tokenizer(), "tiny-llama", models.weights_hash(model), "tiny")


def _plan(loaded: LoadedModel) -> Plan:
    """LoRA rank 4 on q,v of every layer, no dropout: the run is a function of the seed and data."""
    units = models.units(loaded.model, "q,v")
    names = [u.name for u in units]
    return Plan.from_dict(
        {
            "kind": "plan",
            "schema_version": 1,
            "provenance": {},
            "card": {"model_id": loaded.model_id, "model_hash": loaded.model_hash, "task": "facts"},
            "config": {"policy": "test"},
            "adapter_kind": "lora",
            "units": [
                {"key": u.key, "layer": u.layer, "role": u.role, "name": u.name, "rank": 4} for u in units
            ],
            "layers": sorted({u.layer for u in units}),
            "predicted": {
                "step_time_s": 0.05,
                "params": 0,
                "modules": len(units),
                "gain": 1.0,
                "calibration_batch_positions": 100,
                "step_time_position_share": 0.5,
            },
            "lora_config": {
                "r": 4,
                "lora_alpha": 8,
                "lora_dropout": 0.0,
                "target_modules": names,
                "rank_pattern": dict.fromkeys(names, 4),
                "alpha_pattern": {},
                "bias": "none",
                "task_type": "CAUSAL_LM",
            },
            "adapter_config": None,
        }
    )


def _cfg(batch_size: int) -> TrainConfig:
    """A few steps on 16 examples (a whole number of global batches of 4, so epochs line up)."""
    return TrainConfig(
        steps=TRAIN_STEPS,
        batch_size=batch_size,
        lr=1e-2,
        max_length=64,
        train_examples=16,
        eval_examples=0,
        checkpoint_every=0,
    )


def _train(out: Path, batch_size: int) -> dict[str, Any]:
    loaded = _loaded()
    task = load_task("synthetic:facts", split="train")
    return train(loaded, _plan(loaded), task, None, _cfg(batch_size), out)


def test_training_in_two_processes_equals_one(tmp_path: Path) -> None:
    """2 processes × batch 2 take the examples one process takes at batch 4: the same loss curve."""
    one = _train(tmp_path / "one", 4)
    _launch([__file__, "train", str(tmp_path / "two"), "2"], tmp_path)
    two = json.loads((tmp_path / "two" / "train_metrics.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    a = [v for _, v in one["loss_curve"]]
    b = [v for _, v in two["loss_curve"]]
    assert len(a) == len(b) == TRAIN_STEPS
    assert a[-1] < a[0]  # it learns: the curves compared are not flat
    assert b == pytest.approx(a, rel=1e-4)

    # each process computes its own micro-batches, and is priced at them: the first process's here
    loaded, task, cfg = _loaded(), load_task("synthetic:facts", split="train"), _cfg(2)
    data = prepare_data(loaded, task, None, cfg)
    stream = Stream(data.encoded, cfg.batch_size, data.pad_id, cfg.seed)
    mine, largest = run_positions(stream, TRAIN_STEPS, cfg.grad_accum, 2, 0)
    assert (two["batch_positions_per_step"], two["max_batch_positions"]) == (pytest.approx(mine), largest)
    priced = priced_at(_plan(loaded).predicted, mine, largest)["step_time_scaled_s"]
    assert two["predicted_step_time_scaled_s"] == pytest.approx(priced)
    # the dry run for two processes: the same steps and epochs, the busiest process's positions
    est = estimate(loaded, _plan(loaded), task, None, cfg, data=data, processes=2)
    assert (est["processes"], est["steps"], est["epochs"]) == (2, two["steps"], pytest.approx(two["epochs"]))
    busiest = max(run_positions(stream, TRAIN_STEPS, cfg.grad_accum, 2, r)[0] for r in (0, 1))
    assert est["positions_per_step"] == pytest.approx(busiest) and busiest >= mine


# Validated every step, with a clipping cap under the tiny model's gradient norms at most steps: early
# stopping, the best weights and clipping all act within the run.
BEST = dict(steps=24, lr=0.05, eval_examples=8, eval_every=1, early_stopping=2, max_grad_norm=0.05)


def _train_best(out: Path, batch_size: int) -> dict[str, Any]:
    loaded = _loaded()
    task = load_task("synthetic:facts", split="train")
    val = load_task("synthetic:facts", split="test")
    cfg = dataclasses.replace(_cfg(batch_size), **BEST)
    return train(loaded, _plan(loaded), task, val, cfg, out)


def test_early_stopping_best_weights_and_clipping_in_two_processes_equal_one(tmp_path: Path) -> None:
    """The validation loss both processes share decides the stop and the best weights, and the clipped
    gradient is the averaged one: two processes at batch 2 stop, keep and clip as one at batch 4."""
    one = _train_best(tmp_path / "one", 4)
    assert one["stopped_early"] and one["steps"] < BEST["steps"], "the run must stop early to say anything"
    assert one["best_step"] < one["steps"] and 0 < one["clipped_steps"]
    _launch([__file__, "train-best", str(tmp_path / "two"), "2"], tmp_path)
    two = json.loads((tmp_path / "two" / "train_metrics.json").read_text())
    assert two["world_size"] == 2
    for key in ("steps", "stopped_early", "best_step", "clipped_steps"):
        assert two[key] == one[key], key
    assert [s for s, _ in two["val_curve"]] == [s for s, _ in one["val_curve"]]
    assert [v for _, v in two["val_curve"]] == pytest.approx([v for _, v in one["val_curve"]], rel=1e-4)
    assert [v for _, v in two["loss_curve"]] == pytest.approx([v for _, v in one["loss_curve"]], rel=1e-4)
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-6) for k in a)


if __name__ == "__main__":  # a launched worker
    torch.set_num_threads(1)
    if sys.argv[1] == "train":
        _train(Path(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "train-best":
        _train_best(Path(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "fsdp-card":
        _fsdp_card(Path(sys.argv[2]))


def test_processes_on_a_gpu_other_than_the_first_are_refused(monkeypatch) -> None:
    # Worker r takes cuda:r: a --device index would be dropped, so it is refused (no GPU needed to check).
    from layercard.card import distributed
    from layercard.errors import LayercardError

    monkeypatch.setattr(models, "resolve_device", lambda spec: torch.device(spec))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.check_processes(2, "cuda") == torch.device("cuda")
    assert distributed.check_processes(2, "cuda:0") == torch.device("cuda", 0)
    with pytest.raises(LayercardError, match=r"--device cuda:1: the processes take cuda:0 to cuda:1; choose"):
        distributed.check_processes(2, "cuda:1")
