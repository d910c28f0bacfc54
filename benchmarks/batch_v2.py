"""gsm8k and samsum as placement benchmark v2 trains them, but at batch 4 instead of 2.

placement_v2.py trains gsm8k and samsum at batch 2 (their longer sequences keep a step near e2e_nlg's cost)
and every other task at batch 4; their placements passed the reference on average, where the warned fresh
tasks' (batch 4) reached 0.91 of it. fresh_tasks.py ``batch`` found that halving the batch raised the level
on the two tasks built from gsm8k and not on two others. This script asks the converse on the two tasks
themselves: the reference and four placements at params=0.25x (PEFT's default fitted to it, 8 spread
layers, the last-n rule, the card-stratified set), trained with placement_v2's settings and card at batch 4,
seed 0, each fraction against the reference at the same batch, set beside the same placements' seed-0 runs
at batch 2. The plan and its predictions were committed before any run.

``run --all`` then trains every other LoRA placement that placement benchmark v2 trained for the two tasks
(as the confirmation check lists them: 14 of gsm8k's, 12 of samsum's), each rebuilt from its recorded units
and ranks (alpha 2·rank, as planned) and checked to land on the batch-2 run's signature. ``rescore`` scores
the pooled quality fit (pooled_quality.py), frozen, and the default on the four confirmation tasks with
gsm8k's and samsum's fractions at batch 4 (facts and format were trained at batch 4 already). That plan,
its adoption condition and predictions were committed before any of those runs.

    LAYERCARD_DATA=../shared/data .venv/bin/python benchmarks/batch_v2.py run [--all]   # resumable
    .venv/bin/python benchmarks/batch_v2.py summary    # results/placement_v2/batch4/batch4.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

TASKS = ("gsm8k", "samsum")
BATCH = 4
BUDGET = "params=0.25x"
CANDIDATES = ("peft-default", "uniform", "last-n", "card-stratified")
THREADS = 2


def _out() -> Path:
    import placement_v2 as P

    return P.RESULTS / f"batch{BATCH}"


def _plans(card: Any) -> dict[str, Any]:
    """The reference and each candidate's plan at BUDGET, by candidate name."""
    import placement_v2 as P

    out = {"reference": P._reference(card)}
    for c in CANDIDATES:
        plan, why = P.plan_for(card, c, BUDGET)
        if plan is None:
            raise SystemExit(f"{c} at {BUDGET}: does not fit ({why})")
        out[c] = plan
    return out


def rebuilt(card: Any, units: list[list[Any]], label: str) -> Any:
    """The reference plan cut down to ``units`` ([layer, role, rank] as a run records them), each at its
    rank with alpha 2·rank; costs are not predicted for it (only its parameter count and modules)."""
    import placement_v2 as P

    from layercard.plan.ranks import lora_config

    ref = P._reference(card)
    by_pos = {(u.layer, u.role): u for u in ref.units}
    missing = [(la, ro) for la, ro, _ in units if (la, ro) not in by_pos]
    if missing:
        raise SystemExit(f"{label}: units {missing[:3]} are not in the reference plan")
    chosen = [dataclasses.replace(by_pos[(la, ro)], rank=int(r)) for la, ro, r in units]
    shape = {u.key: u.d_in + u.d_out for u in card.units}
    return dataclasses.replace(
        ref,
        config={**ref.config, "policy": "rebuilt", "budget": None, "target": None, "bands": None},
        units=chosen,
        layers=sorted({u.layer for u in chosen}),
        predicted={"params": sum(u.rank * shape[u.key] for u in chosen), "modules": len(chosen)},
        lora_config=lora_config(chosen, ref.config["alpha"], ref.config["dropout"]),
        warnings=[],
    )


def confirm_plans(task: str, card: Any) -> dict[str, Any]:
    """Every LoRA placement of ``task`` that the confirmation check scores (the reference left out), rebuilt
    from its batch-2 run, by label; a rebuilt plan off its run's signature stops the script."""
    import placement_v2 as P
    import quality_confirm as C

    ref_sig = P.signature(P._reference(card))
    out = {}
    for p in C.placements(task):
        if p["signature"] == ref_sig:
            continue
        plan = rebuilt(card, p["units"], p["label"])
        if P.signature(plan) != p["signature"]:
            raise SystemExit(f"{task} {p['label']}: rebuilt plan's signature {P.signature(plan)} is not "
                             f"its run's {p['signature']}")  # fmt: skip
        out[p["label"]] = plan
    return out


def run(tasks: list[str], every: bool = False) -> None:
    """Train the reference and the candidates at BATCH, seed 0 (runs already on disk are kept); ``every``:
    also every other placement the confirmation check scores."""
    import placement_v2 as P
    import torch

    from layercard import load_model, load_task

    torch.set_num_threads(THREADS)
    loaded = load_model("smollm2")
    for name in tasks:
        s = P.TASKS[name]
        train_task = load_task(s.train).subset(P.TRAIN_EXAMPLES, seed=0)
        test = load_task(s.test).subset(s.test_examples, seed=0)
        card = P._card(loaded, train_task, s)  # the committed card, measured at the task's own batch
        ctx = {"loaded": loaded, "setting": dataclasses.replace(s, batch_size=BATCH), "train": train_task,
               "test": test, "card": card}  # fmt: skip
        plans = {f"{BUDGET} {c}": plan for c, plan in _plans(card).items()}
        if every:
            have = {P.signature(v) for v in plans.values()}
            plans.update({k: v for k, v in confirm_plans(name, card).items() if P.signature(v) not in have})
        for label, plan in plans.items():
            P.train_and_score(ctx, plan, 0, label=f"{label} at batch {BATCH}", runs=_out() / "runs")


def summary() -> dict[str, Any]:
    """:func:`result`, written to OUT/batch4.json and .md."""
    from layercard.artifacts import write_json, write_text

    out = result()
    write_json(_out() / "batch4.json", out)
    write_text(_out() / "batch4.md", _markdown(out))
    return out


def result() -> dict[str, Any]:
    """Each placement's fraction of its own batch's reference at the task's batch and at BATCH, each task's
    mean change (tasks whose runs are not all on disk are left out)."""
    import fresh_tasks as F
    import placement_v2 as P

    from layercard.artifacts import read_json
    from layercard.card import Card

    out: dict[str, Any] = {"batch": BATCH, "budget": BUDGET, "tasks": {}}
    for name in TASKS:
        card = Card.load(P.RESULTS / "cards" / name / "card.json")
        base = float(read_json(P.RESULTS / "runs" / name / "base.json")["test_loss"])
        sigs = {c: P.signature(plan) for c, plan in _plans(card).items()}
        paths = {
            b: {c: P._run_path(name, sig, 0, folder) for c, sig in sigs.items()}
            for b, folder in ((P.TASKS[name].batch_size, None), (BATCH, _out() / "runs"))
        }
        if not all(p.is_file() for by in paths.values() for p in by.values()):
            continue
        loss = {b: {c: float(read_json(p)["test_loss"]) for c, p in by.items()} for b, by in paths.items()}
        b0 = P.TASKS[name].batch_size
        out["tasks"][name] = {
            "usual_batch": b0,
            **F.level_at_batches(base, loss, "reference", CANDIDATES, b0, BATCH),
        }
    return out


def batch4_placements(task: str) -> tuple[list[dict[str, Any]], float] | None:
    """``task``'s confirmation placements ({label, units, test_loss}) at BATCH with its reference's test
    loss there; None until every one has its run."""
    import placement_v2 as P
    import quality_confirm as C

    from layercard.artifacts import read_json
    from layercard.card import Card

    card = Card.load(P.RESULTS / "cards" / task / "card.json")
    ref_sig = P.signature(P._reference(card))
    ref_path = P._run_path(task, ref_sig, 0, _out() / "runs")
    out = []
    for p in C.placements(task):
        path = P._run_path(task, p["signature"], 0, _out() / "runs")
        if not path.is_file() or not ref_path.is_file():
            return None
        out.append(
            {"label": p["label"], "units": p["units"], "test_loss": float(read_json(path)["test_loss"])}
        )
    return out, float(read_json(ref_path)["test_loss"])


def confirm_records_at_batch(usual: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The confirmation tasks' records as pooled_quality.py's ``confirm_records`` gives them (``usual``, read
    when not given), with gsm8k's and samsum's taken from their runs at BATCH instead."""
    import placement_v2 as P
    import pooled_quality as Q

    from layercard.artifacts import read_json

    usual = Q.confirm_records() if usual is None else usual
    out = [r for r in usual if r["task"] not in TASKS]
    for task in TASKS:
        got = batch4_placements(task)
        if got is None:
            raise SystemExit(
                f"{task} has placements without a run at batch {BATCH}; run batch_v2.py run --all first"
            )
        base = float(read_json(P.RESULTS / "runs" / task / "base.json")["test_loss"])
        out += Q.placement_records(task, got[0], base, got[1])
    return out


def rescore() -> dict[str, Any]:
    """The pooled forms, frozen at their committed fit on ten tasks, and the default on the confirmation
    tasks with gsm8k's and samsum's fractions at BATCH; beside them the same at the task's own batch."""
    import placement_v2 as P
    import pooled_quality as Q

    from layercard.artifacts import read_json, write_json, write_text

    pooled = read_json(Q.OUT / "pooled.json")
    at_b0 = Q.confirm_records()
    at_b4 = confirm_records_at_batch(at_b0)
    out: dict[str, Any] = {"batch": BATCH, "chosen": pooled["rule"]["chosen"], "forms": {}, "tasks": {}}
    for t in TASKS:
        f0 = {r["name"]: r["fraction"] for r in at_b0 if r["task"] == t}
        f4 = {r["name"]: r["fraction"] for r in at_b4 if r["task"] == t}
        if set(f0) != set(f4):
            raise SystemExit(f"rescore: {t}'s placements differ between batches: {sorted(set(f0) ^ set(f4))}")
        m0, m4 = statistics.fmean(f0.values()), statistics.fmean(f4.values())
        out["tasks"][t] = {
            "placements": len(f0),
            "usual_batch": P.TASKS[t].batch_size,
            "fractions": {n: [f0[n], f4[n]] for n in sorted(f0)},
            "mean": [m0, m4],
            "change": m4 - m0,
        }
    rows = {"usual": Q.rows_of(at_b0), "batch": Q.rows_of(at_b4)}
    models = {f.name: (f, pooled["forms"][f.name]["pooled"]["params"]) for f in Q.FORMS}
    for name, (form, params) in models.items():
        out["forms"][name] = {
            w: _with_mean(Q.per_task_scores(Q.predict(form, params, r), r)) for w, r in rows.items()
        }
    out["default"] = {w: _with_mean(Q._default_scores(r)) for w, r in rows.items()}
    chosen = out["forms"][out["chosen"]]["batch"]["mean"]
    conds = Q.adopted(chosen, pooled["forms"][out["chosen"]]["choosing_seed0"])
    conds["below_default"] = chosen["mae"] < out["default"]["batch"]["mean"]["mae"]
    out["conditions"], out["adopted"] = conds, all(conds.values())
    write_json(_out() / "rescore.json", out)
    write_text(_out() / "rescore.md", _rescore_markdown(out))
    return out


def _with_mean(by: dict[str, dict[str, float]]) -> dict[str, Any]:
    import pooled_quality as Q

    return {"tasks": by, "mean": Q.task_mean(by)}


def _rescore_markdown(out: dict[str, Any]) -> str:
    import pooled_quality as Q

    b = out["batch"]
    tasks = list(out["default"]["batch"]["tasks"])

    def cells(v: dict[str, Any]) -> str:
        per = " | ".join(
            f"{v['usual']['tasks'][t]['mae']:.3f} → {v['batch']['tasks'][t]['mae']:.3f}"
            if t in TASKS
            else f"{v['batch']['tasks'][t]['mae']:.3f}"
            for t in tasks
        )
        u, n = v["usual"]["mean"], v["batch"]["mean"]
        return f"{per} | {u['mae']:.3f} / {u['regret']:.3f} → **{n['mae']:.3f}** / {n['regret']:.3f} |"

    lines = [
        f"# The confirmation check with gsm8k and samsum at batch {b}",
        "",
        f"Every LoRA placement the confirmation check scores on gsm8k and samsum, re-trained at batch {b} "
        "(placement benchmark v2's settings and cards, seed 0) and taken against the reference at the same "
        f"batch; facts and format as before (trained at batch {b} already). The forms are frozen at their "
        "fit on ten tasks (pooled.json); nothing here was fitted. Cells: error at the task's own batch → at "
        f"batch {b}.",
        "",
        "## The level",
        "",
        "| task | placements | mean fraction | change |",
        "|---|---:|---:|---:|",
    ]
    for t, v in out["tasks"].items():
        lines.append(
            f"| {t} (batch {v['usual_batch']} → {b}) | {v['placements']} | "
            f"{v['mean'][0]:.3f} → {v['mean'][1]:.3f} | {v['change']:+.3f} |"
        )
    lines += [
        "",
        "## Error of the fraction",
        "",
        "| model | " + " | ".join(tasks) + " | mean error / regret |",
        "|---|" + "---:|" * (len(tasks) + 1),
        "| two-task model (the default before) | " + cells(out["default"]),
    ]
    for name, v in out["forms"].items():
        mark = " (chosen)" if name == out["chosen"] else ""
        lines.append(f"| `{name}`{mark} | " + cells(v))
    c = out["conditions"]
    yes = lambda k: "met" if c[k] else "not met"  # noqa: E731
    lines += [
        "",
        f"Adoption of `{out['chosen']}`, all four: confirmation error ≤ {Q.ADOPTION['confirm_mae']} "
        f"({yes('confirm_mae')}), regret ≤ {Q.ADOPTION['confirm_regret']} ({yes('confirm_regret')}), e2e_nlg "
        f"and sst2 held out ≤ {Q.ADOPTION['choosing_mae']} ({yes('choosing_mae')}), error below the "
        f"default's on the same runs ({yes('below_default')}): "
        f"**{'adopted' if out['adopted'] else 'not adopted'}**.",
    ]
    return "\n".join(lines) + "\n"


def _markdown(out: dict[str, Any]) -> str:
    import fresh_tasks as F
    import placement_v2 as P

    b = out["batch"]
    lines = [
        f"# gsm8k and samsum at batch {b}: the level of the fractions",
        "",
        f"smollm2, placement benchmark v2's settings and cards ({P.STEPS} steps, lr {P.LR:g}, seed 0), at "
        f"the task's own batch and at batch {b}; each fraction against the reference at the same batch, "
        f"placements at {out['budget']}. Cells: fraction at the task's batch → at batch {b}.",
        "",
        "| task | reference's drop (nats) | "
        + " | ".join(f"`{c}`" for c in CANDIDATES)
        + " | mean | change |",
        "|---|---:|" + "---:|" * (len(CANDIDATES) + 2),
    ]
    for t, v in out["tasks"].items():
        b0 = v["usual_batch"]
        lines.append(f"| {t} (batch {b0}) | " + F.level_cells(v, CANDIDATES, b0, b))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "summary", "rescore"))
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated of {', '.join(TASKS)}")
    ap.add_argument("--all", action="store_true", help="run: every placement the confirmation check scores")
    a = ap.parse_args()
    if a.what == "run":
        for t in a.tasks.split(","):
            if t not in TASKS:
                raise SystemExit(f"--tasks: unknown task {t!r}; valid: {', '.join(TASKS)}")
        run(a.tasks.split(","), every=a.all)
    if a.what == "rescore":
        print(_rescore_markdown(rescore()))
        return
    print(_markdown(summary()))


if __name__ == "__main__":
    main()
