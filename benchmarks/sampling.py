"""How far a placement's fraction of the reference's drop moves with the test examples it is measured on.

The quality runs (benchmarks/quality.py) measure each adapter on a few dozen test examples; the same
adapters measured on a larger test set came out lower on both choosing tasks. Whether that is a bias of
fractions measured on few examples or one draw of examples shared by every placement cannot be told from
one subset. This script retrains the reference and a few placements of quality.py's grid at seed 0 (the
same settings, so the same adapters), records every example's summed loss and target-token count on the
task's larger test set (as ``quality.py run --wide``) for them and for the base model, and then draws many
random subsets of the sizes the benchmarks use: each subset's fraction against the fraction on the whole
larger set, and how much of a subset's error every placement shares. ``run-v2`` does the same for the four
tasks the quality model was fitted on neither, as placement_v2.py trains them (its cards and settings,
seed 0): the reference and two of its rules at params=0.25x, on 256 examples of each test split, in which
the benchmark's own 48-64 are nested. Nothing is fitted to these runs; they say how far a label measured
on the benchmark's own subset sits from one measured on more examples.

    .venv/bin/python benchmarks/sampling.py run [--tasks e2e_nlg,sst2] [--threads 2]
    .venv/bin/python benchmarks/sampling.py run-v2 [--tasks gsm8k,samsum,facts,format]
    .venv/bin/python benchmarks/sampling.py report      # writes results/quality/sampling.{json,md}

One JSON per run under results/quality/runs/sampling/, so ``run`` resumes where it stopped.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import quality as Q

from layercard.evaluate import fraction_standard_error

OUT = Q.RESULTS / "runs" / "sampling"
# The reference and three placements over one, three and six depth bands.
NAMES = ("ref", "qv-all-r8", "lin-last8-r8", "lin-mid1-r8")
# Subset sizes: the unseen tasks' 48-64 test examples and the choosing tasks' usual 64 and 96.
SIZES = (48, 64, 96)
DRAWS = 2000
# The tasks the quality model was fitted on neither, as placement_v2.py trains them (its card, settings and
# seed 0): the reference and two of its rules at params=0.25x, one over every layer and one over the last
# few; the larger test set is LARGER examples of the same split (the benchmark's own 48-64 nested in it).
OUT_V2 = Q.RESULTS / "runs" / "sampling_v2"
V2_TASKS = ("gsm8k", "samsum", "facts", "format")
V2_NAMES = {"ref": ("reference", None), "peft-default": ("peft-default", "params=0.25x"),
            "last-n": ("last-n", "params=0.25x")}  # fmt: skip
LARGER = 256


def _per_example(loaded: Any, test: Any, setting: Any, adapter: Path | None) -> tuple[list[float], list[int]]:
    """Every example's summed target loss and target-token count in the task's order, as layercard's eval
    keeps them."""
    import contextlib

    from layercard.adapters import attached
    from layercard.inference import eval_example_losses

    ctx = attached(loaded.model, adapter) if adapter is not None else contextlib.nullcontext(loaded.model)
    with ctx as net:
        return eval_example_losses(
            net, loaded.tokenizer, test, test.examples, batch_size=16, max_length=setting.max_length
        )


def _write(path: Path, rec: dict[str, Any]) -> None:
    from layercard.artifacts import write_json

    loss = sum(rec["sums"]) / sum(rec["tokens"])
    if not np.isfinite(loss):
        raise SystemExit(f"{path.name}: non-finite test loss, nothing written")
    write_json(path, {**rec, "test_loss_wide": loss})
    print(f"{path.stem}: larger-set loss {loss:.6f}", flush=True)


def _base_record(loaded: Any, path: Path, task: str, larger: Any, usual: set[Any], s: Any) -> None:
    """The base model's per-example losses on ``larger``, marking the benchmark's own subset (``usual``)."""
    if not path.is_file():
        sums, tokens = _per_example(loaded, larger, s, None)
        in_usual = [ex in usual for ex in larger.examples]
        _write(path, {"task": task, "name": "base", "sums": sums, "tokens": tokens, "in_usual": in_usual})


def _run_record(
    loaded: Any, path: Path, plan: Any, train_task: Any, cfg: Any, larger: Any, s: Any, rec: dict[str, Any]
) -> None:
    """``plan`` trained with ``cfg`` and its per-example losses on ``larger``, written with ``rec``."""
    from layercard.train import train

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sampling-") as tmp:
        train(loaded, plan, train_task, None, cfg, tmp, progress=False)
        sums, tokens = _per_example(loaded, larger, s, Path(tmp) / "adapter")
    _write(path, {**rec, "sums": sums, "tokens": tokens, "wall_s": round(time.perf_counter() - t0, 1)})


def run(tasks: list[str], threads: int) -> None:
    import torch

    from layercard import load_model, load_task

    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    for name in tasks:
        s = Q.TASKS[name]
        train_task = load_task(f"{name}:{s.train_split}")
        card = Q._card(loaded, train_task.subset(Q.TRAIN_EXAMPLES, seed=Q.SEED), s)
        whole = Q._wide_base(loaded, name, s)
        usual = set(load_task(f"{name}:{s.test_split}").subset(s.test_examples, seed=Q.SEED).examples)
        _base_record(loaded, OUT / f"{name}-base.json", name, whole, usual, s)
        for p in Q.GRID:
            path = OUT / f"{name}-{p.name}.json"
            if p.name in NAMES and not path.is_file():
                plan, cfg = Q._plan_and_settings(card, s, p, Q.SEED)
                rec = {"task": name, "name": p.name, "seed": Q.SEED}
                _run_record(loaded, path, plan, train_task, cfg, whole, s, rec)


def run_v2(tasks: list[str], threads: int) -> None:
    import placement_v2 as P
    import torch

    from layercard import load_model, load_task

    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    for name in tasks:
        s = P.TASKS[name]
        train_task = load_task(s.train).subset(P.TRAIN_EXAMPLES, seed=0)
        card = P._card(loaded, train_task, s)
        split = load_task(s.test)
        larger = split.subset(min(LARGER, len(split)), seed=0)
        usual = set(split.subset(s.test_examples, seed=0).examples)
        _base_record(loaded, OUT_V2 / f"{name}-base.json", name, larger, usual, s)
        for short, (candidate, budget) in V2_NAMES.items():
            path = OUT_V2 / f"{name}-{short}.json"
            if path.is_file():
                continue
            plan, why = P.plan_for(card, candidate, budget)
            if plan is None:
                raise SystemExit(f"{name} {candidate} {budget}: does not fit ({why})")
            rec = {"task": name, "name": short, "seed": 0, "signature": P.signature(plan)}
            _run_record(loaded, path, plan, train_task, P._train_cfg(s, 0), larger, s, rec)


def subset_fractions(
    base: np.ndarray, ref: np.ndarray, run: np.ndarray, tokens: np.ndarray, picks: np.ndarray
) -> np.ndarray:
    """The run's fraction of the reference's drop on each subset (a row of ``picks``: example indices),
    each loss the subset's summed per-example losses over its target tokens, as the benchmarks measure."""
    n = tokens[picks].sum(axis=1)
    b, r, x = (v[picks].sum(axis=1) / n for v in (base, ref, run))
    return (b - x) / (b - r)


def _analyse(recs: dict[str, dict[str, Any]], names: list[str], seed: int) -> dict[str, Any]:
    """One task's spread of fractions over random subsets (``recs``: per-example records of the base, the
    reference and ``names``, on one larger test set whose base record marks the benchmark's own subset)."""
    tokens = np.asarray(recs["base"]["tokens"], dtype=float)
    base, ref = (np.asarray(recs[k]["sums"]) for k in ("base", "ref"))
    usual = np.flatnonzero(recs["base"]["in_usual"])
    whole = np.arange(len(tokens))[None, :]
    res: dict[str, Any] = {"examples": len(tokens), "usual_examples": len(usual), "placements": {}}
    runs = {n: np.asarray(recs[n]["sums"]) for n in names}
    se_usual = {n: fraction_standard_error(base[usual].tolist(), ref[usual].tolist(), runs[n][usual].tolist())
                for n in names}  # fmt: skip
    full = {n: float(subset_fractions(base, ref, runs[n], tokens, whole)[0]) for n in names}
    on_usual = {n: float(subset_fractions(base, ref, runs[n], tokens, usual[None, :])[0]) for n in names}
    rng = np.random.default_rng(seed)
    for size in SIZES:
        if size >= len(tokens):
            continue
        picks = np.stack([rng.choice(len(tokens), size, replace=False) for _ in range(DRAWS)])
        errs = np.stack([subset_fractions(base, ref, runs[n], tokens, picks) - full[n] for n in names])
        shared = errs.mean(axis=0)  # what every placement's fraction moved by together on a draw
        res.setdefault("sizes", {})[str(size)] = {
            "mean_error": float(errs.mean()),
            "mean_abs_error": float(np.abs(errs).mean()),
            "sd": float(errs.std()),
            "shared_sd": float(shared.std()),
            "own_sd": float((errs - shared).std()),
            "share_above_full": float((errs > 0).mean()),
        }
        fpc = math.sqrt((len(tokens) - size) / (len(tokens) - 1))  # drawn without replacement
        for i, n in enumerate(names):
            formula = [
                fraction_standard_error(base[pk].tolist(), ref[pk].tolist(), runs[n][pk].tolist())
                for pk in picks
            ]
            keep = {"whole": full[n], "usual_subset": on_usual[n], "usual_subset_se": se_usual[n]}
            res["placements"].setdefault(n, keep)[str(size)] = {
                "mean": float(full[n] + errs[i].mean()),
                "sd": float(errs[i].std()),
                "mean_abs_error": float(np.abs(errs[i]).mean()),
                # what fraction_standard_error gives on one subset, scaled to drawing without replacement
                "formula_se": float(np.mean(formula)) * fpc,
            }
    res["usual_minus_whole"] = statistics.fmean(on_usual[n] - full[n] for n in names)
    return res


def _records(folder: Path, task: str, names: tuple[str, ...]) -> dict[str, dict[str, Any]] | None:
    from layercard.artifacts import read_json

    recs = {
        n: read_json(folder / f"{task}-{n}.json")
        for n in ("base", *names)
        if (folder / f"{task}-{n}.json").is_file()
    }
    return recs if {"base", "ref"} <= set(recs) and len(recs) >= 3 else None


def report() -> dict[str, Any]:
    import placement_v2 as P

    from layercard.artifacts import read_json, write_json, write_text

    out: dict[str, Any] = {"draws": DRAWS, "sizes": list(SIZES), "tasks": {}}
    for task in Q.TASKS:
        if (recs := _records(OUT, task, NAMES)) is None:
            continue
        names = [n for n in NAMES if n in recs and n != "ref"]
        res = _analyse(recs, names, Q.SEED)
        # the retrained adapters against the committed ``run --wide`` losses: the same runs?
        committed = {n: Q._run_path(task, n, Q.SEED, wide=True) for n in ("ref", *names)}
        res["max_loss_gap_to_committed"] = max(
            abs(recs[n]["test_loss_wide"] - read_json(p)["test_loss_wide"])
            for n, p in committed.items()
            if p.is_file()
        )
        res["source"] = "quality.py (fitted on)"
        out["tasks"][task] = res
    for task in V2_TASKS:
        if (recs := _records(OUT_V2, task, tuple(V2_NAMES))) is None:
            continue
        names = [n for n in V2_NAMES if n in recs and n != "ref"]
        res = _analyse(recs, names, Q.SEED)
        # against placement_v2's committed seed-0 runs, on its own subset of the larger set
        usual = np.flatnonzero(recs["base"]["in_usual"])
        tokens = np.asarray(recs["base"]["tokens"], dtype=float)
        gaps = []
        for n in ("ref", *names):
            sig = recs[n]["signature"]
            path = P._run_path(task, sig, 0)
            if path.is_file():
                mine = float(np.asarray(recs[n]["sums"])[usual].sum() / tokens[usual].sum())
                gaps.append(abs(mine - float(read_json(path)["test_loss"])))
        res["max_loss_gap_to_committed"] = max(gaps) if gaps else None
        res["source"] = "placement_v2.py (fitted on neither)"
        out["tasks"][task] = res
    write_json(Q.RESULTS / "sampling.json", out)
    write_text(Q.RESULTS / "sampling.md", _markdown(out))
    return out


def _markdown(out: dict[str, Any]) -> str:
    lines = [
        "# A fraction of the reference's drop measured on a sample of test examples",
        "",
        f"smollm2, seed 0, {Q.STEPS} steps at lr {Q.LR:g}: quality.py's settings for e2e_nlg and sst2, "
        "placement_v2.py's (its cards and batch sizes) for the others; each adapter's loss on every "
        f"example of the task's larger test set, and its fraction on {out['draws']} random subsets of each "
        "size drawn from that set, against its fraction on the whole set. `shared`: the part of a subset's "
        "error every placement had on that draw (the mean over placements); `own`: the rest. Subsets are "
        "drawn without replacement from the larger set, so where that set is itself a sample of the split "
        "(every task but sst2) the spread at n examples is understated by a factor of about "
        "√((N − n)/(N − 1)) against the whole split. `sampling error`: what "
        "`layercard.evaluate.fraction_standard_error` (the error a report prints beside a measured fraction) "
        "gives on one subset, averaged over the draws and scaled by that factor: it should match the sd.",
        "",
    ]
    for task, res in out["tasks"].items():
        lines += [
            f"## {task}: {res['examples']} examples (the usual subset: {res['usual_examples']} of them)",
            "",
            f"Source: {res['source']}. Retrained adapters against the committed runs' losses (quality.py: "
            "on the larger set; placement_v2.py: on its own subset): largest gap "
            + (
                f"{res['max_loss_gap_to_committed']:.1e} nats."
                if res["max_loss_gap_to_committed"] is not None
                else "—."
            ),
            "",
            "| subset size | mean error | mean abs error | sd | shared sd | own sd | share above whole |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for size, v in res.get("sizes", {}).items():
            lines.append(
                f"| {size} | {v['mean_error']:+.4f} | {v['mean_abs_error']:.3f} | {v['sd']:.3f} | "
                f"{v['shared_sd']:.3f} | {v['own_sd']:.3f} | {v['share_above_full']:.2f} |"
            )
        sizes = list(res.get("sizes", {}))
        lines += [
            "",
            "| placement | whole set | usual subset ± its sampling error | "
            + " | ".join(f"mean ± sd at {n} (sampling error)" for n in sizes)
            + " |",
            "|---|---:|---:|" + "---:|" * len(sizes),
        ]
        for name, v in res["placements"].items():
            cells = " | ".join(
                f"{v[n]['mean']:.3f} ± {v[n]['sd']:.3f} ({v[n]['formula_se']:.3f})" for n in sizes
            )
            lines.append(
                f"| {name} | {v['whole']:.3f} | {v['usual_subset']:.3f} ± {v['usual_subset_se']:.3f} | "
                f"{cells} |"
            )
        lines += [
            "",
            f"The usual subset's fractions minus the whole set's, mean: {res['usual_minus_whole']:+.3f}.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "run-v2", "report"))
    ap.add_argument("--tasks", default="e2e_nlg,sst2")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = ap.parse_args()
    if a.what == "run":
        run(a.tasks.split(","), a.threads)
    if a.what == "run-v2":
        run_v2(a.tasks.split(",") if a.tasks != "e2e_nlg,sst2" else list(V2_TASKS), a.threads)
    res = report()
    print({t: v.get("sizes") for t, v in res["tasks"].items()})


if __name__ == "__main__":
    main()
