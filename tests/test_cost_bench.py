"""The cost benchmark's memory-share split and forward rows: constructed cases, and the committed
split table reproduced from the committed runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
from benchscripts import benchmark_script, same_numbers

from layercard.cost import CostModel


@pytest.fixture(scope="module")
def split():
    with benchmark_script("memory_share_split") as module:
        yield module


def _cm(share: float) -> CostModel:
    return CostModel(
        intercept_s=1.0, per_layer_backward_s=0.1, per_module_s=0.01, n_layers=10, batch_size=4,
        batch_tokens=300, measured=[], device="cpu", memory_resident_mib=500.0, memory_base_mib=600.0,
        memory_per_layer_mib=10.0, memory_per_module_mib=1.0, memory_per_mparam_mib=0.0, batch_positions=400,
        memory_position_share=share, batch_scaling={"added_mib": 300.0},
    )  # fmt: skip


def test_split_grows_the_depth_term_and_the_all_layer_remainder(split):
    cm = _cm(0.5)
    run = {"layers": [7, 8, 9], "modules": 6, "params": 0, "max_batch_positions": 800}
    shared, by_depth = split.priced(cm, run)
    added = 100 + 10 * 3 + 6  # base, depth, modules over the resident memory
    assert shared == pytest.approx(500 + added * (0.5 + 0.5 * 2))
    # grows: the depth term (30) and the all-layer remainder 0.5·300 − 10·10 = 50
    assert by_depth == pytest.approx(500 + added + 80 * 1)
    # the growing part never exceeds what the placement adds
    tiny = split.priced(_cm(1.0), {"layers": [9], "modules": 1, "params": 0, "max_batch_positions": 800})
    assert tiny[1] == pytest.approx(500 + 2 * (100 + 10 + 1))


def test_committed_split_table_is_what_the_committed_runs_give(split, tmp_path, monkeypatch):
    committed = json.loads((split.COST / "memory_share_split.json").read_text())
    monkeypatch.setattr(split, "COST", tmp_path / "cost")
    # the runs are read from the committed folders: point the script's folders at them
    for folder in split.FOLDERS:
        (tmp_path / "cost" / folder).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cost" / folder).symlink_to(split.ROOT / "benchmarks" / "results" / "cost" / folder)
    split.main()
    again = json.loads((tmp_path / "cost" / "memory_share_split.json").read_text())
    same_numbers(again, committed)
    # the one-share column is the cost model's own pricing, as cost.py reported it
    rows = {(r["folder"], r["task"]): r for r in again["rows"]}
    report = json.loads(
        (split.ROOT / "benchmarks" / "results" / "cost" / "cpu-batch32-forward" / "cost.json").read_text()
    )
    assert rows[("cpu-batch32-forward", "sst2")]["shared_mae"] == pytest.approx(
        report["tasks"]["sst2"]["mean_abs_error"]["peak_memory_error"], abs=1e-3
    )


def _card_cost(factor: float, key: str = "first_step_peak_by_round_mib") -> dict:
    """A card's cost model fitted to constructed rows whose second memory figure (``key``) adds ``factor``
    times what the fitted figure adds."""
    from layercard.cost import fit_memory

    rows = []
    everything = list(range(10))
    for layers, modules, params in [([9], 1, 1e5), ([0], 1, 1e5), ([5], 1, 1e5), (everything, 10, 1e6),
                                    (everything, 10, 4e6)]:  # fmt: skip
        added = 40 + 12 * (10 - min(layers)) + 3 * modules + 8 * params / 1e6
        rows.append({"layers": layers, "modules": modules, "params": params, "resident_mib": 900.0,
                     "peak_memory_mib": 900 + added, key: [900 + factor * added]})  # fmt: skip
    terms = fit_memory(rows, 10, 900.0)
    cm = CostModel(
        intercept_s=1.0, per_layer_backward_s=0.1, per_module_s=0.01, n_layers=10, batch_size=4,
        batch_tokens=300, measured=rows, device="cpu", batch_positions=400, memory_kind="process_peak_rss",
        **terms,
    )  # fmt: skip
    return dataclasses.asdict(cm)


@pytest.mark.parametrize("key", ["first_step_peak_by_round_mib", "window_peak_by_round_mib"])
def test_the_other_memory_figure_prices_runs_from_its_own_refit(key):
    with benchmark_script("cost") as cost:
        run = {"layers": [7, 8, 9], "modules": 3, "params": 2e5, "predicted_step_time_s": 1.4,
               "s_per_step": 1.5, "peak_memory_mib": 1100.0, "peak_memory_start_mib": 900.0,
               "batch_positions_per_step": 400, "max_batch_positions": 400}  # fmt: skip
        added = 40 + 12 * 3 + 3 * 3 + 8 * 0.2
        same = cost._other_rule(_card_cost(1.0, key), run)
        assert same["other_predicted_peak_memory_mib"] == pytest.approx(900 + added)
        halved = cost._other_rule(_card_cost(0.5, key), run)
        assert halved["other_predicted_peak_memory_mib"] == pytest.approx(900 + added / 2)
        assert halved["other_peak_memory_error"] == pytest.approx((900 + added / 2 - 1100) / 1100)
        # cards that kept one figure only: no such pricing
        old = _card_cost(1.0, key)
        old["measured"] = [{k: v for k, v in r.items() if k != key} for r in old["measured"]]
        assert cost._other_rule(old, run) == {}


def test_a_run_priced_by_the_first_step_is_priced_again_by_the_window():
    with benchmark_script("cost") as cost:
        run = {"layers": [7, 8, 9], "modules": 3, "params": 2e5, "predicted_step_time_s": 1.4,
               "s_per_step": 1.5, "peak_memory_mib": 1100.0, "peak_memory_start_mib": 900.0,
               "batch_positions_per_step": 400, "max_batch_positions": 400}  # fmt: skip
        added = 40 + 12 * 3 + 3 * 3 + 8 * 0.2
        card = _card_cost(0.5)  # its first steps added half what its windows did
        window = cost._other_rule(card, run | {"predicted_memory_figure": "first_step"})
        assert window["other_figure"] == "window"
        assert window["other_predicted_peak_memory_mib"] == pytest.approx(900 + added)
        assert cost._other_rule(card, run)["other_figure"] == "first_step_peak_memory_mib"
        rows = [run | window]
        mae = {"other_peak_memory_error": abs(window["other_peak_memory_error"])}
        line = cost._other_line(mae, card, rows)[0]
        assert "each window's peak" in line and "took the first step's figure" in line


def test_a_step_growing_faster_than_its_positions_is_priced_again_unclipped():
    with benchmark_script("cost") as cost:
        run = {"layers": [7, 8, 9], "modules": 3, "params": 2e5, "s_per_step": 3.0,
               "peak_memory_mib": 1100.0, "peak_memory_start_mib": 900.0,
               "batch_positions_per_step": 800, "max_batch_positions": 800}  # fmt: skip
        card = _card_cost(1.0)
        step = 1.0 + 0.1 * 3 + 0.01 * 3  # the constructed card's step for this placement at 400 positions
        # the half batch took 0.4 of the full one: a line through them puts 120% of the step on positions
        scaling = {"positions": 400, "half_positions": 200, "s_per_step": 5.0, "half_s_per_step": 2.0}
        card |= {"step_position_share": 1.0, "batch_scaling": scaling}
        out = cost._unclipped(card, run)
        assert out["unclipped_step_share"] == pytest.approx(1.2)
        assert out["unclipped_step_time_error"] == pytest.approx(step * (1 - 1.2 + 1.2 * 2) / 3.0 - 1)
        rows = [run | out]
        line = cost._unclipped_line({"unclipped_step_time_error": 0.05}, rows)[0]
        assert "120%" in line and "5.0%" in line
        # a share within [0, 1] is priced as measured already: nothing to add
        card["batch_scaling"]["half_s_per_step"] = 3.0
        assert cost._unclipped(card, run) == {}


def test_the_data_line_reads_each_runs_share_of_its_step():
    with benchmark_script("cost") as cost:
        runs = [{"s_per_step": 2.0, "s_per_step_data": d} for d in (0.02, 0.1, 0.04)]
        rows = [cost._data(r) for r in runs]
        assert [r["data_share"] for r in rows] == pytest.approx([0.01, 0.05, 0.02])
        line = cost._data_line(rows)[0]
        assert "1.000%–5.000%" in line and "median 2.000%" in line
        # a run written before steps kept their data's seconds: no line rather than one over some runs
        assert cost._data({"s_per_step": 2.0}) == {} and cost._data_line(rows + [{}]) == []


def test_cost_runs_are_kept_only_at_their_own_setup_and_reported_only_when_they_agree(tmp_path):
    with benchmark_script("cost") as cost:
        fresh = tmp_path / "twelfth-fresh" / "sst2" / "runs" / "a.json"
        plain = tmp_path / "twelfth" / "sst2" / "runs" / "a.json"
        old = {"threads": 2, "setup": {"model": "smollm2", "steps": 6, "batch": 8}}
        # recorded before Setup held them: threads beside the setup, fresh from the folder's name
        assert cost.stored_setup(old, fresh)["fresh"] is True
        assert cost.stored_setup(old, plain)["fresh"] is False
        assert cost.stored_setup(old, plain)["threads"] == 2
        asked = dataclasses.asdict(cost.Setup(threads=4))
        assert cost.setup_differs(cost.stored_setup(old, plain), asked) == ["threads"]
        assert cost.setup_differs(cost.stored_setup(old, plain), dataclasses.asdict(cost.Setup())) == []
        setups = {
            "sst2/a": cost.stored_setup(old, plain),
            "sst2/b": {**cost.stored_setup(old, plain), "batch": 32},
        }
        with pytest.raises(SystemExit, match=r"\(batch\): sst2/b"):
            cost.agreed_setup(setups, tmp_path)
        assert cost.agreed_setup({"sst2/a": setups["sst2/a"]}, tmp_path)["dropout"] == 0.0
