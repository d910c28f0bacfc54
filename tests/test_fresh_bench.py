"""The fresh-task benchmark's tasks: field mappings that turn the project's data into tasks of their own."""

from __future__ import annotations

import pytest
from benchscripts import benchmark_script
from conftest import shared_data


@pytest.fixture(scope="module")
def fresh():
    with benchmark_script("fresh_tasks") as module:
        yield module


def test_e2e_parse_reads_a_description_and_writes_its_meaning_representation(fresh, monkeypatch):
    monkeypatch.setenv("LAYERCARD_DATA", str(shared_data("e2e_nlg/test.jsonl").parents[1]))
    t = fresh.TASKS["e2e_parse"]
    task = fresh.load(t, "test")
    ex = task.examples[0]
    assert ex.target.startswith("name[") and "]" in ex.target
    assert "[" not in ex.input  # the input is the description, not the representation
    assert "meaning representation" in task.format.instruction


def test_gsm8k_answer_targets_the_final_number_alone(fresh, monkeypatch):
    monkeypatch.setenv("LAYERCARD_DATA", str(shared_data("gsm8k/test.jsonl").parents[1]))
    task = fresh.load(fresh.TASKS["gsm8k_answer"], "test")
    targets = [e.target for e in task.examples[:50]]
    assert all(x.replace(",", "").lstrip("-").replace(".", "", 1).isdigit() for x in targets)
    assert "####" not in task.examples[0].input


def test_gsm8k_pose_writes_the_question_from_its_number_alone(fresh, monkeypatch):
    monkeypatch.setenv("LAYERCARD_DATA", str(shared_data("gsm8k/test.jsonl").parents[1]))
    task = fresh.load(fresh.TASKS["gsm8k_pose"], "test")
    ex = task.examples[0]
    assert ex.input.replace(",", "").lstrip("-").replace(".", "", 1).isdigit()
    assert ex.target.rstrip().endswith("?") and "####" not in ex.target


def test_sst2_write_writes_a_line_from_its_label(fresh, monkeypatch):
    monkeypatch.setenv("LAYERCARD_DATA", str(shared_data("sst2/validation.jsonl").parents[1]))
    task = fresh.load(fresh.TASKS["sst2_write"], "validation")
    assert {e.input for e in task.examples} == {"positive", "negative"}
    assert all(len(e.target.split()) > 1 for e in task.examples[:50])


def test_gsm8k_reverse_reads_the_solution_and_writes_the_question(fresh, monkeypatch):
    monkeypatch.setenv("LAYERCARD_DATA", str(shared_data("gsm8k/test.jsonl").parents[1]))
    task = fresh.load(fresh.TASKS["gsm8k_reverse"], "test")
    ex = task.examples[0]
    assert "####" in ex.input and "<<" in ex.input  # the worked solution, calculator notes and all
    assert ex.target.rstrip().endswith("?") and "####" not in ex.target


@pytest.mark.parametrize(("name", "split", "like"), [("sst2_echo", "validation", "sst2_write"),
                                                      ("e2e_echo", "test", "e2e_parse")])  # fmt: skip
def test_echo_tasks_repeat_their_input_and_share_earlier_targets(fresh, monkeypatch, name, split, like):
    t = fresh.TASKS[name]
    monkeypatch.setenv("LAYERCARD_DATA", str(shared_data(f"{t.dataset}/{split}.jsonl").parents[1]))
    task, earlier = fresh.load(t, split), fresh.load(fresh.TASKS[like], split)
    assert all(e.input == e.target for e in task.examples)
    assert sorted(e.target for e in task.examples) == sorted(e.target for e in earlier.examples)
    assert "Repeat" in task.format.instruction


def test_a_missing_dataset_names_where_it_looked(fresh, monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERCARD_DATA", str(tmp_path))
    with pytest.raises(SystemExit, match="e2e_nlg/test.jsonl not found"):
        fresh.load(fresh.TASKS["e2e_parse"], "test")


def test_repeats_read_each_seed_against_its_own_and_the_mean_reference(fresh, monkeypatch, tmp_path):
    import json

    monkeypatch.setattr(fresh, "OUT", tmp_path)
    losses = {
        ("ref", 0): 1.0,
        ("ref", 1): 1.2,
        ("qv-all-r8", 0): 1.5,
        ("qv-all-r8", 1): 1.5,
        ("lin-all-r2", 0): 1.1,
    }
    for (name, seed), loss in losses.items():
        path = fresh._run_path("t", name, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"test_loss": loss}))
    rep = fresh._repeats("t", base=2.0)
    assert rep["reference_drop"] == {0: pytest.approx(1.0), 1: pytest.approx(0.8)}
    assert set(rep["own"]) == {"qv-all-r8"}  # only the placements repeated at another seed
    assert rep["own"]["qv-all-r8"] == {0: pytest.approx(0.5), 1: pytest.approx(0.625)}
    assert rep["mean"]["qv-all-r8"] == {0: pytest.approx(0.5 / 0.9), 1: pytest.approx(0.5 / 0.9)}
    (tmp_path / "runs" / "seed1" / "t-ref.json").unlink()
    assert fresh._repeats("t", base=2.0) is None  # no reference at the other seed: nothing to read against


def test_mid_depth_placements_fill_the_grids_gap_in_depth_bands_only_when_named(fresh):
    from layercard.card import Card
    from layercard.plan.quality import features

    card = Card.load(fresh.OUT / "cards" / "sst2_write" / "card.json")
    setting = fresh._setting(fresh.TASKS["sst2_write"])
    mid = {p.name for p in fresh.mid_depth()}
    by_pos = {(u.layer, u.role): u.key for u in card.units}
    got = {}
    for name, plan, _, _ in fresh._planned(card, setting, "sst2_write", 0, mid, None):
        f = features(card, {by_pos[(u.layer, u.role)]: u.rank for u in plan.units})
        got[name] = (round(f.coverage, 3), round(f.params, 3), min(plan.layers))
    # three, four and six of the six bands; the last 15 and the spread 15 the same size
    assert got == {
        "lin-last15-r4": (0.5, 0.25, 15),
        "lin-last20-r4": (0.667, 0.333, 10),
        "lin-uni15-r4": (1.0, 0.25, 1),
    }
    # a plain run trains the grid alone; the mid-depth placements only when --only names them
    plain = [name for name, *_ in fresh._planned(card, setting, "sst2_write", 0, None, None)]
    assert not mid & set(plain) and len(plain) == 16


def test_committed_mid_depth_result_is_what_the_committed_runs_give(fresh):
    import json

    path = fresh.OUT / "middepth.json"
    if not path.is_file():
        pytest.skip("middepth.json is not committed")
    committed = json.loads(path.read_text())
    got = fresh.middepth_result()
    assert set(got["tasks"]) == set(committed["tasks"])
    for t, v in got["tasks"].items():
        spread = v["runs"][fresh.MID_SERIES[-1]]["measured"]
        for name, r in v["runs"].items():
            assert r["measured"] == pytest.approx(committed["tasks"][t]["runs"][name]["measured"])
            assert r["gap"]["measured"] == pytest.approx(spread - r["measured"])
    assert got["reading"] == committed["reading"]
    assert got["reading"] in ("under", "between", "over")


def test_batch_result_sets_each_fraction_against_its_own_batchs_reference(fresh, tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(fresh, "OUT", tmp_path)
    (tmp_path / "runs" / "batch2").mkdir(parents=True)

    def put(folder, name, loss):
        (folder / f"gsm8k_pose-{name}.json").write_text(json.dumps({"test_loss": loss}))

    put(tmp_path / "runs", "base", 3.0)
    put(tmp_path / "runs", "ref", 2.0)  # drop 1.0 at batch 4
    put(tmp_path / "runs" / "batch2", "ref", 2.5)  # drop 0.5 at batch 2
    for name in fresh.BATCH_PLACEMENTS:
        put(tmp_path / "runs", name, 2.2)  # 0.8 of its batch's reference
        put(tmp_path / "runs" / "batch2", name, 2.6)  # 0.8 of its batch's reference too
    put(tmp_path / "runs" / "batch2", "lin-last8-r8", 2.4)  # 1.2: passes the batch-2 reference
    out = fresh.batch_result(2, entropy={"gsm8k_pose": 5.4, "gsm8k_answer": 2.1})
    assert set(out["tasks"]) == {"gsm8k_pose"}  # the task without runs at batch 2 is left out
    v = out["tasks"]["gsm8k_pose"]
    assert v["warned"] and v["reference_drop"] == {4: pytest.approx(1.0), 2: pytest.approx(0.5)}
    assert v["fractions"][4]["qv-all-r8"] == pytest.approx(0.8)
    assert v["fractions"][2]["lin-last8-r8"] == pytest.approx(1.2)
    assert v["change"] == pytest.approx(0.1)  # (0.8 · 3 + 1.2) / 4 − 0.8


def test_committed_batch_result_is_what_the_committed_runs_give(fresh):
    import json

    path = fresh.OUT / "batch.json"
    if not path.is_file():
        pytest.skip("batch.json is not committed")
    committed = json.loads(path.read_text())
    got = fresh.batch_result(committed["batch"])
    assert set(got["tasks"]) == set(committed["tasks"])
    for t, v in got["tasks"].items():
        assert v["change"] == pytest.approx(committed["tasks"][t]["change"])
        assert v["warned"] == committed["tasks"][t]["warned"]
