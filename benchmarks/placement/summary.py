"""The report's numbers: one row per job, per-task summaries, seed spreads, prediction checks and trims."""

from __future__ import annotations

from typing import Any

import numpy as np

from layercard.artifacts import read_json

from .jobs import Job, grid_jobs, single_jobs, spearman_or_none, variants
from .ledger import trim_entry
from .runner import Bench
from .settings import FULL_POLICIES, SMALL_POLICIES, Settings

_PREDICTED = ("score", "gain", "fraction", "additive_gain", "redundancy", "step_time_s", "params", "modules")


# ---------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------


def collect_rows(bench: Bench) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per job (done, missing or without placement) and the base results per task."""
    rows: list[dict[str, Any]] = []
    bases: dict[str, Any] = {}
    for t in bench.task_names:
        if bench.card(t, compute=False) is None:
            bases[t] = None
            continue
        bases[t] = bench.result(None, t, execute=False)
        for job in single_jobs(bench.s, [t]) + grid_jobs(bench.s, [t]):
            rows.append(_row(bench, job, bench.result(job, t, execute=False)))
    return rows, bases


def _row(bench: Bench, job: Job, r: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "task": job.task,
        "group": job.group,
        "policy": job.policy,
        "budget": job.budget,
        "plan_seed": job.plan_seed,
        "train_seed": job.train_seed,
        "layer": job.layer,
    }
    plan, why = bench.plan(job)
    if plan is None:
        row.update(status="no_plan", note=why)
        return row
    row["layers"] = list(plan.layers)
    row["n_layers"] = len(plan.layers)
    # A single layer's prediction is its card score, which the Spearman tables compare; its row has none.
    if job.group != "single":
        if plan.predicted:
            row["predicted"] = {k: plan.predicted.get(k) for k in _PREDICTED}
        if plan.warnings:
            row["plan_warnings"] = plan.warnings
    if r is None:
        row["status"] = "missing"
        return row
    tr, ev = r.get("train", {}), r["eval"]
    row.update(
        status="done",
        run=r["key"],
        trainable_params=tr.get("trainable_params"),
        modules=tr.get("modules"),
        s_per_step=tr.get("s_per_step"),
        peak_memory_mib=tr.get("peak_memory_mib"),
        peak_memory_kind=tr.get("peak_memory_kind"),
        test_loss=ev["test_loss"],
        metric_name=ev.get("metric_name"),
        metric=ev.get("metric"),
        metrics=ev.get("metrics"),
        final_train_loss=tr.get("final_train_loss"),
        wall_s=r.get("wall_s"),
        load_avg=r.get("load_avg"),
    )
    return row


# ---------------------------------------------------------------------------------------------------------
# Per-task summaries
# ---------------------------------------------------------------------------------------------------------


def grid_rows(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["task"] == task and r["group"] == "grid"]


def policy_value(rows: list[dict[str, Any]], policy: str, budget: int | None, field: str) -> float | None:
    """A policy's value at a budget (training seed 0); random is the mean over its placement seeds."""
    vals = [
        r.get(field)
        for r in rows
        if r["policy"] == policy and r["budget"] == budget and r["status"] == "done" and r["train_seed"] == 0
    ]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _spread(v: list[float]) -> dict[str, Any]:
    return {
        "mean": float(np.mean(v)),
        "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
        "min": float(min(v)),
        "max": float(max(v)),
        "range": float(max(v) - min(v)),
    }


def seed_stats(rows: list[dict[str, Any]], s: Settings, task: str) -> dict[str, Any]:
    """Mean and spread over training seeds for the repeated policies; the spread is the noise threshold."""
    out: dict[str, Any] = {}
    for p in s.repeat_policies:
        b = None if p == "all" else s.repeat_budget
        runs = [
            r
            for r in rows
            if r["task"] == task
            and r["policy"] == p
            and r["budget"] == b
            and r["status"] == "done"
            and r["group"] in ("grid", "repeat")
            and r["plan_seed"] == 0
        ]
        if not runs:
            continue
        entry: dict[str, Any] = {"n": len(runs), "seeds": sorted(r["train_seed"] for r in runs)}
        for field in ("test_loss", "metric"):
            v = [r[field] for r in runs if r.get(field) is not None]
            if v:
                entry[field] = _spread(v)
        out[p] = entry
    full = [e for e in out.values() if e["n"] >= len(s.repeat_seeds) + 1]
    noise = {}
    for field in ("test_loss", "metric"):
        ranges = [e[field]["range"] for e in full if field in e]
        noise[field] = max(ranges) if ranges else None
    return {"policies": out, "noise": noise, "complete": len(full) == len(s.repeat_policies)}


def _seed_means(seeds: dict[str, Any], base_loss: float | None, s: Settings) -> dict[str, Any] | None:
    """Card against the other repeated policies on their means over every training seed."""
    n = len(s.repeat_seeds) + 1
    means = {
        p: e["test_loss"]["mean"] for p, e in seeds["policies"].items() if e["n"] >= n and "test_loss" in e
    }
    others = [p for p in means if p not in ("card", "all")]
    if "card" not in means or not others:
        return None
    best = min(others, key=lambda p: means[p])
    d = means["card"] - means[best]
    thr = seeds["noise"].get("test_loss")
    out: dict[str, Any] = {
        "means": means,
        "best_other": best,
        "loss_diff_vs_best_other": d,
        "difference_real": abs(d) > thr if thr is not None else None,
    }
    if base_loss is not None and "all" in means and base_loss - means["all"] > 0:
        all_drop = base_loss - means["all"]
        out["card_gap_to_all30_pct"] = 100 * (all_drop - (base_loss - means["card"])) / all_drop
    return out


def task_summary(
    rows: list[dict[str, Any]],
    base: dict[str, Any] | None,
    s: Settings,
    task: str,
    noise_ref: dict[str, float | None],
) -> dict[str, Any]:
    """Card's rank per budget, its gap to all-30 in % of the all-30 improvement and its relative cost."""
    ts = s.task(task)
    g = grid_rows(rows, task)
    base_loss = base["eval"]["test_loss"] if base else None
    all_loss = policy_value(g, "all", None, "test_loss")
    all_drop = base_loss - all_loss if base_loss is not None and all_loss is not None else None
    seeds = seed_stats(rows, s, task)
    own_noise = seeds["noise"] if seeds["policies"] else None
    noise = own_noise if own_noise and own_noise.get("test_loss") is not None else noise_ref
    out: dict[str, Any] = {
        "base": {
            "test_loss": base_loss,
            "metric": base["eval"].get("metric") if base else None,
            "metric_name": base["eval"].get("metric_name") if base else None,
        },
        "all30": {
            f: policy_value(g, "all", None, f)
            for f in ("test_loss", "metric", "s_per_step", "peak_memory_mib", "trainable_params", "modules")
        },
        "all30_drop": all_drop,
        "seeds": seeds,
        "seed_means": _seed_means(seeds, base_loss, s),
        "noise": noise,
        "noise_source": "own seed repeats"
        if noise is own_noise
        else "largest spread on the seed-repeat tasks",
        "budgets": {},
    }
    budgets = s.budgets if ts.grid == "full" else (s.small_budget,)
    policies = FULL_POLICIES if ts.grid == "full" else SMALL_POLICIES
    for b in budgets:
        table = []
        for p in policies:
            loss = policy_value(g, p, b, "test_loss")
            if loss is None:
                continue
            table.append(
                {
                    "policy": p,
                    "test_loss": loss,
                    "metric": policy_value(g, p, b, "metric"),
                    "s_per_step": policy_value(g, p, b, "s_per_step"),
                    "peak_memory_mib": policy_value(g, p, b, "peak_memory_mib"),
                }
            )
        entry: dict[str, Any] = {"n_policies": len(table), "complete": len(table) == len(policies)}
        _rank_card(entry, table, noise, base_loss, all_drop, out["all30"])
        entry["table"] = table
        out["budgets"][str(b)] = entry
    return out


def _rank_card(
    entry: dict[str, Any],
    table: list[dict[str, Any]],
    noise: dict[str, Any] | None,
    base_loss: float | None,
    all_drop: float | None,
    all30: dict[str, Any],
) -> None:
    """Rankings of one budget's table, and where `card` stands in it (added to ``entry``)."""
    by_loss = sorted(table, key=lambda r: r["test_loss"])
    entry["ranking_loss"] = [r["policy"] for r in by_loss]
    with_metric = [r for r in table if r["metric"] is not None]
    by_metric = sorted(with_metric, key=lambda r: -r["metric"])
    entry["ranking_metric"] = [r["policy"] for r in by_metric]
    card = next((r for r in table if r["policy"] == "card"), None)
    if card is None:
        return
    # Rank = 1 + the number of policies strictly better: ties share a rank.
    entry["card_rank_loss"] = 1 + sum(r["test_loss"] < card["test_loss"] for r in table)
    if card["metric"] is not None:
        entry["card_rank_metric"] = 1 + sum(r["metric"] > card["metric"] for r in with_metric)
    others = [r for r in by_loss if r["policy"] != "card"]
    if others:
        best = others[0]
        d = card["test_loss"] - best["test_loss"]  # > 0: card is worse
        thr = noise.get("test_loss") if noise else None
        entry.update(
            card_wins=d < 0,
            card_ties=d == 0,
            best_other=best["policy"],
            loss_diff_vs_best_other=d,
            difference_real=(abs(d) > thr) if thr is not None else None,
            noise_threshold=thr,
        )
    if base_loss is not None and all_drop:
        drop = base_loss - card["test_loss"]
        entry["card_drop"] = drop
        entry["card_fraction_of_all30"] = drop / all_drop
        entry["card_gap_to_all30_pct"] = 100 * (all_drop - drop) / all_drop
    if all30["s_per_step"] and card["s_per_step"]:
        entry["card_s_per_step_rel_all30"] = card["s_per_step"] / all30["s_per_step"]
    if all30["peak_memory_mib"] and card["peak_memory_mib"]:
        entry["card_peak_memory_rel_all30"] = card["peak_memory_mib"] / all30["peak_memory_mib"]


def placement_prediction(
    rows: list[dict[str, Any]], bench: Bench, task: str, base: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Predicted set gain (every score, coupled as in §4) vs measured drop over a task's placements."""
    from layercard.card.stats import set_gain

    card = bench.card(task, compute=False)
    if card is None or base is None:
        return None
    seen: dict[tuple[int, ...], float] = {}
    for r in rows:
        if r["task"] == task and r["group"] == "grid" and r["status"] == "done" and r["train_seed"] == 0:
            seen.setdefault(tuple(r["layers"]), base["eval"]["test_loss"] - r["test_loss"])
    if len(seen) < 3:
        return None
    n = card.n_layers
    c = np.eye(n)
    if card.coupling is not None:
        idx = [int(x) for x in card.coupling["layers"]]
        c[np.ix_(idx, idx)] = np.asarray(card.coupling["matrix"], dtype=np.float64)
    sets = list(seen)
    measured = [seen[k] for k in sets]
    out: dict[str, Any] = {"n_placements": len(sets), "variants": {}}
    for v in variants(bench.s):
        g = v.layer_scores(card)
        coupled = [set_gain(g[list(S)], c[np.ix_(list(S), list(S))]) for S in sets]
        additive = [float(np.clip(g[list(S)], 0, None).sum()) for S in sets]
        out["variants"][v.name] = {
            "spearman_coupled": spearman_or_none(coupled, measured),
            "spearman_additive": spearman_or_none(additive, measured),
        }
    return out


def trim_summary(bench: Bench, task: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trim of the task's all-30 run: from the ledger, else its trim folder, else the last report.

    The trim folder lives in the run cache (not committed), and trims made before the ledger held them
    are kept only in the report made then: the first report that finds one records it in the ledger.
    """
    r = next(
        (
            x
            for x in rows
            if x["task"] == task and x["policy"] == "all" and x["group"] == "grid" and x["status"] == "done"
        ),
        None,
    )
    if r is None:
        return None
    key = r["run"]
    recorded = bench.ledger.trim(task, key)
    if recorded is not None:
        return recorded
    folder = bench.ledger.trim_dir(task, key)
    if (folder / "trim.json").is_file():
        done = (folder / "eval_trimmed.json").is_file()
        ev = read_json(folder / "eval_trimmed.json")["eval"] if done else None
        summary = trim_entry(read_json(folder / "trim.json"), ev, r)
        if done:
            bench.ledger.store_trim(task, key, summary, "trim folder")
        return summary
    prev = bench.ledger.previous_report() or {}
    same_run = any(
        x["task"] == task and x["policy"] == "all" and x["group"] == "grid" and x.get("run") == key
        for x in prev.get("rows", [])
    )
    summary = (prev.get("trim") or {}).get(task) if same_run else None
    if summary is not None:
        bench.ledger.store_trim(task, key, summary, "previous report")
    return summary
