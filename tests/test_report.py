"""The run report: sections, inline figures, markdown, the report command, and a headless-Chromium render."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, restaged
from test_pipeline import make_model_dir, make_run, tiny_config, write_config
from typer.testing import CliRunner

from layercard.cli import app
from layercard.errors import LayercardError
from layercard.report import build_report

SECTIONS = [
    "Headline: quality against cost",
    "Layer Card",
    "Coupling matrix",
    "Plans",
    "Training",
    "Boundary trace and trimming",
    "Predicted vs measured gain",
    "Quality vs cost",
    "Evaluation",
    "Provenance",
]
FIGURES = [
    "card_heatmap.png",
    "card_profiles.png",
    "card_coupling.png",
    "placements.png",
    "training.png",
    "trace.png",
    "gain.png",
    "quality_cost.png",
]
ARTIFACTS = REPO / "test-artifacts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report"))[1]


def _data_images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', text)]


def test_report_sections_and_inline_figures(run_dir):
    text = (run_dir / "report.html").read_text()
    heads = re.findall(r"<h2[^>]*>([^<]+)</h2>", text)
    assert heads == SECTIONS
    images = _data_images(text)
    assert len(images) == len(FIGURES) == text.count("<img")
    assert all(img.startswith(PNG_MAGIC) and len(img) > 2000 for img in images)
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r'(src|href)="(?!data:)', text)
    for word in ("card-2", "all-trimmed", "chosen K", "exact_match", "loss drop"):
        assert word in text
    md = (run_dir / "report.md").read_text()
    assert [h for h in re.findall(r"^## (.+)$", md, flags=re.M)] == SECTIONS
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(Path(x).name for x in links) == sorted(FIGURES)
    assert all((run_dir / x).is_file() for x in links)
    # writes are atomic: no temporary siblings left behind
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]


def test_report_command_other_path_and_json(run_dir, tmp_path):
    out = tmp_path / "elsewhere" / "r.html"
    r = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["html"] == str(out) and Path(d["markdown"]) == out.with_suffix(".md")
    assert sorted(Path(f).name for f in d["figures"]) == sorted(FIGURES)
    assert len(_data_images(out.read_text())) == len(FIGURES)
    r = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "not a layercard run folder" in r.output


def test_report_with_missing_stages(run_dir, tmp_path):
    """A run without trimming or a base evaluation still reports, saying what is missing."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "trim")
    shutil.rmtree(copy / "eval" / "trimmed")
    shutil.rmtree(copy / "eval" / "base")
    paths = build_report(copy)
    text = Path(paths["html"]).read_text()
    assert "Trimming has not run yet" in text  # enabled in run.json, its folder gone
    assert "Needs plans with a predicted set gain and the evaluations of the base model" in text
    assert "all-trimmed" not in text
    assert not (copy / "figures" / "trace.png").exists()  # a stale figure of the earlier report is gone
    # a figures folder beside --out that holds anything but a report's figures is not replaced
    mine = tmp_path / "paper"
    (mine / "figures").mkdir(parents=True)
    (mine / "figures" / "fig1.png").write_bytes(b"x")
    with pytest.raises(LayercardError, match="holds other files than a report's figures"):
        build_report(copy, mine / "report.html")
    assert (mine / "figures" / "fig1.png").read_bytes() == b"x" and not (mine / "report.html").exists()
    with pytest.raises(LayercardError, match="no such run folder"):
        build_report(tmp_path / "nope")


# ---------------------------------------------------------------- headless Chromium


def _chromium() -> str:
    """Path of Debian's chromium, installing it when missing (root with apt), else a skip saying why."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(
            "chromium is not installed and cannot be (needs root and apt-get): apt-get install chromium"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "chromium"]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:  # a stale package list: refresh once and retry
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("installing chromium with apt-get timed out")
    found = shutil.which("chromium")
    if found is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"apt-get install chromium failed: {tail[0]}")
    return found


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    chromium = _chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_screenshot.png"
    shot.unlink(missing_ok=True)
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,4000",
        (run_dir / "report.html").resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}"
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 50_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1280, 4000)
    # Not a blank page: the rendered figures and tables cover a good part of the screenshot.
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    not_white = (pixels < 0.95).any(axis=-1).mean()
    colourful = (pixels.max(axis=-1) - pixels.min(axis=-1) > 0.2).mean()
    assert not_white > 0.05 and colourful > 0.01, (not_white, colourful)


def test_report_markdown_depends_on_the_artifacts_only(run_dir, tmp_path):
    """The same artifacts give the same report.md, wherever the folder is (but for the first paragraph,
    which names the folder and the time the report was built)."""
    texts = []
    for name in ("a", "b"):
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        build_report(copy)
        lines = (copy / "report.md").read_text().splitlines()
        assert lines[2].startswith(f"Run folder {copy.resolve()}; report built ")
        texts.append([*lines[:2], *lines[3:]])
    assert texts[0] == texts[1]


def test_predicted_step_time_prefers_the_rescaled_prediction():
    from types import SimpleNamespace

    from layercard.report import predicted_s_per_step

    def metrics(scaled, plain):
        return SimpleNamespace(predicted_step_time_scaled_s=scaled, predicted_step_time_s=plain)

    assert predicted_s_per_step(metrics(2.0, 1.0)) == 2.0
    assert predicted_s_per_step(metrics(None, 1.0)) == 1.0


def test_training_table_gives_each_run_its_steps_spread(run_dir):
    from layercard.report import measured_step_text

    md = (run_dir / "report.md").read_text()
    runs = sorted((run_dir / "train").glob("*/train_metrics.json"))
    assert runs
    for path in runs:
        m = json.loads(path.read_text())
        spread = m["s_per_step_spread"]
        if spread["steps"] > 1:
            assert f"{m['s_per_step']:.3f} ({spread['p10']:.3f}–{spread['p90']:.3f})" in md
        else:
            assert f"{m['s_per_step']:.3f}, one step" in md
    # metrics written before the spread was recorded show the median alone
    assert measured_step_text(0.5, None) == "0.500" and measured_step_text(None, None) == "—"
    one = {"fastest": 0.5, "p10": 0.5, "p90": 0.5, "slowest": 0.5, "steps": 1}  # no spread to give
    assert measured_step_text(0.5, one) == "0.500, one step"


def test_a_peak_priced_by_the_first_steps_figure_says_so(run_dir):
    import dataclasses

    from layercard.report import memory_figure_note, read_train_metrics
    from layercard.report.tables import train_table

    assert "first steps' figure" in memory_figure_note("first_step")
    assert memory_figure_note("window") == memory_figure_note(None) == ""
    path = sorted((run_dir / "train").glob("*/train_metrics.json"))[0]
    m = read_train_metrics(path)
    for figure in ("window", "first_step"):
        row = train_table({"p": dataclasses.replace(m, predicted_memory_figure=figure)}).rows[0]
        assert row[6].endswith(memory_figure_note(figure))
        assert ("first steps'" in row[6]) == (figure == "first_step")


def test_planning_share_against_the_run_it_guided(run_dir):
    from layercard.report import planning_share

    frac, steps = planning_share(60.0, 120.0, 1.5)
    assert frac == pytest.approx(0.5)
    assert steps == 400  # 60 s is a tenth of 400 steps of 1.5 s
    assert planning_share(60.0, 120.0, None) == (0.5, None)
    with pytest.raises(ValueError, match="planning share"):
        planning_share(float("nan"), 120.0, 1.5)
    with pytest.raises(ValueError, match="planning share"):
        planning_share(60.0, 0.0, 1.5)
    md = (run_dir / "report.md").read_text()
    assert re.search(r"Planning cost: the card .* took \d+ s, \d+% of the \d+ s that training \S+ took", md)


def test_measured_leads_sentence_states_each_difference_with_its_error():
    from layercard.report.results import measured_leads_sentence

    rows = [
        {"name": "base", "policy": None},
        {"name": "rec", "policy": "recommend", "eval_examples": 32},
        {"name": "qv", "measured_lead_of_recommend": 0.138, "measured_lead_se": 0.021},
        {"name": "lin", "measured_lead_of_recommend": -0.0123, "measured_lead_se": None},
        {"name": "ref", "policy": "all-linear", "measured_lead_of_recommend": None},
    ]
    text = measured_leads_sentence(rows)
    assert text.startswith("Measured on the 32 evaluated examples, one training run each: rec's fraction")
    assert "0.138 ± 0.021 above qv's and 0.012 below lin's (± the paired" in text
    assert measured_leads_sentence(rows[:2]) is None  # nothing measured against it
    assert measured_leads_sentence([r for r in rows if r["name"] != "rec"]) is None  # no recommendation
    rows[2] = {"name": "qv", "measured_lead_of_recommend": 0.0, "measured_lead_se": 0.0}  # a tie
    assert "fraction of the reference's drop was equal to qv's and 0.012 below lin's" in (
        measured_leads_sentence(rows) or ""
    )


def test_without_a_reference_the_eval_losses_are_set_side_by_side():
    from layercard.report.results import eval_loss_sentence

    rows = [
        {"name": "base", "kind": "base", "eval_loss": 5.0},
        {"name": "rec", "kind": "placement", "policy": "recommend", "eval_examples": 4, "eval_loss": 4.659},
        {"name": "qv", "kind": "placement", "policy": "peft-default", "eval_loss": 4.245},
    ]
    text = eval_loss_sentence(rows)
    assert "rec's eval loss was 4.6590 against qv's 4.2450 (lower is better; 4 evaluated examples" in text
    assert text.endswith("qv measured lower than the recommendation.")
    rows[2]["eval_loss"] = 4.9
    assert eval_loss_sentence(rows).endswith("the recommendation measured lowest.")
    assert eval_loss_sentence(rows[:2]) is None  # nothing to set it against
    rows[2]["eval_loss"] = 4.659  # a tie is not a win
    assert eval_loss_sentence(rows).endswith("the recommendation measured lowest, level with qv.")
    # a reference that lowered nothing scales nothing: the sentence says so, not that there was none
    rows.append({"name": "ref", "kind": "placement", "is_reference": True, "eval_loss": 5.01,
                 "measured_gain": -0.01})  # fmt: skip
    text = eval_loss_sentence(rows)
    assert text.startswith(
        "Measured without a drop to scale by (the reference, ref, changed the base's eval loss"
    )
    assert "+0.0100" in text


def test_a_reference_that_lowered_the_loss_is_said_to_scale_the_drops():
    """With the reference the only placement beside the recommendation there is no lead to state, but the
    reference did lower the loss: the sentence gives the measured fraction, not that nothing scales it."""
    from layercard.report.results import eval_loss_sentence, measured_leads_sentence

    rows = [
        {"name": "base", "kind": "base", "eval_loss": 4.5264, "measured_gain": 0.0},
        {"name": "recommend", "kind": "placement", "policy": "recommend", "eval_examples": 4,
         "eval_loss": 4.5132, "measured_gain": 0.0132, "measured_fraction": 0.388,
         "measured_fraction_se": 0.021, "measured_lead_of_recommend": None},
        {"name": "reference", "kind": "placement", "policy": "all-linear", "is_reference": True,
         "eval_loss": 4.4924, "measured_gain": 0.034, "measured_fraction": 1.0, "measured_fraction_se": 0.0,
         "measured_lead_of_recommend": None},
    ]  # fmt: skip
    assert measured_leads_sentence(rows) is None
    text = eval_loss_sentence(rows)
    assert "without a drop to scale by" not in text and "-0.0340" not in text
    assert text.startswith(
        "Measured: recommend's fraction of the reference's drop was 0.39 ± 0.02, with no rule to compare it "
        "with; recommend's eval loss was 4.5132 against reference's 4.4924 (lower is better; 4 evaluated"
    )
    assert text.endswith("reference measured lower than the recommendation.")
    # a rule measured beside them is set against the recommendation; the reference is the scale, not one
    rows.append({"name": "qv", "kind": "placement", "policy": "peft-default", "eval_loss": 4.52,
                 "measured_gain": 0.0064, "measured_fraction": 0.188})  # fmt: skip
    assert eval_loss_sentence(rows).startswith(
        "Measured: recommend's fraction of the reference's drop was 0.39 ± 0.02 against qv's 0.19; "
    )
    # and one that did not lower it still says so
    rows[2] |= {"measured_gain": -0.002, "measured_fraction": None}
    rows[1]["measured_fraction"] = None
    assert eval_loss_sentence(rows).startswith(
        "Measured without a drop to scale by (the reference, reference, changed the base's eval loss by "
        "+0.0020): recommend's eval loss was 4.5132"
    )


def test_an_untrained_search_placement_shows_its_plans_predicted_cost():
    """A run stopped after its plans (`--until plan`) has no training: the recommendation table gives the
    plan's predicted step time and peak memory, not dashes."""
    from types import SimpleNamespace

    from layercard.report.tables import recommendation_table

    cand = {"matrices": "q,v", "layers": "all", "rank": 8, "quality": 0.9998, "params": 3584.0,
            "step_time": 0.0587, "memory": 430.46}  # fmt: skip
    plan = SimpleNamespace(
        config={"policy": "recommend"},
        predicted={"candidate": cand, "quality": {"fraction": 0.9998, "expected_error": 0.041},
                   "reference": {"params": 16384.0}},
    )  # fmt: skip
    table = recommendation_table({"recommend": plan}, {}, {"rows": []})
    cells = dict(zip(table.header, table.rows[0], strict=True))
    assert cells["s/step measured / predicted"] == "— / 0.059"  # s/step as every table gives it
    assert cells["peak MiB measured / predicted"] == "— / 430"
    # an exact half (2,048 of 16,384 is 0.125) reads as the overview and demo.md round it: half up
    plan.predicted["candidate"] = {**cand, "params": 2048.0}
    cells = dict(zip(table.header, recommendation_table({"r": plan}, {}, {"rows": []}).rows[0], strict=True))
    assert cells["params (× ref)"] == "2,048 (0.13)"


def test_an_interrupted_stage_is_shown_stopped_unless_its_run_is_live(run_dir, tmp_path):
    """A stage's record stays `running` when its run was interrupted: with no process holding the run's
    lock the provenance table says it stopped; while a run holds the lock it is running."""
    from layercard.artifacts import writer_lock
    from layercard.report.tables import stages_table

    stopped = "stopped (a rerun resumes it)"
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = sorted((copy / "train").glob("*/stage.json"))[0]
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record | {"status": "running"}))

    def status() -> str:
        return next(r[1] for r in stages_table(copy).rows if r[0] == record["stage"])

    assert status() == stopped
    md = Path(build_report(copy)["markdown"]).read_text()
    assert f"| {record['stage']} | {stopped} |" in md
    with writer_lock(copy, what="run folder"):  # a live run (this process) holds the folder
        assert status() == "running"
    with writer_lock(path.parent, what="training folder"):  # or the stage's own folder
        assert status() == "running"
    assert status() == stopped  # released


def test_a_budget_a_run_went_over_is_in_its_report(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = sorted((copy / "train").glob("*/train_metrics.json"))[0]
    m = json.loads(path.read_text())
    line = "budget memory=900 MiB: this run's largest micro-batch puts its predicted peak at 950 MiB"
    priced = "the plan's costs were measured on cpu on A with 2 CPUs; this run trains on cpu on B"
    path.write_text(json.dumps(m | {"budget_notes": [line], "price_notes": [priced]}))
    restaged(path, copy)
    md = Path(build_report(copy)["markdown"]).read_text()
    assert f"{path.parent.name}: warning: {line}" in md
    assert f"{path.parent.name}: warning: {priced}" in md  # and a run not priced like with like
    assert "warning: budget" not in (run_dir / "report.md").read_text()  # none where no budget was over


def test_placements_without_a_set_gain_say_why_the_gain_section_is_empty(run_dir, tmp_path):
    """Search policies predict quality, not a set gain: the section says so, not that plans are missing."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for path in (copy / "plan").glob("*/plan.json"):
        plan = json.loads(path.read_text())
        plan["predicted"].pop("gain", None)
        path.write_text(json.dumps(plan))
        restaged(path, copy)
    text = Path(build_report(copy)["html"]).read_text()
    assert "No placement here predicts a set gain" in text and "Needs plans" not in text


def test_a_trim_whose_metric_tied_at_every_k_says_what_chose(run_dir, tmp_path):
    from layercard.report.results import check_trim

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = copy / "trim" / "trim.json"
    trim = json.loads(path.read_text())
    said = "Every K scored the same"
    assert said not in Path(build_report(copy)["html"]).read_text() or trim.get("metric_flat")
    tied = f"{said} {trim['metric']}: it did not tell the boundaries apart, so"
    # a trim.json written before chosen_by was recorded: the tie rule chose
    path.write_text(json.dumps({**{k: v for k, v in trim.items() if k != "chosen_by"}, "metric_flat": True}))
    restaged(path, copy)
    md = " ".join(Path(build_report(copy)["markdown"]).read_text().split())
    assert f"{tied} the tie rule kept the fewest adapted layers" in md
    path.write_text(json.dumps({**trim, "metric_flat": True, "chosen_by": "loss"}))
    restaged(path, copy)
    md = " ".join(Path(build_report(copy)["markdown"]).read_text().split())
    assert f"{tied} K was chosen by the held-out loss" in md
    with pytest.raises(LayercardError, match="chosen_by"):
        check_trim({**trim, "chosen_by": "rouge_l" if trim["metric"] != "rouge_l" else "bleu"}, "trim.json")


def test_a_rebuilt_report_reads_as_the_first(run_dir, tmp_path):
    """The report describes the stages before it: rebuilding it changes nothing but its build time."""
    import re

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)

    def text() -> str:
        md = Path(build_report(copy)["markdown"]).read_text()
        return re.sub(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d)?\S*", "<time>", md)

    first = text()
    assert "| report |" not in first
    assert text() == first


def test_the_tables_give_each_quantity_one_number_format(run_dir):
    """Losses with four decimals and task metrics with three, in every table that shows them."""
    lines = (run_dir / "report.md").read_text().splitlines()

    def cells(header_start: str) -> dict[str, str]:
        header = next(line for line in lines if line.startswith(header_start))
        row = next(line for line in lines[lines.index(header) :] if line.startswith("| base |"))
        cols = [c.strip() for c in header.strip("|").split("|")]
        return dict(zip(cols, (c.strip() for c in row.strip("|").split("|")), strict=True))

    headline, metrics = cells("| model | adapted layers"), cells("| model | exact_match")
    for value in (headline["eval loss"], headline["loss drop"], metrics["loss"]):
        assert re.fullmatch(r"\d+\.\d{4}", value), value
    for value in (headline["exact_match"], metrics["exact_match"], metrics["token_f1"]):
        assert re.fullmatch(r"\d+\.\d{3}", value), value


def test_a_placement_has_one_colour_in_every_figure(run_dir, tmp_path, monkeypatch):
    import layercard.report.figures as figures

    calls: list[list[str]] = []
    real = figures.palette

    def spy(names):
        calls.append(list(names))
        return real(names)

    monkeypatch.setattr(figures, "palette", spy)
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    build_report(copy)
    # the placements chart, the training curves, the gain chart and the quality-cost chart each colour by
    # the same names
    assert len(calls) == 4 and all(c == calls[0] for c in calls) and "card-2" in calls[0]


def test_the_reference_placement_has_the_default_alpha_dropout_and_kind(tmp_path):
    """Measured fractions are of the quality model's reference: rank 8 on every linear module of every
    layer, at the default alpha and dropout; another alpha or dropout there is no reference."""
    from layercard.pipeline import load_config, run_pipeline
    from layercard.report.results import reference_placement
    from layercard.run_layout import RunLayout

    cfg = tiny_config(make_model_dir(tmp_path))
    cfg["card"] = {**cfg["card"], "roles": "all-linear", "calibrate": False, "coupling": False}
    cfg["placements"] = [
        {"name": "wide-alpha", "policy": "all-linear", "rank": 8, "alpha": 4},
        {"name": "dropped", "policy": "all-linear", "rank": 8, "dropout": 0.3},
        {"name": "rank-4", "policy": "all-linear", "rank": 4},
        {"name": "reference", "policy": "all-linear", "rank": 8},
    ]
    out = tmp_path / "run"
    summary = run_pipeline(load_config(write_config(tmp_path, cfg)), out, progress=False, until="plan")
    names = [p["name"] for p in cfg["placements"]]
    assert reference_placement(RunLayout(out), names) == summary["reference"] == "reference"
    assert reference_placement(RunLayout(out), names[:3]) is None
