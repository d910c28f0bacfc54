"""How far a placement's fraction of the reference's drop moves with the test examples it is measured on.

The quality runs (benchmarks/quality.py) measure each adapter on a few dozen test examples; the same
adapters measured on a larger test set came out lower on both choosing tasks. Whether that is a bias of
fractions measured on few examples or one draw of examples shared by every placement cannot be told from
one subset. This script retrains the reference and a few placements of quality.py's grid at seed 0 (the
same settings, so the same adapters), records every example's summed loss and target-token count on the
task's larger test set (as ``quality.py run --wide``) for them and for the base model, and then draws many
random subsets of the sizes the benchmarks use: each subset's fraction against the fraction on the whole
larger set, and how much of a subset's error every placement shares.

    .venv/bin/python benchmarks/sampling.py run [--tasks e2e_nlg,sst2] [--threads 2]
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


def _per_example(loaded: Any, test: Any, setting: Any, adapter: Path | None) -> tuple[list[float], list[int]]:
    """Every example's summed target cross-entropy and its target-token count, in the task's order."""
    import contextlib

    import torch

    from layercard.adapters import attached
    from layercard.inference import device_of, eval_mode, pad_id
    from layercard.tasks import batches, encode_task, forward_loss

    encoded = encode_task(loaded.tokenizer, test, max_length=setting.max_length)
    ctx = attached(loaded.model, adapter) if adapter is not None else contextlib.nullcontext(loaded.model)
    sums: list[float] = []
    counts: list[int] = []
    with ctx as net, eval_mode(net), torch.no_grad():
        device = device_of(net)
        for batch in batches(encoded, 1, pad_id(loaded.tokenizer)):
            loss, n = forward_loss(
                net,
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["labels"].to(device),
            )
            sums.append(float(loss))
            counts.append(int(n))
    return sums, counts


def _write(path: Path, rec: dict[str, Any]) -> None:
    from layercard.artifacts import write_json

    loss = sum(rec["sums"]) / sum(rec["tokens"])
    if not np.isfinite(loss):
        raise SystemExit(f"{path.name}: non-finite test loss, nothing written")
    write_json(path, {**rec, "test_loss_wide": loss})
    print(f"{path.stem}: larger-set loss {loss:.6f}", flush=True)


def run(tasks: list[str], threads: int) -> None:
    import torch

    from layercard import load_model, load_task
    from layercard.train import train

    torch.set_num_threads(threads)
    loaded = load_model("smollm2")
    for name in tasks:
        s = Q.TASKS[name]
        train_task = load_task(f"{name}:{s.train_split}")
        card = Q._card(loaded, train_task.subset(Q.TRAIN_EXAMPLES, seed=Q.SEED), s)
        whole = Q._wide_base(loaded, name, s)
        usual = {
            ex for ex in load_task(f"{name}:{s.test_split}").subset(s.test_examples, seed=Q.SEED).examples
        }
        in_usual = [ex in usual for ex in whole.examples]
        path = OUT / f"{name}-base.json"
        if not path.is_file():
            sums, tokens = _per_example(loaded, whole, s, None)
            _write(path, {"task": name, "name": "base", "sums": sums, "tokens": tokens, "in_usual": in_usual})
        for p in Q.GRID:
            path = OUT / f"{name}-{p.name}.json"
            if p.name not in NAMES or path.is_file():
                continue
            plan, cfg = Q._plan_and_settings(card, s, p, Q.SEED)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="sampling-") as tmp:
                train(loaded, plan, train_task, None, cfg, tmp, progress=False)
                sums, tokens = _per_example(loaded, whole, s, Path(tmp) / "adapter")
            _write(
                path,
                {"task": name, "name": p.name, "seed": Q.SEED, "sums": sums, "tokens": tokens,
                 "wall_s": round(time.perf_counter() - t0, 1)},
            )  # fmt: skip


def subset_fractions(
    base: np.ndarray, ref: np.ndarray, run: np.ndarray, tokens: np.ndarray, picks: np.ndarray
) -> np.ndarray:
    """The run's fraction of the reference's drop on each subset (a row of ``picks``: example indices),
    each loss the subset's summed per-example losses over its target tokens, as the benchmarks measure."""
    n = tokens[picks].sum(axis=1)
    b, r, x = (v[picks].sum(axis=1) / n for v in (base, ref, run))
    return (b - x) / (b - r)


def report() -> dict[str, Any]:
    from layercard.artifacts import read_json, write_json, write_text

    out: dict[str, Any] = {"draws": DRAWS, "sizes": list(SIZES), "tasks": {}}
    for task in Q.TASKS:
        recs = {
            n: read_json(OUT / f"{task}-{n}.json")
            for n in ("base", *NAMES)
            if (OUT / f"{task}-{n}.json").is_file()
        }
        if not {"base", "ref"} <= set(recs) or len(recs) < 3:
            continue
        tokens = np.asarray(recs["base"]["tokens"], dtype=float)
        base, ref = (np.asarray(recs[k]["sums"]) for k in ("base", "ref"))
        names = [n for n in NAMES if n in recs and n != "ref"]
        usual = np.flatnonzero(recs["base"]["in_usual"])
        committed = {n: Q._run_path(task, n, Q.SEED, wide=True) for n in ("ref", *names)}
        whole = np.arange(len(tokens))[None, :]
        res: dict[str, Any] = {
            "examples": len(tokens),
            "usual_examples": len(usual),
            # the retrained adapters against the committed ``run --wide`` losses: the same runs?
            "max_loss_gap_to_committed": max(
                abs(recs[n]["test_loss_wide"] - read_json(p)["test_loss_wide"])
                for n, p in committed.items()
                if p.is_file()
            ),
            "placements": {},
        }
        se_usual = {
            n: fraction_standard_error(
                [float(base[j]) for j in usual],
                [float(ref[j]) for j in usual],
                [recs[n]["sums"][j] for j in usual],
            )
            for n in names
        }
        full = {
            n: float(subset_fractions(base, ref, np.asarray(recs[n]["sums"]), tokens, whole)[0])
            for n in names
        }
        on_usual = {
            n: float(subset_fractions(base, ref, np.asarray(recs[n]["sums"]), tokens, usual[None, :])[0])
            for n in names
        }
        rng = np.random.default_rng(Q.SEED)
        for size in SIZES:
            if size >= len(tokens):
                continue
            picks = np.stack([rng.choice(len(tokens), size, replace=False) for _ in range(DRAWS)])
            errs = np.stack(
                [
                    subset_fractions(base, ref, np.asarray(recs[n]["sums"]), tokens, picks) - full[n]
                    for n in names
                ]
            )
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
                x = recs[n]["sums"]
                formula = [
                    fraction_standard_error(base[pk].tolist(), ref[pk].tolist(), [x[j] for j in pk])
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
        out["tasks"][task] = res
    write_json(Q.RESULTS / "sampling.json", out)
    write_text(Q.RESULTS / "sampling.md", _markdown(out))
    return out


def _markdown(out: dict[str, Any]) -> str:
    lines = [
        "# A fraction of the reference's drop measured on a sample of test examples",
        "",
        f"smollm2, quality.py's settings at seed 0 ({Q.STEPS} steps, batch {Q.BATCH}, lr {Q.LR:g}); each "
        "adapter's loss on every example of the task's larger test set, and its fraction on "
        f"{out['draws']} random subsets of each size drawn from that set, against its fraction on the whole "
        "set. `shared`: the part of a subset's error every placement had on that draw (the mean over "
        "placements); `own`: the rest. Subsets are drawn without replacement from the larger set, so where "
        "that set is itself a sample of the split (e2e_nlg) the spread at n examples is understated by a "
        "factor of about √((N − n)/(N − 1)) against the whole split. `sampling error`: what "
        "`layercard.evaluate.fraction_standard_error` (the error a report prints beside a measured fraction) "
        "gives on one subset, averaged over the draws and scaled by that factor: it should match the sd.",
        "",
    ]
    for task, res in out["tasks"].items():
        lines += [
            f"## {task}: {res['examples']} examples (the usual subset: {res['usual_examples']} of them)",
            "",
            f"Retrained adapters against the committed `run --wide` losses: largest gap "
            f"{res['max_loss_gap_to_committed']:.1e} nats.",
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
    ap.add_argument("what", choices=("run", "report"))
    ap.add_argument("--tasks", default="e2e_nlg,sst2")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    a = ap.parse_args()
    if a.what == "run":
        run(a.tasks.split(","), a.threads)
    res = report()
    print({t: v.get("sizes") for t, v in res["tasks"].items()})


if __name__ == "__main__":
    main()
