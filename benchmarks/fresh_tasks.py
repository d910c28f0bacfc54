"""The quality forms, frozen, on tasks none of them has seen: every placement of quality.py's grid
trained on each, its measured fraction set against every form's prediction.

The tasks are built at run time from the project's data folder (nothing is copied), with field mappings that
make them tasks of their own:

- ``e2e_parse``: e2e_nlg turned round. The input is a restaurant description, the target its meaning
  representation (``name[...], eatType[...], ...``): structured extraction, about 40 target tokens.
  Trained on e2e_nlg's validation split (547 examples, all of it), tested on its test split.
- ``gsm8k_answer``: a gsm8k question answered with its final number alone, no working: one to four target
  tokens. Trained on gsm8k's train split, tested on its test split.
- ``samsum_expand``: samsum turned round. The input is a one- or two-sentence summary, the target the chat
  conversation it summarises: long, free generation (cut at 192 tokens with its prompt). Trained on
  samsum's validation split, tested on its test split.
- ``gsm8k_pose``: a gsm8k final answer turned into the word problem it answers: free generation of about
  62 target tokens from a prompt that carries only a number. Trained on gsm8k's train split, tested on its
  test split.
- ``sst2_write``: an sst2 label turned into a line of a review with that sentiment: short free generation
  (about 13 target tokens in the train split's phrases, 24 in the validation split's sentences). Trained on
  sst2's train split, tested on its validation split.

- ``gsm8k_reverse``: a gsm8k worked solution turned back into the word problem it solves: the targets of
  ``gsm8k_pose`` with the whole solution as input instead of the number alone.
- ``sst2_echo``: an sst2 phrase repeated word for word: the targets of ``sst2_write``, each one in its
  own prompt, so nothing is to be composed.
- ``e2e_echo``: an e2e_nlg meaning representation repeated exactly: the targets of ``e2e_parse``, each
  one in its own prompt.

The first three were defined together; the next two later, and the last three later still, each group
before any of its runs. The last three share their targets (and so their target statistics) with an
earlier task each and differ from it only in what the input gives away.

Settings are quality.py's (36 steps of batch 4, AdamW lr 2e-3 constant, LoRA alpha = 2·rank, seed 0, 1000
training examples; the card: 32 examples, all linear roles, exact covariances), with the layer coupling
measured in the same card, and 128 test examples per task. One JSON per run under
results/quality/fresh/runs/, so the script resumes where it stopped.

    LAYERCARD_DATA=../shared/data .venv/bin/python benchmarks/fresh_tasks.py run [--tasks ...] [--only ...]
        [--seed N]                                       # another training seed, under runs/seed{N}/
    .venv/bin/python benchmarks/fresh_tasks.py score     # results/quality/fresh/fresh.{json,md}
    LAYERCARD_DATA=../shared/data .venv/bin/python benchmarks/fresh_tasks.py run \
        --recommend-at peft-default,peft-default-r2,all-linear,last-n   # layercard plan's own picks
    .venv/bin/python benchmarks/fresh_tasks.py rules     # results/quality/fresh/rules.{json,md}

``rules`` sets the practitioners' rules that are in the grid beside what the frozen default would pick
from the grid at each rule's parameter share (the placement it predicts best among those no larger; ties
to the fewer parameters), from the committed runs with no model loaded: q,v on every layer at rank 8
(`peft-default`) and at rank 2 (that rule fitted to about 0.05x by lowering the rank), every linear module
of every layer at rank 2 (`all-linear` at 0.25x) and every linear module of the last 8 layers at rank 8
(`last-n` at about 0.27x). Each difference comes with its sampling error paired over the same test
examples, and, where both placements were re-trained at other seeds, with those seeds' differences.
Beside each it asks ``make_plan`` what it recommends at that share from the task's card (the planner's
whole search); where that placement is not in the grid, ``run --recommend-at RULES`` trains it once per
task (``rec-<matrices>-<layers>-r<rank>``) and ``rules`` compares it with the rule the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "quality" / "fresh"
TEST_EXAMPLES = 128
THREADS = 2


@dataclasses.dataclass(frozen=True)
class Fresh:
    name: str
    dataset: str  # folder of the project's data
    train_split: str
    test_split: str
    field_map: tuple[tuple[str, str], ...]  # task field <- data column
    prompt: str
    max_length: int


TASKS = {
    t.name: t
    for t in (
        Fresh("e2e_parse", "e2e_nlg", "validation", "test", (("input", "target"), ("target", "input")),
              "Write the meaning representation of this restaurant description.\n{input}", 128),
        Fresh("gsm8k_answer", "gsm8k", "train", "test", (("target", "final_answer"),),
              "{input}\nAnswer with the number only.", 192),
        Fresh("samsum_expand", "samsum", "validation", "test", (("input", "target"), ("target", "input")),
              "Write a chat conversation that this summary describes.\n{input}", 192),
        Fresh("gsm8k_pose", "gsm8k", "train", "test", (("input", "final_answer"), ("target", "input")),
              "Write a math word problem whose answer is {input}.", 160),
        Fresh("sst2_write", "sst2", "train", "validation", (("input", "target"), ("target", "input")),
              "Write a {input} line from a movie review.", 96),
        Fresh("gsm8k_reverse", "gsm8k", "train", "test", (("input", "target"), ("target", "input")),
              "Write the math word problem that this worked solution solves.\n{input}", 224),
        Fresh("sst2_echo", "sst2", "train", "validation", (("input", "input"), ("target", "input")),
              "Repeat this line from a movie review word for word.\n{input}", 96),
        Fresh("e2e_echo", "e2e_nlg", "validation", "test", (("input", "input"), ("target", "input")),
              "Repeat this restaurant record exactly.\n{input}", 128),
    )
}  # fmt: skip


def load(t: Fresh, split: str) -> Any:
    """One split of a fresh task, read from the first data root that has its dataset."""
    from layercard import load_task
    from layercard.tasks.data import data_roots

    paths = [r / t.dataset / f"{split}.jsonl" for r in data_roots()]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise SystemExit(f"{t.name}: {t.dataset}/{split}.jsonl not found under {', '.join(map(str, paths))}")
    return load_task(str(path), preset="jsonl", field_map=dict(t.field_map), prompt=t.prompt)


def _setting(t: Fresh) -> Any:
    import quality as Q

    return Q.TaskSetting(t.name, t.train_split, t.test_split, t.max_length, TEST_EXAMPLES)


def _card(loaded: Any, train: Any, t: Fresh) -> Any:
    import quality as Q

    from layercard import CardConfig

    cfg = CardConfig(roles="all-linear", examples=32, max_length=t.max_length, calibrate=False,
                     weight_snr=True, sketch=None, coupling=True)  # fmt: skip
    return Q.cached_card(loaded, train, cfg, OUT / "cards" / t.name)


def _run_path(task: str, name: str, seed: int, batch: int | None = None) -> Path:
    """A run's record: seed 0's under OUT/runs/, another training seed's under OUT/runs/seed{N}/; a run at
    another batch size than quality.py's (``run --batch``) under OUT/runs/batch{B}/ (seed 0 only)."""
    import quality as Q

    if batch is not None and batch != Q.BATCH:
        if seed != 0:
            raise SystemExit("--batch: only at seed 0")
        return OUT / "runs" / f"batch{batch}" / f"{task}-{name}.json"
    folder = OUT / "runs" if seed == 0 else OUT / "runs" / f"seed{seed}"
    return folder / f"{task}-{name}.json"


def recommend_name(label: str) -> str:
    """The run name of a placement the planner recommended, from its label (``mlp · last-26 · r=2`` is
    ``rec-mlp-last-26-r2``): one run per placement, whichever rules' sizes it was recommended at."""
    matrices, layers, rank = label.split(" · ")
    return f"rec-{matrices.replace(',', '')}-{layers}-r{rank.split('=')[1]}"


def run(
    tasks: list[str],
    only: set[str] | None,
    seed: int = 0,
    recommend_at: list[str] | None = None,
    advise_at: list[str] | None = None,
    batch: int | None = None,
) -> None:
    """Train the grid's placements (``only``: some of them) on each task; with ``recommend_at`` (rule names
    of RULES), instead what ``layercard plan`` recommends at each of those rules' parameter shares; with
    ``advise_at``, the placement over all the depth its varied-targets note names there (:func:`advised`)."""
    import quality as Q
    import torch

    from layercard import load_model
    from layercard.artifacts import machine_info, read_json, write_json
    from layercard.train import train

    torch.set_num_threads(THREADS)
    loaded = load_model("smollm2")
    for name in tasks:
        t = TASKS[name]
        s = _setting(t)
        train_task = load(t, t.train_split).subset(Q.TRAIN_EXAMPLES, seed=Q.SEED)
        test = load(t, t.test_split).subset(TEST_EXAMPLES, seed=Q.SEED)
        card = _card(loaded, train_task, t)
        base_path = OUT / "runs" / f"{name}-base.json"
        if not base_path.is_file():
            losses = _example_losses(loaded, test, t, None)
            write_json(base_path, {"task": name, "name": "base", **losses, "test_data": test.data_hash})
        print(f"{name}: base test loss {read_json(base_path)['test_loss']:.4f}", flush=True)
        planned = (
            _advised_runs(card, s, name, seed, advise_at)
            if advise_at
            else _planned(card, s, name, seed, only, recommend_at)
        )
        for run_name, plan, cfg, placement in planned:
            path = _run_path(name, run_name, seed, batch)
            if path.is_file():
                continue
            if batch is not None:
                cfg = dataclasses.replace(cfg, batch_size=batch)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="fresh-") as tmp:
                metrics = train(loaded, plan, train_task, None, cfg, tmp, progress=False)
                losses = _example_losses(loaded, test, t, Path(tmp) / "adapter")
            write_json(
                path,
                {"task": name, "name": run_name, "seed": seed, "steps": Q.STEPS, "batch": cfg.batch_size,
                 "placement": placement, "layers": plan.layers,
                 "units": [[u.layer, u.role, u.rank] for u in plan.units],
                 "params": plan.predicted["params"], **losses, "s_per_step": metrics["s_per_step"],
                 "wall_s": round(time.perf_counter() - t0, 1), "load_1min": os.getloadavg()[0],
                 "threads": torch.get_num_threads(), "machine": machine_info()},
            )  # fmt: skip
            took = time.perf_counter() - t0
            print(f"{name} {run_name} seed {seed}: test loss {losses['test_loss']:.4f}, "
                  f"{metrics['s_per_step']:.2f} s/step, {took:.0f} s", flush=True)  # fmt: skip


def _planned(
    card: Any, setting: Any, task: str, seed: int, only: set[str] | None, recommend_at: list[str] | None
) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    """(run name, plan, training settings, what the placement is) for each run ``run`` is asked for; the
    rules' parameter shares are read from fresh.json, as ``rules`` reads them."""
    import quality as Q

    from layercard.artifacts import read_json

    if not recommend_at:
        return [
            (p.name, *Q._plan_and_settings(card, setting, p, seed), dataclasses.asdict(p))
            for p in (*Q.GRID, *mid_depth())
            if (only is None and p in Q.GRID) or (only is not None and p.name in only)
        ]
    shares = {r["name"]: r["params_share"] for r in read_json(OUT / "fresh.json")["tasks"][task]["runs"]}
    cfg = Q.train_settings(setting.max_length, seed)
    card = with_target_entropy(card, task)
    out = []
    for rule in recommend_at:
        share = shares[dict(RULES)[rule]]
        plan, pick = _recommend(card, share)
        if pick["grid"] is not None:
            continue  # the grid's own run of that placement stands for it
        label = pick["placement"]
        if _run_path(task, advised_name(label), seed).is_file():
            continue  # trained as the depth note's placement (run --advise-at): that run stands for it
        if recommend_name(label) not in {o[0] for o in out}:
            placement = {"recommend": f"params={share:.6f}x", "rule": rule, "label": label}
            out.append((recommend_name(label), plan, cfg, placement))
    return out


def mid_depth() -> tuple[Any, ...]:
    """Placements the grid lacks, trained only when ``--only`` names them: every linear module at rank 4 of
    the last 15 layers (half the depth bands), of the last 20 (four of six), and of 15 layers spread over
    the depth (all six, the same size as the last 15). The grid's placements cover one, two, four or six
    bands, so it cannot tell a depth penalty that falls at half the depth from one that grows with the
    bands left out."""
    import quality as Q

    return (
        Q.Placement("lin-last15-r4", "all-linear", "top", "layers=15", 4),
        Q.Placement("lin-last20-r4", "all-linear", "top", "layers=20", 4),
        Q.Placement("lin-uni15-r4", "all-linear", "uniform", "layers=15", 4),
    )


# The mid-depth question's series, each at a quarter to a third of the reference's parameters: the grid's
# last 8 layers (two of six depth bands), then mid_depth()'s last 15 (three) and last 20 (four), and its 15
# spread layers (all six), against which each gap is taken.
MID_SERIES = ("lin-last8-r8", "lin-last15-r4", "lin-last20-r4", "lin-uni15-r4")
# The last 15's mean gap on the warned tasks under which, and over which, the reading stated before the
# runs says the power of the coverage overstates what half the depth costs, or holds.
MID_READING = (0.07, 0.13)


def middepth() -> dict[str, Any]:
    """:func:`middepth_result`, written to OUT/middepth.json and .md."""
    from layercard.artifacts import write_json, write_text

    out = middepth_result()
    write_json(OUT / "middepth.json", out)
    write_text(OUT / "middepth.md", _middepth_markdown(out))
    return out


def middepth_result() -> dict[str, Any]:
    """The mid-depth runs (``run --only`` of :func:`mid_depth`'s names) scored: each task's fractions of the
    MID_SERIES placements, each one's gap behind the 15 spread layers, and the frozen default's and the
    pooled side form's (pooled_quality.py's choice, at its fit on ten tasks) predictions and errors."""
    import pooled_quality as PQ

    from layercard.artifacts import read_json
    from layercard.card import Card
    from layercard.plan.quality import HIGH_TARGET_ENTROPY, TWO_TASK_MODEL, features

    model, h = TWO_TASK_MODEL, PQ._entropy()
    pooled = read_json(PQ.OUT / "pooled.json")
    side_name = pooled["rule"]["chosen"]
    side_form = next(f for f in PQ.FORMS if f.name == side_name)
    side_params = pooled["forms"][side_name]["pooled"]["params"]
    out: dict[str, Any] = {
        "series": list(MID_SERIES),
        "side_form": side_name,
        "side_params": side_params,
        "tasks": {},
    }
    for name in TASKS:
        paths = {n: OUT / "runs" / f"{name}-{n}.json" for n in ("base", "ref", *MID_SERIES)}
        if not all(p.is_file() for p in paths.values()):
            continue
        card = Card.load(OUT / "cards" / name / "card.json")
        by_pos = {(u.layer, u.role): u.key for u in card.units}
        base, ref = (read_json(paths[n])["test_loss"] for n in ("base", "ref"))
        warned = h[name] >= HIGH_TARGET_ENTROPY
        runs = {}
        for n in MID_SERIES:
            r = read_json(paths[n])
            f = features(card, {by_pos[(la, ro)]: rk for la, ro, rk in r["units"]}, score=model.score)
            row = PQ.rows_of([{"task": name, "name": n, "f": f, "fraction": 0.0, "side": warned}])
            runs[n] = {
                "params_share": f.params,
                "bands": f.coverage,
                "measured": (base - r["test_loss"]) / (base - ref),
                "default": model.predict(f),
                "side": float(PQ.predict(side_form, side_params, row)[0]),
            }
        spread = runs[MID_SERIES[-1]]
        for r in runs.values():
            r["gap"] = {k: spread[k] - r[k] for k in ("measured", "default", "side")}
        out["tasks"][name] = {"warned": warned, "runs": runs}
    groups = {
        "warned": [t for t, v in out["tasks"].items() if v["warned"]],
        "below": [t for t, v in out["tasks"].items() if not v["warned"]],
    }
    out["mean_gap"] = {
        g: {
            n: {
                k: statistics.fmean(out["tasks"][t]["runs"][n]["gap"][k] for t in ts)
                for k in ("measured", "default", "side")
            }
            for n in MID_SERIES[:-1]
        }
        for g, ts in groups.items()
        if ts
    }
    out["mae"] = (
        {
            k: statistics.fmean(
                abs(r[k] - r["measured"])
                for v in out["tasks"].values()
                for n, r in v["runs"].items()
                if n != MID_SERIES[0]
            )
            for k in ("default", "side")
        }
        if out["tasks"]
        else {}
    )
    if "warned" in out["mean_gap"]:
        gap = out["mean_gap"]["warned"]["lin-last15-r4"]["measured"]
        lo, hi = MID_READING
        out["reading"] = "under" if gap < lo else "over" if gap > hi else "between"
    return out


def _middepth_markdown(out: dict[str, Any]) -> str:
    import quality as Q

    series = out["series"]
    lines = [
        "# How far depth costs: placements over two, three, four and six of the six depth bands",
        "",
        f"smollm2, quality.py's settings ({Q.STEPS} steps of batch {Q.BATCH}, lr {Q.LR:g}), seed 0, "
        f"{TEST_EXAMPLES} test examples per task. Every linear module of the last 8 layers at rank 8 (the "
        "grid's), of the last 15 and the last 20 at rank 4, and of 15 layers spread over the depth at rank "
        "4: 0.25–0.33 of the reference's parameters. Each cell: the measured fraction of the reference's "
        "drop, its gap behind the 15 spread layers, and the gaps the frozen default and the pooled side form "
        f"(`{out['side_form']}` at its fit on ten tasks, pooled.md) predicted.",
        "",
        "| task | warned | " + " | ".join(f"`{n}`: measured (gap; default, side)" for n in series) + " |",
        "|---|---|" + "---:|" * len(series),
    ]
    for t, v in out["tasks"].items():
        cells = []
        for n in series:
            r = v["runs"][n]
            g = r["gap"]
            cells.append(
                f"{r['measured']:.3f}"
                + (
                    ""
                    if n == series[-1]
                    else f" ({g['measured']:+.3f}; {g['default']:+.3f}, {g['side']:+.3f})"
                )
            )
        lines.append(f"| {t} | {'yes' if v['warned'] else 'no'} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| tasks | " + " | ".join(f"mean gap of `{n}`: measured (default, side)" for n in series[:-1]) + " |",
        "|---|" + "---:|" * (len(series) - 1),
    ]
    for g, by in out["mean_gap"].items():
        lines.append(
            f"| {g} | "
            + " | ".join(
                f"{by[n]['measured']:+.3f} ({by[n]['default']:+.3f}, {by[n]['side']:+.3f})"
                for n in series[:-1]
            )
            + " |"
        )
    if out.get("mae"):
        lines += [
            "",
            "Mean absolute error of the fraction over the mid-depth runs (the last 15, the last 20 and "
            f"the 15 spread layers of every task): default {out['mae']['default']:.3f}, "
            f"`{out['side_form']}` {out['mae']['side']:.3f}.",
        ]
    if "reading" in out:
        lo, hi = MID_READING
        lines += [
            "",
            f"Stated before the runs: a mean gap of the last 15 on the warned tasks under {lo} says the "
            f"power of the coverage overstates what half the depth costs, over {hi} that it holds. "
            f"Measured: **{out['reading']}** "
            f"({out['mean_gap']['warned']['lin-last15-r4']['measured']:+.3f}).",
        ]
    return "\n".join(lines) + "\n"


BATCH_PLACEMENTS = ("qv-all-r8", "mlp-all-r2", "lin-last8-r8", "lin-uni8-r8")  # run --batch's, beside ref


def batch_result(batch: int = 2, entropy: dict[str, float] | None = None) -> dict[str, Any]:
    """The runs at ``batch`` (``run --batch``) beside the same placements at quality.py's batch: each
    placement's fraction of its own batch's reference at both, and each task's mean change. ``entropy``:
    each task's target entropy as a card reads it (default entropy_shortfall.json's)."""
    import pooled_quality as PQ
    import quality as Q

    from layercard.artifacts import read_json
    from layercard.plan.quality import HIGH_TARGET_ENTROPY

    h = entropy if entropy is not None else PQ._entropy()
    out: dict[str, Any] = {"batch": batch, "usual_batch": Q.BATCH, "tasks": {}}
    for name in TASKS:
        names = ("base", "ref", *BATCH_PLACEMENTS)
        at = {b: {n: _run_path(name, n, 0, b) for n in names} for b in (Q.BATCH, batch)}
        at[batch]["base"] = at[Q.BATCH]["base"]  # no adapter: the batch does not enter
        if not all(p.is_file() for paths in at.values() for p in paths.values()):
            continue
        loss = {b: {n: float(read_json(p)["test_loss"]) for n, p in paths.items()} for b, paths in at.items()}
        base = loss[Q.BATCH]["base"]
        out["tasks"][name] = {
            "warned": h[name] >= HIGH_TARGET_ENTROPY,
            **level_at_batches(base, loss, "ref", BATCH_PLACEMENTS, Q.BATCH, batch),
        }
    return out


def level_at_batches(
    base: float, loss: dict[int, dict[str, float]], ref: str, names: Sequence[str], usual: int, other: int
) -> dict[str, Any]:
    """Each placement's fraction of the reference's drop at the same batch, from test losses by batch and
    run name (``ref`` the reference's name, ``base`` the untrained model's loss), the mean over ``names`` at
    each batch, and its change from the ``usual`` batch to the ``other``."""
    fractions = {b: {n: (base - v[n]) / (base - v[ref]) for n in names} for b, v in loss.items()}
    mean = {b: statistics.fmean(f.values()) for b, f in fractions.items()}
    return {
        "reference_drop": {b: base - v[ref] for b, v in loss.items()},
        "fractions": fractions,
        "mean": mean,
        "change": mean[other] - mean[usual],
    }


def _batch_markdown(out: dict[str, Any]) -> str:
    import quality as Q

    b, b0 = out["batch"], out["usual_batch"]
    lines = [
        f"# The batch size and the level of the fractions: batch {b} against batch {b0}",
        "",
        f"smollm2, quality.py's settings ({Q.STEPS} steps, lr {Q.LR:g}, seed 0, {TEST_EXAMPLES} test "
        f"examples) at batch {b} and at its usual batch {b0}; each fraction against the reference trained at "
        f"the same batch. Cells: fraction at batch {b0} → {b}.",
        "",
        "| task | warned | reference's drop (nats) | "
        + " | ".join(f"`{n}`" for n in BATCH_PLACEMENTS)
        + " | mean | change |",
        "|---|---|---:|" + "---:|" * (len(BATCH_PLACEMENTS) + 2),
    ]
    for t, v in out["tasks"].items():
        lines.append(f"| {t} | {'yes' if v['warned'] else 'no'} | " + level_cells(v, BATCH_PLACEMENTS, b0, b))
    return "\n".join(lines) + "\n"


def level_cells(v: dict[str, Any], names: Sequence[str], usual: int, other: int) -> str:
    """A markdown row's cells from the reference's drop on, for one task's :func:`level_at_batches`: each
    value at the ``usual`` batch → at the ``other``, then the change."""
    f, d, m = v["fractions"], v["reference_drop"], v["mean"]
    return (
        f"{d[usual]:.3f} → {d[other]:.3f} | "
        + " | ".join(f"{f[usual][n]:.3f} → {f[other][n]:.3f}" for n in names)
        + f" | {m[usual]:.3f} → {m[other]:.3f} | {v['change']:+.3f} |"
    )


def advised_name(label: str) -> str:
    """The run name of a placement the plan's depth note named (``adv-mlp-spread-16-r1``)."""
    return "adv-" + recommend_name(label).removeprefix("rec-")


def advised(card: Any, share: float) -> tuple[Any, dict[str, Any]] | None:
    """Where the recommendation at ``share`` taken among every placement (``depth: any``) leaves a depth
    band out, the one taken among placements over all the depth (``depth: all``): its plan and an account
    of both; None where the first covers the depth or nothing over it fits."""
    import placement_v2 as P

    from layercard.config import PlanConfig
    from layercard.errors import LayercardError
    from layercard.plan.frontier import row_label
    from layercard.plan.quality import depth_coverage

    _, free = _recommend(card, share, depth="any")
    if depth_coverage(free["layers"], card.n_layers) >= 1.0:
        return None
    try:
        plan = P.planned(card, PlanConfig(policy="recommend", budget=f"params={share:.6f}x", depth="all"))
    except LayercardError:
        return None
    c = plan.predicted["candidate"]
    account = {"placement": row_label(c), "params_share": c["params_x"], "predicted": c["quality"],
               "expected_error": c.get("error"), "recommendation": free["placement"],
               "recommendation_share": free["params_share"], "recommendation_grid": free["grid"]}  # fmt: skip
    return plan, account


def _advised_runs(
    card: Any, setting: Any, task: str, seed: int, advise_at: list[str]
) -> list[tuple[str, Any, Any, dict[str, Any]]]:
    """(run name, plan, training settings, what it is) of :func:`advised` at each rule's share."""
    import quality as Q

    from layercard.artifacts import read_json

    shares = {r["name"]: r["params_share"] for r in read_json(OUT / "fresh.json")["tasks"][task]["runs"]}
    cfg = Q.train_settings(setting.max_length, seed)
    out = []
    for rule in advise_at:
        share = shares[dict(RULES)[rule]]
        got = advised(card, share)
        if got is None or advised_name(got[1]["placement"]) in {o[0] for o in out}:
            continue
        plan, account = got
        out.append((advised_name(account["placement"]), plan, cfg, {"advise": f"params={share:.6f}x",
                    "rule": rule, "label": account["placement"]}))  # fmt: skip
    return out


def _example_losses(loaded: Any, test: Any, t: Fresh, adapter: Path | None) -> dict[str, Any]:
    """The test loss (nats per target token) and each example's summed loss and target tokens."""
    import math

    from sampling import _per_example

    sums, tokens = _per_example(loaded, test, t, adapter)
    loss = sum(sums) / sum(tokens)
    if not math.isfinite(loss):
        raise SystemExit(f"{t.name}: non-finite test loss, nothing written")
    return {"test_loss": loss, "example_loss_sums": list(sums), "example_tokens": list(tokens)}


def frozen_forms() -> dict[str, tuple[Any, tuple[float, ...], str]]:
    """Every form scored on the fresh tasks, by column: (q = fn(x, params), params, what x is: "f" for the
    card features, "k" for them with the coupling coverages, "t" with the task's target statistics);
    parameters as committed before the tasks they are scored on were trained (decision.json, wide.json,
    couplingcoverage.json; targetcoverage.json before gsm8k_pose and sst2_write)."""
    import quality as Q
    import quality_confirm as C

    from layercard.artifacts import read_json
    from layercard.plan.quality import ALL_FORMS, TWO_TASK_MODEL

    model = TWO_TASK_MODEL
    out: dict[str, tuple[Any, tuple[float, ...], str]] = {
        "default": (ALL_FORMS[model.form].fn, tuple(model.params), "f"),
        "params": (ALL_FORMS["params"].fn, C.OTHERS["params"], "f"),
    }
    decision = read_json(Q.RESULTS / "decision.json")["forms"]
    out["constant"] = (
        ALL_FORMS["constant"].fn,
        tuple(decision["constant"]["seed mean"]["pooled"]["params"]),
        "f",
    )
    out |= {col: (fn, params, "f") for col, (fn, params) in C._wide_forms().items()}
    coupled = C._frozen("couplingcoverage.json", Q._coupling_coverage_forms(), C.COUPLING_FORMS)
    out |= {col: (fn, params, "k") for col, (fn, params) in coupled.items()}
    target, _ = C.target_forms()
    return out | {col: (fn, params, "t") for col, (fn, params) in target.items()}


def score() -> dict[str, Any]:
    """Every frozen form's mean absolute error and decision regret on each fresh task's placements, with the
    measured fractions and their sampling errors. Writes OUT/fresh.json and .md."""
    import quality as Q
    import quality_confirm as C

    from layercard.artifacts import read_json, write_json, write_text
    from layercard.card import Card
    from layercard.evaluate import fraction_standard_error
    from layercard.plan.quality import TWO_TASK_MODEL, decision_regret, features

    forms = frozen_forms()
    _, target_scales = C.target_forms()
    model = TWO_TASK_MODEL
    out: dict[str, Any] = {"forms": {k: list(v[1]) for k, v in forms.items()}, "tasks": {}}
    for name in TASKS:
        base_path, ref_path = OUT / "runs" / f"{name}-base.json", OUT / "runs" / f"{name}-ref.json"
        if not (base_path.is_file() and ref_path.is_file()):
            continue
        card = Card.load(OUT / "cards" / name / "card.json")
        by_pos = {(u.layer, u.role): u.key for u in card.units}
        basis = Q.coupling_basis(card, card.coupling)
        base, ref = read_json(base_path), read_json(ref_path)
        rows = []
        for p in Q.GRID[1:]:
            path = OUT / "runs" / f"{name}-{p.name}.json"
            if not path.is_file():
                continue
            r = read_json(path)
            f = features(card, {by_pos[(la, ro)]: rk for la, ro, rk in r["units"]}, score=model.score)
            x = {"f": f, "k": Q.coupled(basis, r["units"], f)}
            if target_scales:
                x["t"] = Q._WithScale(f, target_scales[name])
            measured = (base["test_loss"] - r["test_loss"]) / (base["test_loss"] - ref["test_loss"])
            se = fraction_standard_error(
                base["example_loss_sums"], ref["example_loss_sums"], r["example_loss_sums"]
            )
            rows.append(
                {"name": p.name, "params_share": f.params, "bands": f.coverage, "k": x["k"].k,
                 "k_w": x["k"].kw,
                 "measured": measured, "measured_se": se, "expected_error": model.error(f),
                 "predicted": {c: fn(x[kind], prm) for c, (fn, prm, kind) in forms.items()}}
            )  # fmt: skip
        if not rows:
            continue
        measured, shares = [r["measured"] for r in rows], [r["params_share"] for r in rows]
        per_form = {
            c: {
                "mae": statistics.fmean(abs(r["predicted"][c] - r["measured"]) for r in rows),
                "regret": decision_regret([r["predicted"][c] for r in rows], measured, shares)[0],
            }
            for c in forms
        }
        low = [r for r in rows if r["bands"] < 0.5]
        repeats = _repeats(name, base["test_loss"])
        out["tasks"][name] = {
            "placements": len(rows),
            "reference_drop": base["test_loss"] - ref["test_loss"],
            "target_tokens_per_example": statistics.fmean(base["example_tokens"]),
            "mean_coupling": _mean_coupling(card),
            "coupling_s": card.timings.get("coupling_s"),
            "forms": per_form,
            # predicted minus measured: how much more leaving depth out cost than the default expected
            "default_shortfall_under_half_depth": statistics.fmean(
                r["predicted"]["default"] - r["measured"] for r in low
            ) if low else None,
            "runs": rows,
            "repeats": repeats,
        }  # fmt: skip
    if out["tasks"]:
        out["mean"] = {
            c: {
                s: statistics.fmean(v["forms"][c][s] for v in out["tasks"].values())
                for s in ("mae", "regret")
            }
            for c in forms
        }
    write_json(OUT / "fresh.json", out)
    write_text(OUT / "fresh.md", _markdown(out))
    return out


def _repeats(task: str, base: float) -> dict[str, Any] | None:
    """The placements also trained at other seeds (``run --seed N``): each one's fraction per seed, against
    its own seed's reference and against the mean of the reference's drops; None when there are none."""
    import quality as Q

    from layercard.artifacts import read_json

    seeds = sorted(int(d.name[4:]) for d in (OUT / "runs").glob("seed*") if d.is_dir())
    # the grid's placements, and the planner's recommendations and depth notes' placements trained for
    # ``rules`` (run --recommend-at, --advise-at)
    names = [p.name for p in Q.GRID] + sorted(
        f.stem[len(task) + 1 :]
        for pattern in (f"{task}-rec-*.json", f"{task}-adv-*.json")
        for f in (OUT / "runs").glob(pattern)
    )
    losses = {
        (name, sd): float(read_json(path)["test_loss"])
        for sd in [0, *seeds]
        for name in names
        if (path := _run_path(task, name, sd)).is_file()
    }
    repeated = {n for n, sd in losses if sd != 0}
    if not seeds or "ref" not in repeated:
        return None
    losses = {k: v for k, v in losses.items() if k[0] in repeated}
    refs = {sd: base - v for (n, sd), v in losses.items() if n == "ref"}
    return {
        "reference_drop": refs,
        "own": Q.seed_fractions(base, losses, "own"),
        "mean": Q.seed_fractions(base, losses, "mean"),
    }


def _mean_coupling(card: Any) -> float:
    """The mean |cosine| between two different layers' effects: how alike the layers act on this task."""
    import numpy as np

    c = np.abs(np.asarray(card.coupling["matrix"], dtype=np.float64))
    return float(c[~np.eye(len(c), dtype=bool)].mean())


def _markdown(out: dict[str, Any]) -> str:
    import quality as Q

    names = list(out["forms"])
    lines = [
        "# Quality forms on tasks none of them has seen",
        "",
        f"smollm2, quality.py's settings ({Q.STEPS} steps of batch {Q.BATCH}, lr {Q.LR:g}), its grid of "
        f"placements, {TEST_EXAMPLES} test examples per task; every form frozen at the parameters committed "
        "before these tasks were trained: "
        + ", ".join(f"`{k}` ({', '.join(f'{x:g}' for x in v)})" for k, v in out["forms"].items())
        + ". Cells: mean absolute error of the fraction / decision regret (as confirm.md).",
        "",
        "| task | placements | target tokens per example | mean layer coupling | default's shortfall under "
        "half the depth | " + " | ".join(names) + " |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(names),
    ]
    for t, v in out["tasks"].items():
        cells = [f"{v['forms'][c]['mae']:.3f} / {v['forms'][c]['regret']:.3f}" for c in names]
        lines.append(f"| {t} | {v['placements']} | {v['target_tokens_per_example']:.1f} | "
                     f"{v['mean_coupling']:.3f} | {v['default_shortfall_under_half_depth']:+.3f} | "
                     + " | ".join(cells) + " |")  # fmt: skip
    if "mean" in out:
        m = out["mean"]
        lines.append("| **mean** | | | | | " + " | ".join(
            f"**{m[c]['mae']:.3f} / {m[c]['regret']:.3f}**" for c in names) + " |")  # fmt: skip
    lines += [
        "",
        "| task | placement | params share | depth bands | k | k_w | measured ± sampling error | "
        "expected error | " + " | ".join(names) + " |",
        "|---|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(names),
    ]
    for t, v in out["tasks"].items():
        for r in v["runs"]:
            lines.append(
                f"| {t} | {r['name']} | {r['params_share']:.3f} | {r['bands']:.2f} | {r['k']:.3f} | "
                f"{r['k_w']:.3f} | {r['measured']:.3f} ± {r['measured_se']:.3f} | "
                f"{r['expected_error']:.3f} | "
                + " | ".join(f"{r['predicted'][c]:.3f}" for c in names) + " |"
            )  # fmt: skip
    for t, v in out["tasks"].items():
        rep = v.get("repeats")
        if not rep:
            continue
        drops = ", ".join(f"seed {sd}: {x:.3f}" for sd, x in rep["reference_drop"].items())
        lines += ["", f"**{t}, repeated at other training seeds.** The reference's drop: {drops} nats.", "",
                  "| placement | fraction per seed, against its seed's reference | against the mean "
                  "reference |",
                  "|---|---|---|"]  # fmt: skip
        for name, own in rep["own"].items():
            mean = rep["mean"][name]
            lines.append(
                f"| {name} | " + ", ".join(f"{sd}: {x:.3f}" for sd, x in own.items()) + " | "
                + ", ".join(f"{sd}: {x:.3f}" for sd, x in mean.items()) + " |"
            )  # fmt: skip
    lines.append("")
    return "\n".join(lines)


# The practitioners' rules in quality.py's grid, each at its own parameter share.
RULES = (
    ("peft-default", "qv-all-r8"),
    ("peft-default-r2", "qv-all-r2"),
    ("all-linear", "lin-all-r2"),
    ("last-n", "lin-last8-r8"),
)


def pick_within(rows: list[dict[str, Any]], share: float) -> dict[str, Any]:
    """The row the default predicts best among those whose parameter share is at most ``share`` (ties to the
    fewer parameters, as the planner breaks them)."""
    within = [r for r in rows if r["params_share"] <= share * (1 + 1e-9)]
    if not within:
        raise ValueError(f"no placement within a parameter share of {share:g}")
    return max(within, key=lambda r: (r["predicted"]["default"], -r["params_share"]))


def rules() -> dict[str, Any]:
    """The default's pick against each rule at the rule's parameter share, per fresh task, from fresh.json
    and the runs' per-example losses; beside it what the planner's full search recommends at that share,
    and, where the grid holds that placement, the same comparison for it. Writes OUT/rules.json and .md."""
    from layercard.artifacts import read_json, write_json, write_text
    from layercard.card import Card

    fresh = read_json(OUT / "fresh.json")
    warned = warned_tasks()
    out: dict[str, Any] = {"rules": dict(RULES), "tasks": {}, "warned": sorted(warned)}
    for task, v in fresh["tasks"].items():
        card = with_target_entropy(Card.load(OUT / "cards" / task / "card.json"), task)
        rows = {r["name"]: r for r in v["runs"]}
        own = (v.get("repeats") or {}).get("own", {})
        cells = {}
        for rule, name in RULES:
            if name not in rows:
                continue
            share = rows[name]["params_share"]
            planner = planner_pick(card, share)
            trained = planner["grid"] or _trained_recommendation(task, planner, rows)
            if trained is not None and trained in rows:
                planner["comparison"] = _compare(task, rows, own, trained, name)
            cells[rule] = {
                "task": task, "rule": name, "rule_share": share, "rule_measured": rows[name]["measured"],
                **_compare(task, rows, own, pick_within(v["runs"], share)["name"], name),
                "planner": planner,
            }  # fmt: skip
            if task in warned and (advice := _advice_cell(task, card, share, rows, own, name)):
                cells[rule]["advice"] = advice
        out["tasks"][task] = cells
    for key, tally in (("summary", _tally), ("summary_over_seeds", _tally_seeds)):
        out[key] = {rule: tally([t[rule] for t in out["tasks"].values() if rule in t]) for rule, _ in RULES}
    for key, tally in (("planner_summary", _tally), ("planner_over_seeds", _tally_seeds)):
        out[key] = {
            rule: tally(
                [{**c["planner"]["comparison"], "rule": c["rule"], "task": c["task"]}
                 for t in out["tasks"].values() if (c := t.get(rule)) and "comparison" in c["planner"]]
            )
            for rule, _ in RULES
        }  # fmt: skip
    # the depth note's placement against the rule and against the recommendation, at seed 0 and over seeds
    out["advice_summary"] = {
        f"{against}{suffix}": {
            rule: tally(
                [{**c["advice"][against], "rule": c["rule"], "task": c["task"]}
                 for t in out["tasks"].values() if (c := t.get(rule)) and against in c.get("advice", {})]
            )
            for rule, _ in RULES
        }
        for against in ("rule", "against_recommendation")
        for suffix, tally in (("", _tally), ("_seeds", _tally_seeds))
    }  # fmt: skip
    write_json(OUT / "rules.json", out)
    write_text(OUT / "rules.md", _rules_markdown(out))
    return out


def with_target_entropy(card: Any, task: str) -> Any:
    """The card with its task's target entropy as a card reads it (entropy_shortfall.json) where it records
    none: the committed cards predate that reading, and the plan's ``depth: auto`` needs it to plan as it
    would from a card made today."""
    from layercard.artifacts import read_json

    if card.task.get("target_entropy") is not None:
        return card
    h = read_json(OUT.parent / "entropy_shortfall.json")["tasks"][task]["card_entropy"]
    return dataclasses.replace(card, task={**card.task, "target_entropy": h})


def warned_tasks() -> set[str]:
    """The fresh tasks a plan warns on for varied targets: target entropy, as a card reads it, at or above
    the threshold (entropy_shortfall.json; the fresh tasks' committed cards predate the card's reading)."""
    from layercard.artifacts import read_json
    from layercard.plan.quality import HIGH_TARGET_ENTROPY

    table = read_json(OUT.parent / "entropy_shortfall.json")["tasks"]
    return {t for t, r in table.items() if t in TASKS and r["card_entropy"] >= HIGH_TARGET_ENTROPY}


def _advice_cell(
    task: str,
    card: Any,
    share: float,
    rows: dict[str, dict[str, Any]],
    own: dict[str, dict[str, float]],
    rule: str,
) -> dict[str, Any] | None:
    """The placement over all the depth at ``share`` where the recommendation among every placement leaves a
    depth band out (:func:`advised`), and, where trained, its measured difference from the rule and from
    that recommendation."""
    got = advised(card, share)
    if got is None:
        return None
    a = got[1]
    cell: dict[str, Any] = {"placement": a["placement"], "params_share": a["params_share"],
                            "recommendation": a["recommendation"]}  # fmt: skip
    name = _trained(task, advised_name(a["placement"]), a["params_share"], rows)
    free = a["recommendation_grid"] or _trained(
        task, recommend_name(a["recommendation"]), a["recommendation_share"], rows
    )
    if name is not None:
        cell["rule"] = _compare(task, rows, own, name, rule)
        if free is not None:
            cell["against_recommendation"] = _compare(task, rows, own, name, free)
    return cell


@functools.cache
def _run_record(task: str, name: str) -> dict[str, Any]:
    """A seed-0 run's record (OUT/runs/<task>-<name>.json), read once however many comparisons use it."""
    from layercard.artifacts import read_json

    return read_json(OUT / "runs" / f"{task}-{name}.json")


def _trained_recommendation(
    task: str, planner: dict[str, Any], rows: dict[str, dict[str, Any]]
) -> str | None:
    """The run name of the planner's recommendation (:func:`planner_pick`) where ``run --recommend-at``
    trained it (added to ``rows`` with its measured fraction); None where it was not."""
    # a placement trained as the depth note's (run --advise-at) stands for the same placement recommended
    label, share = planner["placement"], planner["params_share"]
    return _trained(task, recommend_name(label), share, rows) or _trained(
        task, advised_name(label), share, rows
    )


def _trained(task: str, name: str, params_share: float, rows: dict[str, dict[str, Any]]) -> str | None:
    """``name`` where its seed-0 run exists, added to ``rows`` with its measured fraction; else None."""
    if not (OUT / "runs" / f"{task}-{name}.json").is_file():
        return None
    base, ref, loss = (_run_record(task, n)["test_loss"] for n in ("base", "ref", name))
    rows[name] = {"name": name, "params_share": params_share, "measured": (base - loss) / (base - ref)}
    return name


def _compare(
    task: str, rows: dict[str, dict[str, Any]], own: dict[str, dict[str, float]], pick: str, rule: str
) -> dict[str, Any]:
    """``pick``'s measured fraction minus ``rule``'s on ``task``: at seed 0 with its sampling error paired
    over the test examples, and at the other seeds where both were re-trained (``own``: fraction by seed)."""
    from layercard.evaluate import difference_standard_error

    def sums(name: str) -> list[float]:
        return _run_record(task, name)["example_loss_sums"]

    seeds = sorted(set(own.get(pick, {})) & set(own.get(rule, {})) - {"0"}, key=int)
    return {
        "pick": pick, "pick_share": rows[pick]["params_share"], "pick_measured": rows[pick]["measured"],
        "difference": rows[pick]["measured"] - rows[rule]["measured"],
        "difference_se": difference_standard_error(sums("base"), sums("ref"), sums(rule), sums(pick)),
        "other_seeds": {sd: own[pick][sd] - own[rule][sd] for sd in seeds},
    }  # fmt: skip


def planner_pick(card: Any, share: float) -> dict[str, Any]:
    """What ``layercard plan --budget params=<share>x`` recommends from the task's card (the full search, not
    the grid), and the grid placement that is the same placement, if one is."""
    return _recommend(card, share)[1]


def _recommend(card: Any, share: float, depth: str = "auto") -> tuple[Any, dict[str, Any]]:
    """The planner's plan at ``share`` and :func:`planner_pick`'s account of it (with its layers)."""
    import placement_v2 as P
    import quality as Q

    from layercard.config import PlanConfig
    from layercard.plan.frontier import row_label

    plan = P.planned(card, PlanConfig(policy="recommend", budget=f"params={share:.6f}x", depth=depth))
    c = plan.predicted["candidate"]
    layers = {"all": "all", "top": "last-{n}"}
    same = [
        p.name for p in Q.GRID[1:]
        if p.policy in layers and p.rank == c["rank"] and p.roles == c["matrices"]
        and layers[p.policy].format(n=(p.budget or "=").split("=")[1]) == c["layers"]
    ]  # fmt: skip
    return plan, {"placement": row_label(c), "params_share": c["params_x"], "grid": same[0] if same else None,
                  "layers": plan.layers}  # fmt: skip


def _tally(cells: list[dict[str, Any]]) -> dict[str, int]:
    """How many tasks the pick was ahead or behind by more than twice its paired sampling error, or within
    it, or the rule's placement itself."""
    out = {"same": 0, "ahead": 0, "behind": 0, "within": 0}
    for c in cells:
        if c["pick"] == c["rule"]:
            out["same"] += 1
        elif c["difference_se"] is not None and abs(c["difference"]) > 2 * c["difference_se"]:
            out["ahead" if c["difference"] > 0 else "behind"] += 1
        else:
            out["within"] += 1
    return out


def _tally_seeds(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the cells re-trained at other seeds: the tasks where the pick was ahead at every seed, behind at
    every seed, or on different sides, and the mean difference over the seeds on each."""
    out: dict[str, Any] = {"ahead": [], "behind": [], "mixed": []}
    for c in cells:
        if c["pick"] == c["rule"] or not c["other_seeds"]:
            continue
        diffs = [c["difference"], *c["other_seeds"].values()]
        side = "ahead" if min(diffs) > 0 else "behind" if max(diffs) < 0 else "mixed"
        out[side].append({"task": c["task"], "seeds": len(diffs), "mean_difference": statistics.fmean(diffs)})
    return out


def _rules_markdown(out: dict[str, Any]) -> str:
    import quality as Q

    lines = [
        "# The default's pick against the practitioners' rules on the fresh tasks",
        "",
        f"smollm2, quality.py's settings ({Q.STEPS} steps of batch {Q.BATCH}, lr {Q.LR:g}), seed 0, "
        f"{TEST_EXAMPLES} test examples per task (fresh.md). For each rule in the grid, the placement the "
        "frozen default predicts best among the grid's placements no larger than the rule's parameter share "
        "(ties to the fewer parameters) against the rule's own placement. Cells: the pick, then its measured "
        "fraction of the reference's drop minus the rule's ± the sampling error of that difference, paired "
        "over the same test examples; after `seeds`, the same difference at other training seeds where both "
        "were re-trained. The grid holds 15 placements, so a pick here is what the default would choose from "
        "them, not the planner's search over every placement.",
        "",
        *_task_table(
            out,
            [f"{r} (`{n}`)" for r, n in RULES],
            lambda c: (
                "the same placement" if c["pick"] == c["rule"] else f"`{c['pick']}` {_difference_text(c)}"
            ),
        ),
        "",
        "Over the tasks, beyond twice the paired sampling error (seed 0):",
        "",
        *_tally_lines(out["summary"], "the pick "),
        "",
        "What `layercard plan --budget params=<the rule's share>x` recommends from each task's card (the "
        "planner's whole search, not the grid, with `depth: auto`; each card is given its task's target "
        "entropy as a card made today reads it, entropy_shortfall.md), with its parameter share, and its "
        "measured difference from the rule (as above), from the grid's run of it or from a run of it trained "
        "for this (`run --recommend-at` or `--advise-at`; seed 0):",
        "",
        *_task_table(out, [r for r, _ in RULES], _planner_cell),
        "",
        "The planner's recommendation, where measured, beyond twice the paired error:",
        "",
        *_tally_lines(out["planner_summary"], ""),
        "",
        "Where both placements were also trained at other seeds, the difference at every seed:",
        "",
    ]
    for key, who in (("summary_over_seeds", "the grid's pick"), ("planner_over_seeds", "the planner's pick")):
        lines += _seed_lines(out[key], who)
    lines += ["", *_advice_markdown(out)]
    return "\n".join(lines)


def _advice_markdown(out: dict[str, Any]) -> list[str]:
    """The depth note's placements: where a plan names one, and how it measured."""
    rows = [
        (task, rule, c["advice"]) for task, cells in out["tasks"].items()
        for rule, _ in RULES if (c := cells.get(rule)) and "advice" in c
    ]  # fmt: skip
    if not rows:
        return []

    def diff(a: dict[str, Any], key: str) -> str:
        return _difference_text(a[key]) if key in a else "not trained"

    lines = [
        "## The recommendation over all the depth against the one over any placement",
        "",
        f"On the tasks a plan warns on for varied targets ({', '.join(out['warned'])}: target entropy at or "
        "above the threshold as a card reads it, entropy_shortfall.md), where the recommendation at a rule's "
        "size taken among every placement (`depth: any`, what plans took before `depth` existed) leaves a "
        "depth band out: the one taken among placements over all the depth (`depth: all`, which the default "
        "`auto` takes on these tasks), trained by `run --advise-at`. Its measured fraction minus the rule's "
        "and minus that of the recommendation among every placement, as above. The five tasks' seed-0 runs "
        "of it were what the default was set on, against a prediction stated before they ran; they are not "
        "a test of the default:",
        "",
        "| task | rule | over all the depth (share) | against the rule | against the one over any |",
        "|---|---|---|---|---|",
        *(
            f"| {task} | {rule} | {a['placement']} ({a['params_share']:.3f}) | {diff(a, 'rule')} | "
            f"{diff(a, 'against_recommendation')} |"
            for task, rule, a in rows
        ),
        "",
        "Beyond twice the paired error (seed 0):",
        "",
        *_tally_lines(out["advice_summary"]["rule"], "against the rule: "),
        *_tally_lines(
            out["advice_summary"]["against_recommendation"], "against the one over any placement: "
        ),
        "",
        "At every seed where all were re-trained:",
        "",
        *_seed_lines(
            out["advice_summary"]["rule_seeds"], "the placement over all the depth against the rule"
        ),
        *_seed_lines(
            out["advice_summary"]["against_recommendation_seeds"],
            "the placement over all the depth against the one over any placement",
        ),
        "",
    ]
    return lines


def _task_table(out: dict[str, Any], headers: list[str], cell: Any) -> list[str]:
    """A markdown table of tasks × rules; ``cell`` writes each comparison there is (empty where none)."""
    lines = ["| task | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers)]
    for task, cells in out["tasks"].items():
        row = [cell(c) if (c := cells.get(rule)) is not None else "" for rule, _ in RULES]
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return lines


def _planner_cell(c: dict[str, Any]) -> str:
    """The planner's recommendation at a rule's size, its share, and how it measured against the rule."""
    pl = c["planner"]
    text = f"{pl['placement']} ({pl['params_share']:.3f})"
    if (cmp := pl.get("comparison")) is None:
        return text + ", not in the grid and not trained"
    where = "grid" if pl["grid"] else "trained for this"
    return text + (": the rule itself" if cmp["pick"] == c["rule"] else f", {where}: {_difference_text(cmp)}")


def _tally_lines(summary: dict[str, dict[str, int]], who: str) -> list[str]:
    """One line per rule with any comparison: on how many tasks ahead, behind, within, or the rule itself."""
    return [
        f"- {rule} (`{name}`): {who}ahead on {t['ahead']}, behind on {t['behind']}, within on {t['within']}, "
        f"the rule's own placement on {t['same']}"
        for rule, name in RULES
        if sum((t := summary[rule]).values())
    ]


def _difference_text(c: dict[str, Any]) -> str:
    """A comparison as a cell: the seed-0 difference ± its paired error, then the other seeds' differences."""
    se = "" if c["difference_se"] is None else f" ± {c['difference_se']:.3f}"
    seeds = ", ".join(f"{sd}: {d:+.3f}" for sd, d in c["other_seeds"].items())
    return f"{c['difference']:+.3f}{se}" + (f"; seeds {seeds}" if seeds else "")


def _seed_lines(summary: dict[str, Any], who: str) -> list[str]:
    """One line per rule with seed repeats: the tasks where ``who`` was ahead or behind at every seed, or on
    both sides, with the mean difference over the seeds."""
    lines = []
    for rule, name in RULES:
        t = summary[rule]
        if not any(t.values()):
            continue
        parts = [
            f"{side} on {len(t[side])} ("
            + ", ".join(f"{x['task']} {x['mean_difference']:+.3f} over {x['seeds']}" for x in t[side])
            + ")"
            for side in ("ahead", "behind", "mixed")
            if t[side]
        ]
        lines.append(f"- {rule} (`{name}`), {who} at every seed: " + "; ".join(parts) + " (mean difference)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "score", "rules", "middepth", "batch"))
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated of {', '.join(TASKS)}")
    ap.add_argument(
        "--only", default=None, help="comma-separated grid names, or of the mid-depth placements (mid_depth)"
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="training seed of `run` (default 0; others under runs/seed{N}/)"
    )
    ap.add_argument(
        "--recommend-at", default=None,
        help=f"`run`: train what layercard plan recommends at these rules' sizes ({', '.join(dict(RULES))})",
    )  # fmt: skip
    ap.add_argument(
        "--advise-at", default=None,
        help="`run`: train the placement over all the depth a plan's note names at these rules' sizes",
    )  # fmt: skip
    ap.add_argument(
        "--batch", type=int, default=None,
        help="`run`: train at this batch size instead of quality.py's (seed 0; under runs/batch{B}/)",
    )  # fmt: skip
    a = ap.parse_args()
    if a.what == "run":
        for name in a.tasks.split(","):
            if name not in TASKS:
                raise SystemExit(f"--tasks: unknown task {name!r}; valid: {', '.join(TASKS)}")
        if a.batch is not None and (a.batch < 1 or a.seed != 0):
            raise SystemExit(f"--batch {a.batch}: a batch of 1 or more, at seed 0 only (--seed {a.seed})")
        rec = a.recommend_at.split(",") if a.recommend_at else None
        adv = a.advise_at.split(",") if a.advise_at else None
        for flag, rules_ in (("--recommend-at", rec), ("--advise-at", adv)):
            for rule in rules_ or []:
                if rule not in dict(RULES):
                    raise SystemExit(f"{flag}: unknown rule {rule!r}; valid: {', '.join(dict(RULES))}")
        run(a.tasks.split(","), set(a.only.split(",")) if a.only else None, a.seed, rec, adv, a.batch)
    elif a.what == "rules":
        print(rules()["summary"])
    elif a.what == "middepth":
        print(_middepth_markdown(middepth()))
    elif a.what == "batch":
        from layercard.artifacts import write_json, write_text

        res = batch_result(a.batch or 2)
        write_json(OUT / "batch.json", res)
        write_text(OUT / "batch.md", _batch_markdown(res))
        print(_batch_markdown(res))
    else:
        res = score()
        print({c: v for c, v in res.get("mean", {}).items()})


if __name__ == "__main__":
    main()
