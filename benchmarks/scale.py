"""Scale: the card's probe pass against one LoRA training step on a Llama-3.2-1B-shaped model (CPU).

The model is built from the published Llama-3.2-1B configuration (hidden 2048, 16 layers, 32 heads, 8
key-value heads, intermediate 8192, vocabulary 128256, tied embeddings) with random weights in float32.
Both sides see the same tokens: one micro-batch of 4 sequences of 128 tokens (a character-level
tokenizer over a generated task, 40 target tokens per sequence).

- ``train_step``: LoRA r=8 on every linear module of every layer (PEFT), forward + backward + AdamW
  step; one warm-up step, then the median of ``--steps`` timed steps.
- ``card*``: the card's probe loop as ``compute_card`` runs it (every role, no coupling, no
  calibration): per layer group one pass that fills the float64 accumulators, then that group's
  statistics, dropping the group's unit gradients after them as ``compute_card`` does without coupling
  (the ``_keep`` variants keep them, as it does with coupling). Pass time and statistics time are
  measured apart. Without a sketch the statistics eigen-decompose one 8192×8192 covariance per layer
  (about a minute each on 2 cores): they are not run there, and only the pass is timed.

Every configuration runs in its own process, so peak memory (the process's peak resident size in the
measured window, ``layercard.cost``) is that configuration's alone. Results are kept per configuration
under ``OUT/measured/``, so a second run only measures what is missing; a configuration whose estimated
peak exceeds the memory this machine has free is recorded as skipped, with the estimate.

    .venv/bin/python benchmarks/scale.py [--out benchmarks/results/scale/cpu] [--threads 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "scale" / "cpu"

# Llama-3.2-1B's published configuration (config.json of the release).
LLAMA_3_2_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=1,  # inside the character vocabulary below (the release uses 128000/128001)
    eos_token_id=1,
    pad_token_id=0,
)
ROLES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQUENCES, SEQ_LEN, TARGET_CHARS, RANK = 4, 128, 40, 8

CONFIGS: dict[str, dict[str, Any]] = {
    "train_step": {"kind": "train"},
    "card": {"kind": "card", "layer_groups": 1, "sketch": None},
    # As compute_card runs without coupling: each group's unit gradients are dropped after its statistics.
    "card_groups4": {"kind": "card", "layer_groups": 4, "sketch": None, "keep_gradients": False},
    # Every input projected to the hidden size (2048 here).
    "card_sketch2048": {"kind": "card", "layer_groups": 1, "sketch": 2048},
    # The default card: `sketch: auto` caps K at 512 (AUTO_SKETCH_MAX).
    "card_sketch512": {"kind": "card", "layer_groups": 1, "sketch": 512},
    "card_groups4_sketch512": {"kind": "card", "layer_groups": 4, "sketch": 512, "keep_gradients": False},
    # As compute_card runs with coupling, which reads every unit's gradient: they are kept to the end.
    "card_groups4_keep": {"kind": "card", "layer_groups": 4, "sketch": None, "keep_gradients": True},
    "card_groups4_sketch512_keep": {
        "kind": "card",
        "layer_groups": 4,
        "sketch": 512,
        "keep_gradients": True,
    },
}


# ---------------------------------------------------------------------------------------------------------
# Worker: one configuration in this process


def _tokenizer():
    """The placement benchmark's character-level chat tokenizer (ids 0-74; the model's vocabulary is far
    larger). Loaded from its file: importing the placement package would pin a BLAS kernel here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_placement_tiny", HERE / "placement" / "tiny.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.char_tokenizer()


def _task(folder: Path):
    """SEQUENCES generated examples long enough that each fills SEQ_LEN tokens with a target of 40."""
    import random

    from layercard.tasks import load_task

    rng = random.Random(0)

    def words(n_chars: int) -> str:
        text = ""
        while len(text) < n_chars:
            text += "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8))) + " "
        return text[:n_chars].strip()

    path = folder / "scale.jsonl"
    rows = [{"input": words(3 * SEQ_LEN), "target": words(TARGET_CHARS)} for _ in range(SEQUENCES)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_task(str(path))


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**LLAMA_3_2_1B)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    return model.eval()


def _batch(tok, task) -> tuple[dict[str, Any], int]:
    from layercard.tasks import batches, count_target_tokens, encode_task

    enc = encode_task(tok, task, max_length=SEQ_LEN)
    (batch,) = list(batches(enc, SEQUENCES, tok.pad_token_id))
    return batch, count_target_tokens(enc)


def _train(model, batch: dict[str, Any], n_target: int, steps: int, device) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from layercard.cost import peak_memory, reset_peak_memory
    from layercard.tasks.loss import forward_loss

    start = reset_peak_memory(device)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=ROLES, bias="none")
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    times = []
    for _ in range(1 + steps):
        t = time.perf_counter()
        # As training runs it: the LM head only at the positions whose next token is a target.
        loss, _ = forward_loss(peft_model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        (loss / n_target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    peak, kind = peak_memory(device)
    return {
        "warmup_s": times[0],
        "steps_s": times[1:],
        "time_s": statistics.median(times[1:]),
        "trainable_params": sum(p.numel() for p in trainable),
        "start_mib": start,
        "peak_mib": peak,
        "peak_kind": kind,
    }


def _card(model, tok, task, spec: dict[str, Any], device) -> dict[str, Any]:
    """compute_card's probe loop (layercard/card/compute.py), with the statistics timed apart."""
    import torch

    from layercard import models
    from layercard.card.compute import _finish_pass, _layer_chunks
    from layercard.card.probe import make_accumulators, run_probe
    from layercard.config import CardConfig
    from layercard.cost import peak_memory, reset_peak_memory

    cfg = CardConfig(
        roles="all-linear",
        examples=SEQUENCES,
        max_length=SEQ_LEN,
        batch_size=SEQUENCES,
        calibrate=False,
        coupling=False,
        layer_groups=spec["layer_groups"],
        sketch=spec["sketch"],
    )
    batch, n_target = _batch(tok, task)
    specs = models.units(model, models.parse_roles(cfg.roles))
    with_stats = cfg.sketch is not None
    keep = spec.get("keep_gradients", True)
    start = reset_peak_memory(device)
    torch.manual_seed(cfg.seed)
    kept: dict[str, torch.Tensor] = {}
    pass_s, stats_s, loss = [], 0.0, 0.0
    for chunk in _layer_chunks([s.layer for s in specs], cfg.layer_groups):
        accs = make_accumulators(
            [s for s in specs if s.layer in set(chunk)],
            lora_rank=cfg.lora_rank,
            a_draws=cfg.a_draws,
            seed=cfg.seed,
            sketch=cfg.sketch,
            device=device,
        )
        t = time.perf_counter()
        loss = run_probe(model, [batch], accs, n_target_tokens=n_target, start_layer=min(chunk))
        pass_s.append(time.perf_counter() - t)
        if with_stats:
            t = time.perf_counter()
            _, _, grads, _ = _finish_pass(accs, cfg, n_target, keep_grads=keep)
            stats_s += time.perf_counter() - t
            if keep:
                kept.update(grads)
            del grads
        elif keep:  # what compute_card keeps of a pass: each unit's gradient (coupling reads them)
            kept.update({a.spec.key: a.grad.cpu() for a in accs})
        del accs
    peak, kind = peak_memory(device)
    return {
        "pass_s": pass_s,
        "time_s": sum(pass_s),
        "stats_s": stats_s if with_stats else None,
        "time_with_stats_s": sum(pass_s) + stats_s if with_stats else None,
        "loss": loss,
        "units": len(specs),
        "kept_gradients_mib": sum(g.numel() * g.element_size() for g in kept.values()) / 2**20,
        "start_mib": start,
        "peak_mib": peak,
        "peak_kind": kind,
    }


def worker(name: str, threads: int, steps: int) -> dict[str, Any]:
    import torch

    from layercard.artifacts import machine_info

    torch.set_num_threads(threads)
    spec = CONFIGS[name]
    t0 = time.perf_counter()
    model = _model()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())  # before LoRA adds its own
    tok = _tokenizer()
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        task = _task(Path(tmp))
        batch, n_target = _batch(tok, task)
        load = os.getloadavg()[0]
        if spec["kind"] == "train":
            res = _train(model, batch, n_target, steps, device)
        else:
            res = _card(model, tok, task, spec, device)
    return {
        "config": name,
        **spec,
        **res,
        "threads": threads,
        "steps": steps,
        "tokens": int(batch["attention_mask"].sum()),
        "padded_tokens": int(batch["input_ids"].numel()),
        "target_tokens": n_target,
        "params": params,
        "model_build_s": build_s,
        "load_avg_before": round(load, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


# ---------------------------------------------------------------------------------------------------------
# Runner: every configuration in its own process


def _estimate_mib(name: str) -> float:
    """A rough peak for ``name``: the weights, float64 accumulators the loop holds, activations."""
    c = LLAMA_3_2_1B
    h, f, n_layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f
    weights = 4 * (per_layer * n_layers + v * h)
    activations = 3 * 2**30  # logits and per-layer activations for 512 tokens, with room
    spec = CONFIGS[name]
    if spec["kind"] == "train":  # LoRA keeps every adapted module's input for backward: about twice as much
        return (weights + 2 * activations) / 2**20
    # kept for every unit until the card is done, or one group's at a time
    grads = 8 * per_layer * n_layers // (1 if spec.get("keep_gradients", True) else spec["layer_groups"])
    k = spec["sketch"]
    cov = [h, h, h, f] if k is None else [min(k, d) for d in (h, h, h, f)]
    layers_at_once = -(-n_layers // spec["layer_groups"])
    sigmas = 8 * sum(d * d for d in cov) * layers_at_once
    return (weights + grads + sigmas + activations) / 2**20


def _available_mib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def recorded_settings(rec: dict[str, Any]) -> dict[str, Any]:
    """The torch threads and timed training steps a record was measured at (steps: training only).
    Records written before they were stored were measured at this script's defaults then, 2 threads on
    the 2-CPU machine, and hold one time per timed step."""
    out = {"threads": rec.get("threads", 2)}
    if rec.get("kind") == "train":
        out["steps"] = rec.get("steps", len(rec.get("steps_s") or []))
    return out


def run(out: Path, threads: int, steps: int, names: list[str], force: bool) -> None:
    from layercard.artifacts import write_json

    runs = out / "measured"
    runs.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = runs / f"{name}.json"
        if path.exists() and not force:
            rec = json.loads(path.read_text())
            if "skipped" not in rec:
                want = {"threads": threads, "steps": steps}
                have = recorded_settings(rec)
                differ = [f"{k} {v}" for k, v in have.items() if v != want[k]]
                if differ:
                    raise SystemExit(
                        f"{path} was measured at {', '.join(differ)}: give those, or --force to measure again"
                    )
            print(f"{name}: kept from {path}", flush=True)
            continue
        est, free = _estimate_mib(name), _available_mib()
        if free is not None and est > 0.9 * free:
            res = {"config": name, **CONFIGS[name], "skipped": "estimated peak exceeds free memory",
                   "estimated_peak_mib": round(est), "available_mib": round(free)}  # fmt: skip
            write_json(path, res)
            print(f"{name}: skipped (estimated {est / 1024:.1f} GiB, {free / 1024:.1f} GiB free)", flush=True)
            continue
        print(f"{name}: running (estimated peak {est / 1024:.1f} GiB) ...", flush=True)
        cmd = [sys.executable, __file__, "--worker", name, f"--threads={threads}", f"--steps={steps}"]
        env = {**os.environ, "LAYERCARD_PROGRESS": "0", "OMP_NUM_THREADS": str(threads)}
        # If memory runs out after all, the kernel should stop this measurement, not another process.
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=_oom_first)
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-3000:])
            raise SystemExit(f"{name} failed (exit {p.returncode})")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        res["estimated_peak_mib"] = round(est)
        write_json(path, res)
        print(f"{name}: {res['time_s']:.1f} s, peak {res['peak_mib'] / 1024:.2f} GiB", flush=True)
    summarize(out)


def _oom_first() -> None:
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def summarize(out: Path) -> dict[str, Any]:
    """scale.json, scale.md and scale.png from whatever configurations are recorded."""
    recs = {p.stem: json.loads(p.read_text()) for p in sorted((out / "measured").glob("*.json"))}
    train = recs.get("train_step")
    rows = []
    for name in CONFIGS:
        r = recs.get(name)
        if r is None:
            continue
        row: dict[str, Any] = {
            "config": name,
            **{k: CONFIGS[name].get(k) for k in ("layer_groups", "sketch")},
        }
        if "skipped" in r:
            row.update(skipped=r["skipped"], estimated_peak_mib=r["estimated_peak_mib"])
            rows.append(row)
            continue
        row.update(
            time_s=round(r["time_s"], 2),
            time_with_stats_s=None
            if r.get("time_with_stats_s") is None
            else round(r["time_with_stats_s"], 2),
            peak_mib=round(r["peak_mib"]),
            added_mib=round(r["peak_mib"] - r["start_mib"]) if r.get("start_mib") is not None else None,
        )
        if train is not None and name != "train_step" and "skipped" not in train:
            row["time_ratio"] = round(r["time_s"] / train["time_s"], 3)
            if r.get("time_with_stats_s") is not None:
                row["time_with_stats_ratio"] = round(r["time_with_stats_s"] / train["time_s"], 3)
            row["peak_ratio"] = round(r["peak_mib"] / train["peak_mib"], 3)
            if row["added_mib"] is not None and train.get("start_mib") is not None:
                row["added_ratio"] = round(row["added_mib"] / (train["peak_mib"] - train["start_mib"]), 3)
        rows.append(row)
    any_run = next((r for r in recs.values() if "skipped" not in r), {})
    summary = {
        "kind": "scale_benchmark",
        "model": {
            "shape": "Llama-3.2-1B (published config), random weights",
            "dtype": "float32",
            "params": any_run.get("params"),
            **LLAMA_3_2_1B,
        },  # fmt: skip
        "tokens": {
            "sequences": SEQUENCES,
            "length": SEQ_LEN,
            "padded_tokens": any_run.get("padded_tokens"),
            "target_tokens": any_run.get("target_tokens"),
        },  # fmt: skip
        "train_step": {"lora_rank": RANK, "targets": ROLES, "optimizer": "AdamW"},
        "card": {"roles": "all-linear", "coupling": False, "calibrate": False},
        "goals": {"card_time_ratio_max": 1.3, "card_peak_ratio_max": 1.0},
        "machine": any_run.get("machine"),
        "rows": rows,
        "runs": recs,
    }
    from layercard.artifacts import write_json, write_text

    write_json(out / "scale.json", summary)
    write_text(out / "scale.md", _markdown(summary, train))
    _plot(rows, out / "scale.png")
    return summary


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def _markdown(s: dict[str, Any], train: dict[str, Any] | None) -> str:
    m = s["machine"] or {}
    lines = [
        "# Card against a LoRA training step at 1B scale (CPU)",
        "",
        f"Llama-3.2-1B shape ({_fmt(s['model']['params'], ',')} parameters, random weights, float32); one "
        f"micro-batch of {SEQUENCES} × {SEQ_LEN} tokens ({s['tokens']['target_tokens']} target tokens) for "
        f"both. Training step: LoRA r={RANK} on all 7 linear roles of all 16 layers, forward + backward + "
        "AdamW, median of the timed steps after one warm-up. Card: all-linear, no coupling, no "
        "calibration; time = the probe pass(es); with a sketch the statistics were also run and are "
        "given beside. Peak = the process's peak resident size in the measured window (model included); "
        "added = peak minus the memory in use when the window opened (the model).",
        "",
        f"Machine: {m.get('processor', '?')}, {m.get('cpu_count', '?')} cores, "
        f"{m.get('torch_threads', '?')} torch threads; {m.get('platform', '')}.",
        "",
        "| config | layer groups | sketch | time s | ×train | with stats s | ×train | peak GiB | ×train "
        "| added GiB | ×train |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        if "skipped" in r:
            lines.append(
                f"| {r['config']} | {r['layer_groups'] or ''} | {r['sketch'] or ''} "
                f"| not run: {r['skipped']} (≈ {r['estimated_peak_mib'] / 1024:.1f} GiB) | | | | | | | |"
            )
            continue
        gib = lambda v: None if v is None else v / 1024  # noqa: E731
        lines.append(
            f"| {r['config']} | {r['layer_groups'] or ''} | {r['sketch'] or ''} | {_fmt(r['time_s'], '.1f')} "
            f"| {_fmt(r.get('time_ratio'))} | {_fmt(r.get('time_with_stats_s'), '.1f')} "
            f"| {_fmt(r.get('time_with_stats_ratio'))} | {_fmt(gib(r['peak_mib']))} "
            f"| {_fmt(r.get('peak_ratio'))} | {_fmt(gib(r['added_mib']))} | {_fmt(r.get('added_ratio'))} |"
        )
    passes = [
        f"{r['config']} {', '.join(f'{t:.1f}' for t in r['pass_s'])}"
        for r in s["runs"].values()
        if "pass_s" in r
    ]
    lines += [
        "",
        "`_keep`: the same loop keeping every unit's gradient to the end, as `compute_card` does when it "
        "measures coupling (which reads them); without coupling it drops each group's gradients after its "
        "statistics.",
        "",
        f"Pass times (s): {'; '.join(passes)}.",
        "",
        *(
            [f"Training steps (s): {', '.join(f'{t:.1f}' for t in train['steps_s'])}.", ""]
            if train is not None and "steps_s" in train
            else []
        ),
        "Goals: card time ≤ 1.3× and card peak memory ≤ 1.0× the training step's.",
        "",
        "Reading. A probe pass does what a frozen forward and backward do, plus one GᵀX product per unit "
        "(a full weight gradient's worth of matrix products that a LoRA step never forms) and its float64 "
        "accumulation; each layer group is one more whole pass, so G groups cost about G passes. With "
        "coupling the card keeps every unit's float64 gradient (twice the size of the float32 weights of "
        "the measured modules) until it is done, so layer groups bound the covariances but not the "
        "gradients (the `_keep` rows). Without a sketch the statistics "
        "eigen-decompose a d_in × d_in covariance per input (8192 for the MLP's down projection).",
        "",
        "This machine's 2 cores are shared: the same pass took from 23 to 37 s across runs, so ratios carry "
        "about ±20%.",
        "",
        "Reproduce: `.venv/bin/python benchmarks/scale.py` (one process per configuration; results per "
        "configuration in `runs/`, kept between runs).",
        "",
    ]
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "skipped" not in r]
    if not done:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [r["config"] for r in done]
    a.barh(names, [r["time_s"] for r in done], color="tab:blue", label="pass")
    a.barh(
        names,
        [(r["time_with_stats_s"] or r["time_s"]) - r["time_s"] for r in done],
        left=[r["time_s"] for r in done],
        color="tab:orange",
        label="statistics",
    )
    a.set_xlabel("seconds")
    a.legend(fontsize=8)
    b.barh(names, [r["peak_mib"] / 1024 for r in done], color="tab:gray")
    b.set_xlabel("peak resident GiB")
    b.set_yticklabels([])
    for ax, key in ((a, "time_s"), (b, "peak_mib")):
        base = next((r[key] for r in done if r["config"] == "train_step"), None)
        if base is not None:
            ax.axvline(base / (1024 if key == "peak_mib" else 1), color="k", lw=0.8, ls="--")
    fig.suptitle("Card vs LoRA training step, Llama-3.2-1B shape, CPU (dashed: training step)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps after one warm-up")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--force", action="store_true", help="measure again what is recorded")
    ap.add_argument("--summarize", action="store_true", help="only rewrite scale.json/md/png")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.threads, args.steps)))
        return
    if args.summarize:
        summarize(args.out)
        return
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    run(args.out, args.threads, args.steps, names, args.force)


if __name__ == "__main__":
    main()
