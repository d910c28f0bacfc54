"""Card overhead: the card's wall time over a plain forward+backward on the same tokens.

Each measurement runs in its own process (so peak RSS is that measurement's), three repetitions
per mode, interleaved; the ratio is of medians. Results are cached per (mode, repetition) in the
JSON, so an interrupted run resumes where it stopped; a JSON measured with other settings (threads
included) is refused, not overwritten.

    .venv/bin/python benchmarks/card_overhead.py [--examples 64] [--max-length 128] [--reps 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from layercard.config.card import AUTO_EXACT_WIDTH, AUTO_SKETCH_MAX

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_TASK = str(HERE.parent.parent / "shared" / "data" / "e2e_nlg" / "validation.jsonl")


def _setup(args):
    import torch

    from layercard.models import load_model
    from layercard.tasks import batches, count_target_tokens, encode_task, load_task

    torch.manual_seed(0)
    loaded = load_model(args.model)
    task = load_task(args.task).subset(args.examples, seed=0)
    enc = encode_task(loaded.tokenizer, task, max_length=args.max_length)
    pad = loaded.tokenizer.pad_token_id
    bl = list(batches(enc, args.batch_size, pad))
    return loaded, task, bl, count_target_tokens(enc)


def _plain(loaded, bl, n_tgt, trainable: str) -> float:
    """A plain forward+backward over the same micro-batches, the loss computed as training computes it."""

    from layercard import models
    from layercard.tasks import forward_loss

    model = loaded.model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(trainable == "all")
    if trainable == "units":
        for s in models.units(model, args_roles):
            models.get_module(model, s.name).weight.requires_grad_(True)
    t = time.perf_counter()
    for b in bl:
        loss, _ = forward_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
        (loss / n_tgt).backward()
    dt = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return dt


args_roles = "q,v"


def child(args) -> dict:
    global args_roles
    args_roles = args.roles
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    loaded, task, bl, n_tgt = _setup(args)
    # Warm-up on one micro-batch so one-off allocations are not timed in either mode.
    _plain(loaded, bl[:1], n_tgt, "all")
    res: dict = {
        "mode": args.mode,
        "positions": int(sum(int(b["attention_mask"].sum()) for b in bl)),
        "padded_tokens": int(sum(b["input_ids"].numel() for b in bl)),
        "target_tokens": n_tgt,
        "micro_batches": len(bl),
        "threads": torch.get_num_threads(),
    }
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res["load_avg_before"] = round(os.getloadavg()[0], 2)
    if args.mode.startswith("plain"):
        res["wall_s"] = _plain(loaded, bl, n_tgt, args.mode.split("-", 1)[1])
    else:
        from layercard.card import CardConfig, compute_card

        cfg = CardConfig(
            roles=args.roles,
            examples=args.examples,
            max_length=args.max_length,
            batch_size=args.batch_size,
            calibrate=args.mode == "card+calibrate",
            coupling=args.mode == "card+coupling",
        )
        if args.mode == "card+sketch":
            cfg = dataclasses.replace(cfg, sketch=args.sketch)
        elif args.mode == "card-exact":
            cfg = dataclasses.replace(cfg, sketch=None)
        from layercard.tasks import load_task

        t = time.perf_counter()
        card = compute_card(loaded, load_task(args.task), cfg, progress=False)
        res["wall_s"] = time.perf_counter() - t
        res["card_timings"] = card.timings
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["load_avg_after"] = round(os.getloadavg()[0], 2)
    res["rss_before_mib"] = rss0 / 1024
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default=DEFAULT_TASK)
    ap.add_argument("--roles", default="q,v")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--modes", default="plain-all,plain-units,card")
    ap.add_argument("--extra-modes", default="card+calibrate,card+coupling", help="measured once each")
    ap.add_argument("--sketch", type=int, default=AUTO_SKETCH_MAX, help="the card+sketch mode's K")
    ap.add_argument("--out", default=str(RESULTS / "card_overhead"))
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return
    out_json = Path(args.out + ".json")
    state = json.loads(out_json.read_text()) if out_json.exists() else {"runs": {}}
    keys = ("model", "task", "roles", "examples", "max_length", "batch_size", "sketch")
    conf = {k: getattr(args, k) for k in keys} | {"threads": _threads(args.threads)}
    differ = _differ(state.get("config"), conf, state["runs"])
    if differ:
        raise SystemExit(
            f"{out_json} holds runs measured with other settings ({', '.join(differ)}): give the same "
            "ones, or another --out"
        )
    state["config"] = conf
    plan = [(m, r) for r in range(args.reps) for m in args.modes.split(",")]
    plan += [(m, 0) for m in args.extra_modes.split(",") if m]
    for mode, rep in plan:
        key = f"{mode}#{rep}"
        if key in state["runs"]:
            continue
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in conf.items()
        ]
        print(f"running {key} ...", flush=True)
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LAYERCARD_PROGRESS": "0"})
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-3000:])
            raise SystemExit(f"{key} failed")
        state["runs"][key] = json.loads(p.stdout.strip().splitlines()[-1])
        print(
            f"  {state['runs'][key]['wall_s']:.2f} s, peak RSS {state['runs'][key]['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        _write(state, out_json)
    _write(state, out_json)


def _threads(requested: int) -> int:
    """The torch threads a measurement runs with: ``--threads``, or torch's default where it is 0."""
    if requested:
        return requested
    import torch

    return torch.get_num_threads()


def _differ(stored: dict | None, conf: dict, runs: dict) -> list[str]:
    """The settings in which the runs ``stored`` describes differ from ``conf``: none when nothing is
    stored or no run was measured."""
    if stored is None or not runs:
        return []
    old = dict(stored)
    if "threads" not in old:
        # Written before the threads entered the settings: every run records the torch threads it ran
        # with (2 in each committed file, on the 2-CPU machine), which stand for the setting.
        seen = {r.get("threads") for r in runs.values()}
        old["threads"] = seen.pop() if len(seen) == 1 else None
    if "sketch" not in old and not any(k.startswith("card+sketch#") for k in runs):
        old["sketch"] = conf["sketch"]  # written before --sketch, which changes only card+sketch's runs
    return [k for k in conf if old.get(k) != conf[k]]


def _median(state, mode):
    vals = [v["wall_s"] for k, v in state["runs"].items() if k.split("#")[0] == mode]
    return statistics.median(vals) if vals else float("nan"), vals


def _write(state, out_json: Path) -> None:
    from layercard.artifacts import machine_info, package_versions, write_json, write_text

    summ = {}
    for mode in sorted({k.split("#")[0] for k in state["runs"]}):
        med, vals = _median(state, mode)
        rss = [v["peak_rss_mib"] for k, v in state["runs"].items() if k.split("#")[0] == mode]
        summ[mode] = {"median_s": med, "min_s": min(vals), "runs_s": vals, "peak_rss_mib": max(rss)}
    ratios = {}
    for card_mode in ("card", "card-exact", "card+sketch"):
        if card_mode not in summ:
            continue
        cs = summ[card_mode]
        plains = [(m, s) for m, s in summ.items() if m.startswith("plain")]
        ratios |= {f"{card_mode}/{m} (medians)": cs["median_s"] / s["median_s"] for m, s in plains}
        # On a shared machine slow-downs only add time, so the fastest run of each mode is the least
        # disturbed estimate; both are reported.
        ratios |= {f"{card_mode}/{m} (fastest runs)": cs["min_s"] / s["min_s"] for m, s in plains}
    state["summary"] = summ
    state["ratios"] = ratios
    state["machine"] = machine_info()
    state["versions"] = package_versions()
    state["date"] = time.strftime("%Y-%m-%d")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_json, state)
    c = state["config"]
    any_run = next(iter(state["runs"].values()), {})
    lines = [
        "# Card overhead",
        "",
        f"Model {c['model']}, task `{Path(c['task']).parent.name}/{Path(c['task']).name}`, "
        f"{c['examples']} examples "
        f"capped at {c['max_length']} tokens ({any_run.get('positions', '?')} unpadded positions, "
        f"{any_run.get('target_tokens', '?')} target tokens), micro-batch {c['batch_size']}, "
        f"roles {c['roles']}.",
        f"Machine: {state['machine'].get('processor')} · {state['machine'].get('cpu_count')} cores · "
        f"torch threads {any_run.get('threads', '?')} · {state['date']}. Each run in its own process; "
        "medians over repetitions.",
        "",
        "| mode | median wall s | fastest s | runs | peak RSS MiB | 1-min load avg before → after |",
        "|---|---:|---:|---|---:|---|",
    ]
    for m, s in summ.items():
        loads = [
            f"{v.get('load_avg_before', float('nan')):.1f}→{v.get('load_avg_after', float('nan')):.1f}"
            for k, v in state["runs"].items()
            if k.split("#")[0] == m
        ]
        lines.append(
            f"| {m} | {s['median_s']:.2f} | {s['min_s']:.2f} | "
            f"{', '.join(f'{v:.2f}' for v in s['runs_s'])} | "
            f"{s['peak_rss_mib']:.0f} | {', '.join(loads)} |"
        )
    lines += [
        "",
        "Modes: `plain-all` = forward+backward with every weight trainable (a standard backward); "
        "`plain-units` = only the card's units' weights trainable; both compute the loss as training does "
        "(the LM head at the target positions only). `card` = the full card at its default "
        "settings (probe pass + eigen-decompositions + scores; `sketch: auto`, which on a model up to "
        f"{AUTO_EXACT_WIDTH} wide projects the inputs wider than the hidden size to it, and on a wider one "
        f"every input to {AUTO_SKETCH_MAX}; the frozen weights' SNRs only when the "
        "default measures them, see `card_timings.weight_snr_s`), no coupling, no calibration; "
        "`card-exact` the same with every covariance exact (`sketch: off`); `card+sketch` the same "
        f"with inputs wider than {c.get('sketch')} projected to {c.get('sketch')} dimensions (`--sketch`); "
        "`card+calibrate` and `card+coupling` add those (measured once).",
        "",
    ]
    for k, v in ratios.items():
        lines.append(f"- **{k} = {v:.3f}**")
    write_text(out_json.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
