"""The phases (sub-commands) that measure: cards, single, select, confirm, policies and trim."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from layercard.artifacts import write_json

from .jobs import Job, Variant, grid_jobs, single_jobs, spearman_or_none, variants
from .ledger import trim_entry
from .measure import card_code_hash, now
from .runner import Bench
from .settings import CONFIRM_FILE
from .text import fmt, layers_text


def phase_cards(bench: Bench) -> None:
    """One card per task, with the top-4 layers of the card's own scores."""
    for t in bench.task_names:
        card = bench.card(t)
        v = variants(bench.s)
        top = {x.name: layers_text(sorted(np.argsort(-x.layer_scores(card))[:4].tolist())) for x in v[-6:]}
        print(f"  {t}: top-4 layers by score: " + "; ".join(f"{k} {w}" for k, w in top.items()))
    bench.check_base(full=True)


def phase_single(bench: Bench) -> None:
    """The base model's evaluation and the single-layer runs of every task."""
    for t in bench.task_names:
        bench.card(t)
        bench.result(None, t, execute=True)
        for job in single_jobs(bench.s, [t]):
            bench.result(job, t, execute=True)
        bench.check_base(full=True)


def single_drops(bench: Bench, task: str) -> tuple[dict[int, float], list[str]]:
    """Measured test-loss drop (base − run) per single layer, and what is missing."""
    base = bench.result(None, task, execute=False)
    drops: dict[int, float] = {}
    missing: list[str] = [] if base else [f"{task} base model"]
    for job in single_jobs(bench.s, [task]):
        r = bench.result(job, task, execute=False)
        if r is None or r.get("status") == "no_plan":
            missing.append(job.label)
        elif base:
            drops[int(job.layer)] = base["eval"]["test_loss"] - r["eval"]["test_loss"]  # type: ignore[arg-type]
    return drops, missing


def spearman_table(bench: Bench, task: str) -> dict[str, Any] | None:
    """Spearman of every score variant's per-layer prediction with the measured single-layer drops."""
    card = bench.card(task, compute=False)
    drops, missing = single_drops(bench, task)
    if card is None or missing:
        return None
    layers = sorted(drops)
    measured = [drops[k] for k in layers]
    rows = {}
    for v in variants(bench.s):
        sc = v.layer_scores(card)
        rows[v.name] = {
            "spearman": spearman_or_none([sc[k] for k in layers], measured),
            "predicted": [float(sc[k]) for k in layers],
        }
    return {"layers": layers, "measured_drop": measured, "variants": rows}


def _selection_tables(bench: Bench) -> dict[str, Any]:
    tables: dict[str, Any] = {}
    for t in bench.s.select_tasks:
        bench.card(t)
        tab = spearman_table(bench, t)
        if tab is None:
            _, missing = single_drops(bench, t)
            raise SystemExit(
                f"select: {t} lacks single-layer runs ({', '.join(missing[:3])}…); "
                f"run `single --tasks {','.join(bench.s.select_tasks)}` first"
            )
        tables[t] = tab
    return tables


def _choice(bench: Bench, tables: dict[str, Any], vs: list[Variant]) -> tuple[Variant, dict[str, Any]]:
    """The variant with the best mean Spearman over the selection tasks, and the record of the choice."""
    s = bench.s
    mean = {}
    for v in vs:
        vals = [tables[t]["variants"][v.name]["spearman"] for t in s.select_tasks]
        mean[v.name] = None if any(x is None for x in vals) else float(np.mean(vals))
    best = max(vs, key=lambda v: mean[v.name] if mean[v.name] is not None else -math.inf)
    choice = {
        "variant": best.to_dict(),
        "mean_spearman": mean[best.name],
        "selected_on": list(s.select_tasks),
        "spearman": {t: {v.name: tables[t]["variants"][v.name]["spearman"] for v in vs} for t in tables},
        "mean_spearman_all": mean,
        "measured_drop": {
            t: dict(zip(tables[t]["layers"], tables[t]["measured_drop"], strict=True)) for t in tables
        },
        "card_code_hash": card_code_hash(),
        "settings": {"steps": s.steps, "lr": s.lr, "rank": s.rank, "model": s.model},
        "created": now(),
    }
    print("select: mean Spearman over " + ", ".join(s.select_tasks) + " (single-layer drops):")
    for v in vs:
        per = "  ".join(f"{t} {fmt(tables[t]['variants'][v.name]['spearman'], '+.3f')}" for t in tables)
        mark = "  ← best" if v is best else ""
        print(f"  {v.name:22s} {fmt(mean[v.name], '+.3f')}   ({per}){mark}")
    return best, choice


def _change(old: dict[str, Any], choice: dict[str, Any], reason: str | None) -> dict[str, Any]:
    """A refreeze, with the numbers before and after it."""

    def side(d: dict[str, Any]) -> dict[str, Any]:
        keys = ("variant", "mean_spearman", "spearman")
        return {**{k: d[k] for k in keys}, "card_code_hash": d.get("card_code_hash")}

    return {
        "date": now(),
        "reason": reason or "(no reason given)",
        "before": side(old),
        "after": side(choice),
    }


def phase_select(bench: Bench, *, refreeze: bool, reason: str | None) -> None:
    """Freeze the score with the best mean Spearman on the selection tasks (kept unless --refreeze)."""
    tables = _selection_tables(bench)
    best, choice = _choice(bench, tables, variants(bench.s))
    old = bench.frozen()
    if old is not None and not refreeze:
        same = old["variant"]["name"] == best.name
        print(
            f"select: frozen choice {old['variant']['name']} (mean {fmt(old['mean_spearman'], '+.3f')}, "
            f"{old['created']}) kept; today's data {'agree' if same else 'would pick ' + best.name}. "
            "Pass --refreeze (with --reason) to replace it; the change is recorded with before/after "
            "numbers."
        )
        return
    history = list(old.get("history", [])) if old else []
    if old is not None:
        history.append(_change(old, choice, reason))
    write_json(bench.ledger.frozen_path, {"kind": "placement_default_score", **choice, "history": history})
    bench.forget_plans()
    print(f"select: froze {best.name} → {bench.ledger.frozen_path}")


def phase_confirm(bench: Bench) -> None:
    """The frozen score's Spearman on the confirmation tasks, unchanged (and every score's, for show)."""
    v = bench.frozen_variant()
    if v is None:
        raise SystemExit("confirm: no frozen default score; run `select` first")
    out: dict[str, Any] = {"variant": v.to_dict(), "tasks": {}, "created": now()}
    for t in bench.s.confirm_tasks:
        bench.card(t)
        tab = spearman_table(bench, t)
        if tab is None:
            print(f"confirm: {t} lacks single-layer runs; run `single --tasks {t}`")
            continue
        rho = tab["variants"][v.name]["spearman"]
        out["tasks"][t] = {
            "frozen_spearman": rho,
            "all": {k: r["spearman"] for k, r in tab["variants"].items()},
        }
        best = max(tab["variants"].items(), key=lambda kv: kv[1]["spearman"] or -math.inf)
        print(
            f"confirm: {t}: frozen {v.name} Spearman {fmt(rho, '+.3f')} "
            f"(best on this task, for transparency only: {best[0]} {fmt(best[1]['spearman'], '+.3f')})"
        )
    write_json(bench.results / CONFIRM_FILE, out)


def phase_policies(bench: Bench) -> None:
    """The budget × policy grid and the seed repeats (``--only`` / ``--groups`` narrow them)."""
    if bench.frozen_variant() is None:
        raise SystemExit("policies: no frozen default score; run `single` and `select` first")
    for t in bench.task_names:
        bench.card(t)
        bench.result(None, t, execute=True)
        for job in grid_jobs(bench.s, [t], bench.only, bench.groups):
            r = bench.result(job, t, execute=True)
            if r is not None and r.get("status") == "no_plan":
                print(f"[skip] {job.label}: {r['reason']}")
        bench.check_base(full=True)


def phase_trim(bench: Bench) -> None:
    """Trim each task's all-30 run on held-out test examples and evaluate the trimmed adapter."""
    from layercard.artifacts import read_json

    for t in bench.task_names:
        bench.card(t)
        r = bench.result(Job(t, "grid", "all"), t, execute=True)
        assert r is not None
        out = bench.ledger.trim_dir(t, r["key"])
        if not (out / "trim.json").is_file():
            _trim(bench, t, r["key"])
        if not (out / "eval_trimmed.json").is_file():
            ev = bench.evaluate(t, out / "adapter-trimmed")
            write_json(out / "eval_trimmed.json", {"kind": "placement_trim_eval", "eval": ev})
            bench.check_base(full=True)
        if bench.ledger.trim(t, r["key"]) is None:
            summary = trim_entry(
                read_json(out / "trim.json"), read_json(out / "eval_trimmed.json")["eval"], r["eval"]
            )
            bench.ledger.store_trim(t, r["key"], summary, "trim phase")


def _trim(bench: Bench, task: str, key: str) -> None:
    from layercard.trim import TrimConfig, trim

    ts, s = bench.s.task(task), bench.s
    bench.count_new(f"{task} trim")
    test = bench.task(task, "test")
    held_out = test.subset(ts.trim_examples, seed=s.eval_seed, offset=ts.loss_examples)
    cfg = TrimConfig(
        examples=None,
        batch_size=s.eval_batch_size,
        max_new_tokens=ts.max_new_tokens,
        max_length=ts.max_length,
        radius=s.trim_radius,
        latency_repeats=1,
        seed=s.eval_seed,
    )
    print(f"[trim] {task}: all-30 adapter on {len(held_out)} held-out test examples", flush=True)
    adapter = bench.ledger.run_dir(key) / "train" / "adapter"
    res = trim(bench.loaded, adapter, held_out, cfg, bench.ledger.trim_dir(task, key), progress=False)
    print(
        f"  boundary K={res['chosen_k']}: {len(res['adapted_modules_before'])} → "
        f"{len(res['adapted_modules_after'])} modules",
        flush=True,
    )
    bench.check_base()
