"""What the report's sections and tables say: which data each hash is of, the sweep's columns, one number
format per quantity, the tables the text refers to, and the work behind each latency."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import restaged
from test_pipeline import make_model_dir, make_run, tiny_config, write_config

from layercard.report import build_report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run of layer policies (a set gain each), trimmed by the task's metric."""
    return make_run(tmp_path_factory.mktemp("report_fixes"))[1]


@pytest.fixture(scope="module")
def search_run(tmp_path_factory) -> Path:
    """A tiny run of the search policies (quality predicted, no set gain), trimmed by loss."""
    from layercard.pipeline import load_config, run_pipeline

    root = tmp_path_factory.mktemp("report_fixes_search")
    cfg = tiny_config(make_model_dir(root))
    cfg["card"] = {**cfg["card"], "roles": "all-linear", "coupling": False}
    cfg["placements"] = [
        {"name": "recommend", "policy": "recommend", "budget": "params=0.25x"},
        {"name": "reference", "policy": "all-linear", "rank": 8},
    ]
    cfg["trim"] = {**cfg["trim"], "metric": "loss", "placement": "recommend"}
    run_pipeline(load_config(write_config(root, cfg)), root / "run", progress=False)
    return root / "run"


def _table(md: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header starts with ``first_header``, as header → cell."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_header))
    cols = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(cols, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_provenance_names_the_data_each_hash_is_of(run_dir):
    """The card's hash is of its probe subset; the training and evaluation data have hashes of their own,
    from the artifacts that read them."""
    md = (run_dir / "report.md").read_text()
    probe = _json(run_dir / "card" / "card.json")["task"]["data_hash"]
    trained = {_json(p)["task"]["data_hash"] for p in (run_dir / "train").glob("*/train_metrics.json")}
    evaluated = {_json(p)["task"]["data_hash"] for p in (run_dir / "eval").glob("*/eval.json")}
    assert len(trained) == len(evaluated) == 1
    (train_hash,), (eval_hash,) = trained, evaluated
    assert len({probe, train_hash, eval_hash}) == 3  # three data sets, so three hashes to tell apart
    provenance = md[md.index("## Provenance") :]
    assert re.search(rf"the card's probe subset \([^)]*8 examples\) sha256 {probe[:16]}…", provenance)
    assert re.search(rf"training data \([^)]*train[^)]*\) sha256 {train_hash[:16]}…", provenance)
    assert re.search(rf"evaluation data \([^)]*test[^)]*\) sha256 {eval_hash[:16]}…", provenance)
    assert "task data sha256" not in md


def test_a_sweep_by_loss_shows_its_loss_column_once(search_run):
    from layercard.report.tables import sweep_table

    md = (search_run / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| K |"))
    assert header.count("| loss |") == 1
    # and with text metrics scored beside it: the selection metric first, each column once
    trim = {
        "metric": "loss",
        "metrics": ["exact_match", "token_f1"],
        "chosen_k": 1,
        "sweep": [
            {"k": k, "n_adapted_layers": k + 1, "adapted_modules": 2 * k + 2, "loss": 3.9 - k / 10,
             "metrics": {"exact_match": 0.0, "token_f1": 0.25}, "s_per_example": 0.3}
            for k in (0, 1)
        ],
    }  # fmt: skip
    table = sweep_table(trim)
    assert table.header[3:] == ["loss", "exact_match", "token_f1", "s/example"]
    assert table.header.count("loss") == 1 and all(len(r) == len(table.header) for r in table.rows)
    by_metric = sweep_table({**trim, "metric": "token_f1"})
    assert by_metric.header[3:] == ["token_f1", "exact_match", "loss", "s/example"]


def test_the_sweep_and_training_tables_format_losses_and_metrics_as_the_others(run_dir):
    """Losses with four decimals and task metrics with three, in the sweep and training tables too."""
    from layercard.report import read_train_metrics
    from layercard.report.tables import sweep_table, train_table

    md = (run_dir / "report.md").read_text()
    trim = _json(run_dir / "trim" / "trim.json")
    sweep = _table(md, "| K |")
    assert sweep and trim["metric"] != "loss"
    for row in sweep:
        assert re.fullmatch(r"\d+\.\d{4}", row["loss"]), row
        for m in trim["metrics"]:
            assert re.fullmatch(r"\d\.\d{3}", row[m]), row
    for row in _table(md, "| placement | steps |"):
        assert re.fullmatch(r"\d+\.\d{4} → \d+\.\d{4}", row["train loss first → last"]), row
        assert re.fullmatch(r"\d+\.\d{4}", row["val loss"]), row
    # digits a general format drops: a last loss of 3.6102 is not 3.61, a metric of 0 is 0.000
    m = read_train_metrics(next((run_dir / "train").glob("*/train_metrics.json")))
    row = train_table({"p": dataclasses.replace(m, first_train_loss=6.46709, final_train_loss=3.61020)}).rows[
        0
    ]
    assert "6.4671 → 3.6102" in row
    one = {"k": 0, "n_adapted_layers": 1, "adapted_modules": 2, "loss": 3.8967171, "metrics": {"em": 0.0}}
    cells = sweep_table({"metric": "em", "metrics": ["em"], "chosen_k": 0, "sweep": [one]}).rows[0]
    assert cells[3:5] == ["0.000", "3.8967"]


def test_quality_without_a_set_gain_is_set_against_the_measured_in_the_recommendation_table(
    search_run, run_dir, tmp_path
):
    md = (search_run / "report.md").read_text()
    said = md[md.index("## Predicted vs measured gain") : md.index("## Quality vs cost")]
    assert "No placement here predicts a set gain" in said
    assert "which the Recommendation table sets against the measured one" in said
    assert "placements table" not in said
    # the table it names is there: the measured and predicted quality side by side
    assert "## Recommendation" in md and "quality measured / predicted" in md
    # a run without a recommendation has no such table: the text names the tables it has
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for path in (copy / "plan").glob("*/plan.json"):
        plan = _json(path)
        plan["predicted"].pop("gain", None)
        path.write_text(json.dumps(plan))
    md = Path(build_report(copy)["markdown"]).read_text()
    said = md[md.index("## Predicted vs measured gain") : md.index("## Quality vs cost")]
    assert "No placement here predicts a set gain" in said
    assert "Recommendation table" not in said and "## Recommendation" not in md
    assert "Plans table" in said


def test_mean_tokens_per_second_is_not_read_as_the_median_step(run_dir):
    md = (run_dir / "report.md").read_text()
    rows = _table(md, "| placement | steps |")
    column = next(c for c in rows[0] if "tokens/s" in c)
    assert column.startswith("mean tokens/s")
    for row in rows:
        m = _json(run_dir / "train" / row["placement"] / "train_metrics.json")
        assert row[column] == f"{m['tokens_per_s']:,.0f}"
    assert "so it need not equal the tokens per step over the median s/step" in md


def test_each_inference_latency_has_the_tokens_it_generated_beside_it(run_dir):
    md = (run_dir / "report.md").read_text()
    rows = _table(md, "| model | adapted layers")
    assert rows
    for row in rows:
        folder = {"base": "base"}.get(row["model"], "trimmed" if row["model"].endswith("-trimmed") else None)
        ev = _json(run_dir / "eval" / (folder or row["model"]) / "eval.json")
        assert row["infer s/example"] == f"{ev['timing']['s_per_example']:.3f}"
        assert row["generated tokens/example"] == f"{ev['timing']['new_tokens'] / ev['n']:.1f}"
    assert "it grows with the tokens a model generates" in md


def test_the_trim_latency_counts_its_passes(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = copy / "trim" / "trim.json"
    trim = _json(path)
    repeats = len(trim["before"]["s_per_example_samples"])
    assert repeats > 1 and f"each the fastest of {repeats} passes." in (run_dir / "report.md").read_text()
    for side in ("before", "after"):
        trim[side]["s_per_example_samples"] = trim[side]["s_per_example_samples"][:1]
    path.write_text(json.dumps(trim))
    restaged(path, copy)
    md = Path(build_report(copy)["markdown"]).read_text()
    assert "trimming above are each one pass." in md and "1 passes" not in md


def test_the_reference_rank_is_the_quality_models(search_run, tmp_path, monkeypatch):
    import layercard.plan.quality as quality

    md = (search_run / "report.md").read_text()
    assert f"every linear module of every layer at rank {quality.REFERENCE_RANK})" in md
    monkeypatch.setattr(quality, "REFERENCE_RANK", 5)
    copy = tmp_path / "run"
    shutil.copytree(search_run, copy)
    assert "every layer at rank 5)" in Path(build_report(copy)["markdown"]).read_text()


def test_fixed_point_figures_round_an_exact_half_up():
    from layercard.report.tables import fmt

    # 2/32 and 13/16 of the examples, 1/8 of the reference's parameters: exact halves printed low before
    assert (fmt(2 / 32, ".3f"), fmt(13 / 16, ".3f"), fmt(0.125, ".2f")) == ("0.063", "0.813", "0.13")
    assert (fmt(1234.5, ",.0f"), fmt(0.30000000000000004, ".2f"), fmt(1.71149, ".4f")) == (
        "1,235",
        "0.30",
        "1.7115",
    )
    assert (fmt(None, ".3f"), fmt(float("nan"), ".3f"), fmt(3, ".2f")) == ("—", "nan", "3.00")
    import numpy as np

    # a numpy float, and values past the default decimal precision, print as before
    assert (fmt(np.float64(0.0625), ".3f"), fmt(1e30, ",.0f")) == ("0.063", f"{10**30:,}")
    assert fmt(np.float32(0.5), ".0f") == "1"  # any numpy float, as a float


def test_names_in_the_markdown_report_are_text_not_html_or_layout(tmp_path):
    """A task or model name is written into report.md as text: no tag a viewer would render, no line break
    that ends a table row or a heading (report.html escapes the same text)."""
    from layercard.report.build import _Doc
    from layercard.report.tables import Table

    odd = 'qa<img src=x onerror="alert(1)">\nrow'
    doc = _Doc(title=f"run {odd}", fig_dir=tmp_path)
    doc.h2(odd)
    doc.p(f"task {odd}")
    doc.table(Table(["task", "loss"], [[odd, "1.0"]]))
    text = doc.markdown("figures")
    assert "<img" not in text and "&lt;img" in text
    assert '| qa&lt;img src=x onerror="alert(1)"> row | 1.0 |' in text.splitlines()
    assert text.splitlines()[0] == '# run qa&lt;img src=x onerror="alert(1)"> row'
    assert "<img" not in doc.html().replace("<img alt", "")  # the HTML report escapes it as it did


def test_the_recommendation_on_another_model_is_cautioned_beside_its_sentence(
    search_run, tmp_path, monkeypatch
):
    import layercard.plan.quality as quality

    md = (search_run / "report.md").read_text()
    top = md[md.index("## Recommendation") : md.index("Quality is the fraction")]
    # the tiny model is not the quality model's own: the plan's warning stands under the sentence, once
    assert top.count(f"Caution: {quality.OTHER_MODEL}smollm2 alone") == 1
    # only that warning is lifted there: with its opening changed, none of the plan's warnings is
    monkeypatch.setattr(quality, "OTHER_MODEL", "quality model: not a warning any plan gives")
    copy = tmp_path / "run"
    shutil.copytree(search_run, copy)
    md = Path(build_report(copy)["markdown"]).read_text()
    assert "## Recommendation" in md and "Caution:" not in md


def test_long_durations_are_also_written_in_hours_days_or_years():
    from layercard.report.tables import seconds_text

    assert [seconds_text(x) for x in (None, 5, 50, 500, 3599)] == ["—", "5 s", "50.0 s", "500 s", "3,599 s"]
    assert seconds_text(5400) == "5,400 s (1.5 h)"
    assert seconds_text(1.5 * 86400) == "129,600 s (36.0 h)"  # days from two of them
    assert seconds_text(3 * 86400) == "259,200 s (3.0 days)"
    assert seconds_text(10**12) == "1,000,000,000,000 s (31,688.1 years)"


def test_a_measured_quality_from_earlier_weights_says_which_step(search_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(search_run, copy)
    md = Path(build_report(copy)["markdown"]).read_text()
    assert "(step " not in md.split("## Recommendation")[1].split("##")[0]  # the last step's weights
    path = copy / "train" / "recommend" / "train_metrics.json"
    m = _json(path)
    step = m["val_curve"][0][0] if m["val_curve"] else 1
    assert step < m["steps"], "the tiny run must validate before its last step for this test to say anything"
    path.write_text(json.dumps(m | {"best_step": step, "best_val_loss": 1.0, "planned_steps": m["steps"]}))
    restaged(path, copy)
    md = Path(build_report(copy)["markdown"]).read_text()
    said = md.split("## Recommendation")[1].split("##")[0]
    row = next(line for line in said.splitlines() if line.startswith("| recommend |"))
    assert f"(step {step} of {m['steps']}) / " in row
    assert "A measured quality marked (step N of M) is that of an adapter holding step N's weights" in said
    reference = next(line for line in said.splitlines() if line.startswith("| reference |"))
    assert "(step " not in reference
