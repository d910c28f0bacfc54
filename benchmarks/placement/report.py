"""The report phase: every recorded result into RESULTS/placement.{json,md} and the PNG plots.

The report is a function of the results folder (the ledger, the saved cards, the frozen score) and of the
library's planner: run on an unchanged results folder it rewrites the same bytes, its `created` stamp
included (kept while nothing else changed).
"""

from __future__ import annotations

from typing import Any

from layercard.artifacts import machine_info, package_versions, read_json, sha256_json, write_json, write_text

from .ledger import scrub_ledger
from .markdown import markdown
from .measure import card_code_hash, now
from .phases import spearman_table
from .plots import plots
from .runner import Bench
from .settings import CONFIRM_FILE, REPORT_JSON, REPORT_MD, why
from .summary import collect_rows, placement_prediction, seed_stats, task_summary, trim_summary


def _noise_ref(rows: list[dict[str, Any]], bench: Bench) -> dict[str, Any]:
    """The largest seed spread of the seed-repeat tasks: the noise threshold of tasks without repeats."""
    s = bench.s
    seeds_noise = [seed_stats(rows, s, t)["noise"] for t in bench.task_names if s.task(t).grid == "full"]
    # Borrowed only for the loss: the tasks' metrics have different units (BLEU, accuracy, ROUGE).
    return {
        "test_loss": max(
            [n["test_loss"] for n in seeds_noise if n.get("test_loss") is not None], default=None
        ),
        "metric": None,
    }


def _cards(bench: Bench) -> dict[str, Any]:
    cards = {}
    for t in bench.task_names:
        card = bench.card(t, compute=False)
        if card is not None:
            cards[t] = {
                "timings": card.timings,
                "loss": card.loss,
                "n_target_tokens": card.n_target_tokens,
                "code_hash": bench.card_meta(t).get("code_hash"),
                "cost_model": card.cost,
            }
    return cards


def _card_code(bench: Bench, cards: dict[str, Any], frozen: dict[str, Any] | None) -> tuple[str, str | None]:
    """The card code the report's cards were made with, and a note when the frozen score is older.

    The source's hash today only decides whether the phases that train recompute a card; the report
    describes the cards the recorded runs were planned with.
    """
    live = card_code_hash()
    made_by = sorted({c["code_hash"] for c in cards.values() if c.get("code_hash")})
    if bench.earlier_code_cards:
        print(
            f"report: the cards of {', '.join(sorted(bench.earlier_code_cards))} were made by earlier card "
            "code; the phases that train recompute them first"
        )
    if len(made_by) > 1:
        return live, (
            f"the cards were made by {len(made_by)} versions of the card code: re-run `cards`, then "
            "`select --refreeze --reason ...` so the change is listed with its before/after numbers"
        )
    code = made_by[0] if made_by else live
    if frozen and frozen.get("card_code_hash") != code:
        return code, (
            "the card's code changed after the default score was frozen: re-run `select --refreeze "
            "--reason ...` so the change is listed with its before/after numbers"
        )
    return code, None


def build_report(bench: Bench, est: dict[str, Any] | None) -> dict[str, Any]:
    """placement.json's content, from whatever is recorded."""
    s = bench.s
    measured = bench.ledger.measured_on() or [{"machine": machine_info(), "versions": package_versions()}]
    rows, bases = collect_rows(bench)
    frozen = bench.frozen()
    confirm = read_json(bench.results / CONFIRM_FILE) if (bench.results / CONFIRM_FILE).is_file() else None
    spearman = {t: spearman_table(bench, t) for t in bench.task_names if bench.card(t, compute=False)}
    ref = _noise_ref(rows, bench)
    summary = {t: task_summary(rows, bases.get(t), s, t, ref) for t in bench.task_names if bases.get(t)}
    for t, sm in summary.items():
        base = bases[t]
        all_drop = sm["all30_drop"]
        for r in rows:
            if r["task"] == t and r["status"] == "done":
                r["drop"] = base["eval"]["test_loss"] - r["test_loss"]
                r["fraction_of_all30"] = r["drop"] / all_drop if all_drop else None
    prediction = {t: placement_prediction(rows, bench, t, bases.get(t)) for t in bench.task_names}
    trims = {t: trim_summary(bench, t, rows) for t in bench.task_names}
    cards = _cards(bench)
    status = {k: sum(r["status"] == k for r in rows) for k in ("done", "missing", "no_plan")}
    code, code_note = _card_code(bench, cards, frozen)
    return {
        "kind": "placement_benchmark",
        "created": now(),
        "settings": s.to_dict(),
        "why": why(s),
        "machine": measured[0]["machine"],
        "versions": measured[0]["versions"],
        "measured_on": measured,
        "estimate": est,
        "status": status,
        "frozen_default": frozen,
        "confirm": confirm,
        "spearman_single_layer": spearman,
        "spearman_placements": prediction,
        "summary": summary,
        "trim": trims,
        "cards": cards,
        "changes_after_results": list(frozen.get("history", [])) if frozen else [],
        "card_code_hash": code,
        "card_code_note": code_note,
        "base": {t: (b["eval"] if b else None) for t, b in bases.items()},
        "rows": rows,
    }


def keep_created(out: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """``out`` with the previous report's `created` stamp when nothing else differs from it.

    So re-running the report on unchanged results leaves its files byte for byte as they were.
    """
    if previous and "created" in previous:
        if sha256_json({**out, "created": previous["created"]}) == sha256_json(previous):
            return {**out, "created": previous["created"]}
    return out


def report(bench: Bench, est: dict[str, Any] | None) -> dict[str, Any]:
    """Collect every recorded result into RESULTS/placement.{json,md} and the PNG plots."""
    scrubbed = scrub_ledger(bench.results)
    if scrubbed:
        print(f"report: removed dataset texts from {scrubbed} ledger files")
    previous = bench.ledger.previous_report()
    out = keep_created(build_report(bench, est), previous)
    bench.results.mkdir(parents=True, exist_ok=True)
    write_json(bench.results / REPORT_JSON, out)
    write_text(bench.results / REPORT_MD, markdown(out, bench))
    plots(out, bench)
    st = out["status"]
    print(
        f"report: {st['done']} placements measured, {st['missing']} missing, "
        f"{st['no_plan']} without placement → {bench.results / REPORT_MD}"
    )
    return out
