"""The cost model's measurements: a per-run peak-memory window, calibration on a tiny model, and the
memory terms' arithmetic."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny import tiny_model

from layercard import models
from layercard.cost import (
    CostModel,
    _out_of_order,
    _tensor_mib,
    calibrate,
    fit_forward,
    fit_memory,
    fit_step_time,
    peak_memory,
    position_share,
    prices_by_first_step,
    reset_peak_memory,
)
from layercard.errors import LayercardError

CPU = torch.device("cpu")


def test_peak_memory_window_sees_an_allocation_and_resets():
    start = reset_peak_memory(CPU)
    if start is None:
        pytest.skip("this system has no per-run resident peak (/proc/self/clear_refs)")
    big = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
    peak, kind = peak_memory(CPU)
    assert kind == "process_peak_rss"
    assert peak >= start + 200
    del big
    again = reset_peak_memory(CPU)
    assert again is not None and again < peak - 200  # the freed tensor went back to the system
    assert peak_memory(CPU)[0] < peak - 200  # and the new window starts below the old peak


def test_optimizer_state_is_counted_tensor_by_tensor():
    a, b = torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(11, dtype=torch.float64))
    opt = torch.optim.AdamW([a, b], lr=1e-3)
    assert _tensor_mib(opt.state) == 0  # AdamW makes its state on the first step
    (a.sum() + b.sum()).backward()
    opt.step()
    # two moments of each parameter's size and dtype, plus one step counter each
    step = opt.state[a]["step"]
    expected = 2 * (300 * 7 * 4 + 11 * 8) + 2 * step.numel() * step.element_size()
    assert _tensor_mib(opt.state) == pytest.approx(expected / 2**20)


def test_memory_fit_recovers_known_terms_over_each_row_start():
    everything = list(range(10))
    placements = [
        ([9], 1, 0.1e6),
        ([0], 1, 0.1e6),
        ([5], 1, 0.1e6),
        (everything, 10, 1e6),
        (everything, 10, 4e6),
    ]
    rows = []
    for i, (layers, modules, params) in enumerate(placements):
        start = 900.0 + i  # each window starts a little higher: the terms are what a placement adds
        added = 40 + 12 * (10 - min(layers)) + 3 * modules + 8 * params / 1e6
        rows.append({"layers": layers, "modules": modules, "params": params, "resident_mib": start,
                     "peak_memory_mib": start + added, "window": start + 2 * added})  # fmt: skip
    terms = fit_memory(rows, 10, 850.0)
    assert terms["memory_resident_mib"] == 850.0 and terms["memory_base_mib"] == pytest.approx(890.0)
    assert [terms[f"memory_per_{k}_mib"] for k in ("layer", "module", "mparam")] == pytest.approx([12, 3, 8])
    doubled = fit_memory(rows, 10, None, key="window")  # another column; the rows' median start
    assert doubled["memory_resident_mib"] == 902.0 and doubled["memory_per_layer_mib"] == pytest.approx(24)


def test_memory_module_term_counts_modules_by_input_width():
    everything = list(range(10))
    # every calibration placement adapts two roles per layer, 64 and 192 wide: a mean of 128 per module
    rows = [
        {"layers": layers, "modules": 2 * len(layers), "input_width": 256 * len(layers), "params": 0.1e6,
         "resident_mib": 900.0, "peak_memory_mib": 900.0 + 40 + 12 * (10 - min(layers)) + 3 * 2 * len(layers)}
        for layers in ([9], [0], [5], everything)
    ]  # fmt: skip
    terms = fit_memory(rows, 10, 900.0)
    assert terms["memory_module_width"] == pytest.approx(128.0)
    assert terms["memory_per_module_mib"] == pytest.approx(3.0)  # the fit itself is the count's
    cm = CostModel(
        intercept_s=1.0, per_layer_backward_s=0.1, per_module_s=0.01, n_layers=10, batch_size=2,
        batch_tokens=100, measured=rows, device="cpu", **terms,
    )  # fmt: skip
    # the calibration's own placements are priced as the count prices them
    for r in rows:
        assert cm.peak_memory(r["layers"], r["modules"], 0, r["input_width"]) == pytest.approx(
            cm.peak_memory(r["layers"], r["modules"], 0)
        )
    # four modules of the wide role keep more than four of the narrow one, at the same count
    wide = cm.peak_memory([6, 7, 8, 9], 4, 0, 4 * 192)
    narrow = cm.peak_memory([6, 7, 8, 9], 4, 0, 4 * 64)
    assert wide - narrow == pytest.approx(3.0 * (4 * 192 - 4 * 64) / 128)
    assert cm.memory([6, 7, 8, 9], 4, 0, 4 * 192)["peak_mib"] == pytest.approx(wide)
    # a card calibrated before the width was recorded keeps the count, whatever width is passed
    old = CostModel.from_dict({k: v for k, v in cm.to_dict().items() if k != "memory_module_width"})
    assert old.peak_memory([6, 7, 8, 9], 4, 0, 4 * 192) == pytest.approx(old.peak_memory([6, 7, 8, 9], 4, 0))
    assert "memory_module_width" not in fit_memory([{k: v for k, v in r.items() if k != "input_width"}
                                                    for r in rows], 10, 900.0)  # fmt: skip


def test_step_time_module_term_counts_modules_by_width():
    cm = CostModel(
        intercept_s=1.0, per_layer_backward_s=0.1, per_module_s=0.02, n_layers=10, batch_size=2,
        batch_tokens=100, measured=[], device="cpu", per_mparam_s=0.5, step_module_width=200.0,
    )  # fmt: skip
    # at the mean width a module counts as one: the calibration's own placements are priced as by the count
    assert cm.step_time([8, 9], 4, 1000, 4 * 200) == pytest.approx(cm.step_time([8, 9], 4, 1000))
    # at the same count, wide modules take longer than narrow ones by the term times the width difference
    wide, narrow = cm.step_time([8, 9], 4, 1000, 4 * 500), cm.step_time([8, 9], 4, 1000, 4 * 100)
    assert wide - narrow == pytest.approx(0.02 * (4 * 500 - 4 * 100) / 200)
    # a card calibrated before the width was recorded keeps the count, whatever width is passed
    old = CostModel.from_dict({k: v for k, v in cm.to_dict().items() if k != "step_module_width"})
    assert old.step_time([8, 9], 4, 1000, 4 * 500) == pytest.approx(old.step_time([8, 9], 4, 1000))


def test_step_time_and_forward_fits_recover_known_terms():
    everything = list(range(10))
    single = [([9], 1, 0.1e6), ([0], 1, 0.1e6), ([5], 1, 0.1e6)]
    placements = single + [(everything, 10, 1e6), (everything, 10, 4e6)]
    rows = [
        {
            "layers": layers, "modules": modules, "params": params,
            "s_per_step": 0.5 + 0.1 * (10 - min(layers)) + 0.02 * modules + 0.3 * params / 1e6,
            # the forward timed on the all-layer placements only, as the calibration does
            "forward_s": 0.4 + 0.005 * modules if len(layers) == 10 else None,
        }
        for layers, modules, params in placements
    ]  # fmt: skip
    step = fit_step_time(rows, 10)
    assert [step[k] for k in ("intercept_s", "per_layer_backward_s", "per_module_s", "per_mparam_s")] == (
        pytest.approx([0.5, 0.1, 0.02, 0.3])
    )
    fwd = fit_forward(0.4, rows)
    assert fwd == pytest.approx({"forward_base_s": 0.4, "forward_per_module_s": 0.005})
    # a slow single-layer row, were it timed, would pull the line: the rows without a forward do not
    slowed = [r | {"forward_s": r["forward_s"] or 0.9} for r in rows]
    assert fit_forward(0.4, slowed)["forward_base_s"] > 0.45


def test_memory_terms():
    cm = CostModel(
        intercept_s=1.0, per_layer_backward_s=0.1, per_module_s=0.01, n_layers=10, batch_size=2,
        batch_tokens=100, measured=[], device="cpu", memory_resident_mib=500.0, memory_base_mib=520.0,
        memory_per_layer_mib=10.0, memory_per_module_mib=1.0, memory_per_mparam_mib=16.0,
        forward_base_s=0.2, forward_per_module_s=0.001,
    )  # fmt: skip
    # layers 7..9: backward reaches 3 layers; 6 modules; 2M params
    assert cm.peak_memory([7, 8, 9], 6, 2_000_000) == pytest.approx(520 + 30 + 6 + 32)
    parts = cm.memory([9, 7], 6, 2_000_000)
    assert parts == {"peak_mib": pytest.approx(588.0), "activations_mib": 30.0, "resident_mib": 500.0}
    assert cm.forward_time(6) == pytest.approx(0.206)
    old = CostModel.from_dict(
        {k: v for k, v in cm.to_dict().items() if not k.startswith(("memory", "forward"))}
    )
    assert old.peak_memory([0], 1) is None and old.memory([0], 1) is None and old.forward_time(3) is None
    assert CostModel.from_dict(cm.to_dict()) == cm
    # a measured share of added memory that grows with positions replaces the depth term
    shared = CostModel.from_dict(cm.to_dict() | {"memory_position_share": 0.25})
    assert shared.memory([9, 7], 6, 2_000_000)["activations_mib"] == pytest.approx(0.25 * (588 - 500))


def test_first_step_memory_terms_price_a_run_in_a_process_without_calibration(monkeypatch):
    import layercard.cost as cost

    first = {
        "memory_base_mib": 510.0, "memory_per_layer_mib": 6.0, "memory_per_module_mib": 1.0,
        "memory_per_mparam_mib": 8.0, "memory_position_share": 0.25,
    }  # fmt: skip
    cm = CostModel(
        intercept_s=1.0, per_layer_backward_s=0.1, per_module_s=0.01, n_layers=10, batch_size=4,
        batch_tokens=300, measured=[], device="cpu", memory_resident_mib=500.0, memory_base_mib=520.0,
        memory_per_layer_mib=10.0, memory_per_module_mib=1.0, memory_per_mparam_mib=16.0,
        batch_positions=400, memory_position_share=0.5, memory_first_step=first,
    )  # fmt: skip
    # layers 7..9: 3 layers deep, 6 modules, 2M params, by either figure
    mem = cm.memory([7, 8, 9], 6, 2_000_000)
    assert mem["peak_mib"] == pytest.approx(520 + 30 + 6 + 32)
    assert mem["first_step"] == {
        "peak_mib": pytest.approx(510 + 18 + 6 + 16),
        "activations_mib": pytest.approx(0.25 * 50),
        "resident_mib": 500.0,
    }
    assert CostModel.from_dict(cm.to_dict()) == cm
    # at another batch each figure grows by its own share, as if priced on its own
    big = cm.at_batch(8)
    alone = cm.first_step_model().at_batch(8).memory([7, 8, 9], 6, 2_000_000)
    assert big.memory([7, 8, 9], 6, 2_000_000)["first_step"] == pytest.approx(alone)
    assert alone["peak_mib"] == pytest.approx(500 + 50 * 1.25)
    # a card made before the figure was kept prices by its window alone
    old = CostModel.from_dict({k: v for k, v in cm.to_dict().items() if k != "memory_first_step"})
    assert "first_step" not in old.memory([7, 8, 9], 6, 2_000_000) and old.first_step_model() is None
    # which figure a run takes: the first step's only for a process's resident peak in a process that ran
    # no calibration
    monkeypatch.setattr(cost, "_calibrated_here", False)
    assert cost.prices_by_first_step("process_peak_rss")
    assert not cost.prices_by_first_step("cuda_max_memory_allocated")
    monkeypatch.setattr(cost, "_calibrated_here", True)
    assert not cost.prices_by_first_step("process_peak_rss")


# A model whose steps and added memory grow with positions by measured shares (a quarter and a half).
SHARED = CostModel(
    intercept_s=1.0, per_layer_backward_s=0.1, per_module_s=0.01, n_layers=10, batch_size=4,
    batch_tokens=300, measured=[], device="cpu", per_mparam_s=0.2, memory_resident_mib=500.0,
    memory_base_mib=520.0, memory_per_layer_mib=10.0, memory_per_module_mib=1.0,
    memory_per_mparam_mib=16.0, batch_positions=400, step_position_share=0.25, memory_position_share=0.5,
)  # fmt: skip


def test_a_cost_model_at_another_batch_rescales_only_the_measured_shares():
    from layercard.train.metrics import predictions

    cm = SHARED
    layers, modules, params = [7, 8, 9], 6, 2_000_000
    t, mem = cm.step_time(layers, modules, params), cm.memory(layers, modules, params)
    big = cm.at_batch(8)  # twice the rows
    assert cm.at_batch(4) is cm
    assert (big.batch_size, big.batch_tokens, big.batch_positions) == (8, 600, 800)
    # a quarter of the step grows with the batch: 0.75 + 0.25·2; half the added memory: 0.5 + 0.5·2
    assert big.step_time(layers, modules, params) == pytest.approx(t * 1.25)
    assert big.peak_memory(layers, modules, params) == pytest.approx(500 + (mem["peak_mib"] - 500) * 1.5)
    # the shares are restated at the new batch: a run's own rescaling from it gives what it would from the
    # card's batch (a run of 600 positions per step and 700 in its largest micro-batch)
    for model in (cm, big):
        planned = {
            "step_time_s": model.step_time(layers, modules, params),
            "calibration_batch_positions": model.batch_positions,
            "step_time_position_share": model.step_position_share,
            "memory": model.memory(layers, modules, params),
        }
        out = predictions(planned, 1.0, 600.0, 900.0, 500.0, positions_per_step=600.0, max_positions=700)
        assert out["predicted_step_time_scaled_s"] == pytest.approx(t * (0.75 + 0.25 * 600 / 400))
        assert out["predicted_peak_memory_scaled_mib"] == pytest.approx(
            500 + (mem["peak_mib"] - 500) * (0.5 + 0.5 * 700 / 400)
        )
    # a card without the shares keeps the earlier rule: time in proportion, the depth term as activations
    old = dataclasses.replace(cm, step_position_share=None, memory_position_share=None).at_batch(8)
    assert old.step_time(layers, modules, params) == pytest.approx(2 * t)
    assert old.peak_memory(layers, modules, params) == pytest.approx(mem["peak_mib"] + 10.0 * 3)
    with pytest.raises(LayercardError, match="batch_size 0"):
        cm.at_batch(0)


def test_a_cost_model_at_a_runs_positions_prices_steps_and_peaks_apart():
    from layercard.plan.predict import calibration_batch
    from layercard.train.metrics import over_budget, predictions, priced_at

    cm = SHARED
    layers, modules, params = [7, 8, 9], 6, 2_000_000
    t, peak = cm.step_time(layers, modules, params), cm.peak_memory(layers, modules, params)
    assert cm.at_positions(None, None) is cm
    same = cm.at_positions(400.0, 400.0)
    assert same.step_time(layers, modules, params) == pytest.approx(t) and same.memory_positions is None
    # steps at the mean of a run (600 positions), the peak at its largest micro-batch (800)
    run = cm.at_positions(600.0, 800.0)
    assert run.step_time(layers, modules, params) == pytest.approx(t * (0.75 + 0.25 * 1.5))
    assert run.peak_memory(layers, modules, params) == pytest.approx(500 + (peak - 500) * 1.5)
    assert (run.batch_positions, run.memory_positions) == (600, 800.0)
    # each is what the batch rule gives at those positions
    assert run.step_time(layers, modules, params) == pytest.approx(
        cm.at_batch(6).step_time(layers, modules, params)
    )
    assert run.peak_memory(layers, modules, params) == pytest.approx(
        cm.at_batch(8).peak_memory(layers, modules, params)
    )
    # one of the two alone moves only its own cost
    assert cm.at_positions(None, 800.0).step_time(layers, modules, params) == pytest.approx(t)
    assert cm.at_positions(600.0, None).peak_memory(layers, modules, params) == pytest.approx(peak)
    assert cm.at_positions(600.0, None).memory_positions == 400.0
    # moved twice: the peak is priced from where it stands, not from the step's positions
    twice = run.at_positions(300.0, 400.0)
    assert twice.peak_memory(layers, modules, params) == pytest.approx(peak)
    assert twice.step_time(layers, modules, params) == pytest.approx(
        cm.at_batch(3).step_time(layers, modules, params)
    )
    assert CostModel.from_dict(run.to_dict()) == run
    # a run that trains at those positions compares like with like, and no budget the plan met is over
    planned = {
        "step_time_s": run.step_time(layers, modules, params),
        "memory": run.memory(layers, modules, params),
        **calibration_batch(run.to_dict()),
    }
    at = priced_at(planned, 600.0, 800)
    assert at["step_time_scaled_s"] == pytest.approx(planned["step_time_s"])
    assert at["peak_scaled_mib"] == pytest.approx(planned["memory"]["peak_mib"])
    cap = planned["memory"]["peak_mib"]
    assert over_budget(f"memory={cap + 1e-6}", planned, at) == []
    out = predictions(planned, 1.0, 500.0, 900.0, 500.0, positions_per_step=600.0, max_positions=800)
    assert out["predicted_peak_memory_scaled_mib"] == pytest.approx(planned["memory"]["peak_mib"])
    # a run's mean positions per step are not whole: kept as they are, so its rescaling moves nothing
    odd = cm.at_positions(600.4, None)
    step_at = {"step_time_s": odd.step_time(layers, modules, params), **calibration_batch(odd.to_dict())}
    assert priced_at(step_at, 600.4, None)["step_time_scaled_s"] == step_at["step_time_s"]
    for bad in (0.0, float("nan"), -5.0):
        with pytest.raises(LayercardError, match="must be a positive finite number"):
            cm.at_positions(bad, None)
    with pytest.raises(LayercardError, match="did not record its calibration batch's positions"):
        dataclasses.replace(cm, batch_positions=None).at_positions(600.0, 800.0)


def test_forward_time_at_another_batch_grows_by_its_own_share():
    from layercard.train.metrics import predictions

    cm = CostModel(
        intercept_s=1.0, per_layer_backward_s=0.1, per_module_s=0.01, n_layers=10, batch_size=4,
        batch_tokens=300, measured=[], device="cpu", batch_positions=400, step_position_share=0.25,
        forward_base_s=0.2, forward_per_module_s=0.001, forward_position_share=0.5,
    )  # fmt: skip
    big = cm.at_batch(8)
    # half of the forward grows with the rows: 0.5 + 0.5·2, for the base and for every adapted module
    assert big.forward_time(6) == pytest.approx(cm.forward_time(6) * 1.5)
    assert big.forward_position_share == pytest.approx(2 / 3)
    assert big.at_batch(4).forward_time(6) == pytest.approx(cm.forward_time(6))
    # a run timed on 600 positions gets the same prediction from either model's restated share
    for model in (cm, big):
        planned = {
            "forward_s": model.forward_time(6),
            "calibration_batch_positions": model.batch_positions,
            "forward_position_share": model.forward_position_share,
        }
        out = predictions(planned, None, None, 900.0, None, forward_s=0.3, forward_positions=600)
        assert out["predicted_forward_scaled_s"] == pytest.approx(0.206 * (0.5 + 0.5 * 600 / 400))
        assert out["forward_ratio"] == pytest.approx(0.3 / out["predicted_forward_scaled_s"])
        assert (out["forward_s"], out["forward_positions"]) == (0.3, 600)
    # a card without the share: in proportion to the rows
    old = dataclasses.replace(cm, forward_position_share=None)
    assert old.at_batch(8).forward_time(6) == pytest.approx(2 * cm.forward_time(6))
    assert old.at_batch(8).forward_position_share is None
    # no forward prediction: the measurement is kept, no ratio is made up
    out = predictions({}, None, None, 900.0, None, forward_s=0.3, forward_positions=600)
    assert out["forward_s"] == 0.3 and out["forward_ratio"] is None and out["predicted_forward_s"] is None
    # a card without batch positions: the ratio is taken against the forward as planned
    out = predictions({"forward_s": 0.25}, None, None, 900.0, None, forward_s=0.3, forward_positions=600)
    assert out["predicted_forward_scaled_s"] is None and out["forward_ratio"] == pytest.approx(1.2)


def test_each_micro_batch_of_a_step_pays_the_fixed_part_of_its_time():
    """Gradient accumulation: m micro-batches of the calibration's size cost m calibration steps whatever
    the position share, and a step's fixed part is paid per micro-batch, not once."""
    layers, modules, params = [7, 8, 9], 6, 2_000_000
    t = SHARED.step_time(layers, modules, params)  # share 0.25 of the time grows with positions
    four = SHARED.at_positions(None, None, 4)
    assert four.step_time(layers, modules, params) == pytest.approx(4 * t) and four.step_micro_batches == 4
    assert four.peak_memory(layers, modules, params) == pytest.approx(
        SHARED.peak_memory(layers, modules, params)
    )
    # 4 micro-batches over 600 positions in all: 4 fixed parts, the positions' part at 1.5x
    run = SHARED.at_positions(600.0, 200.0, 4)
    assert run.step_time(layers, modules, params) == pytest.approx(t * (4 * 0.75 + 0.25 * 1.5))
    # one micro-batch of the same positions: the fixed part once
    one = SHARED.at_positions(600.0, 200.0)
    assert one.step_time(layers, modules, params) == pytest.approx(t * (0.75 + 0.25 * 1.5))
    assert CostModel.from_dict(run.to_dict()) == run
    with pytest.raises(LayercardError, match="micro_batches 0"):
        SHARED.at_positions(None, None, 0)
    # a run restates the plan at its own micro-batches: as planned at the plan's, one's price at one
    from layercard.plan.predict import calibration_batch
    from layercard.train.metrics import priced_at

    planned = {"step_time_s": run.step_time(layers, modules, params), **calibration_batch(run.to_dict())}
    same = priced_at(planned, 600.0, 200, micro_batches=4)
    assert same["step_time_scaled_s"] == pytest.approx(planned["step_time_s"])
    single = priced_at(planned, 600.0, 200, micro_batches=1)
    assert single["step_time_scaled_s"] == pytest.approx(one.step_time(layers, modules, params))


def test_position_share_is_the_part_a_line_through_two_batches_puts_on_the_positions():
    assert position_share(2.0, 1.0, 1000, 500) == pytest.approx(1.0)  # proportional
    assert position_share(2.0, 2.0, 1000, 500) == pytest.approx(0.0)  # flat: none grows
    # 0.5 s fixed + 1.5 s per 1000 positions: at 1000 positions 1.5 of the 2.0 s grows with them
    assert position_share(2.0, 0.5 + 0.75, 1000, 500) == pytest.approx(0.75)
    assert position_share(2.0, 2.4, 1000, 500) == 0.0  # noise: the half batch was slower
    assert position_share(2.0, 0.5, 1000, 500) == 1.0  # noise: more than proportional
    assert position_share(2.0, 0.8, 1000, 500, clip=False) == pytest.approx(1.2)  # as measured
    assert position_share(0.0, 0.0, 1000, 500) == 1.0 and position_share(2.0, 1.0, 500, 500) == 1.0


def test_calibration_times_again_only_the_slower_placement_and_keeps_its_forward(monkeypatch):
    import layercard.cost as cost
    from layercard import models

    model = tiny_model("llama", seed=0)
    n_layers = models.num_layers(model)
    calls: list[tuple[bool, int, bool]] = []  # (every layer, rank, forward timed)
    timed_steps: list[int] = []

    def fake(model, targets, batch, steps, rank=8, *, forward=True, dropout=0.0, checkpointing=False):
        every = len({t.split(".layers.")[1].split(".")[0] for t in targets}) == n_layers
        calls.append((every, rank, forward))
        timed_steps.append(steps)
        # every layer at rank 8 is slowed in its first run only: 3.0 s, then 1.9 s; rank 32 takes 2.0 s
        first = sum(c[:2] == (True, 8) for c in calls) == 1
        t = 1.0 if not every else 2.0 if rank == 32 else 3.0 if first else 1.9
        fwd = 0.5 + 0.01 * len(targets) if forward else None
        return cost._Timed([t] * steps, t, 100.0, 200.0 + 10 * len(targets), fwd, 150.0)

    monkeypatch.setattr(cost, "_time_steps", fake)
    passes: list[tuple[int, bool, int]] = []  # (rows, warm, repeats) of the base model's forwards
    timed_forward = cost.forward_seconds

    def base_forward(model, batch, *, warm, repeats=1):
        passes.append((int(batch["input_ids"].shape[0]), warm, repeats))
        return timed_forward(model, batch, warm=warm, repeats=repeats)

    monkeypatch.setattr(cost, "forward_seconds", base_forward)
    ids = torch.randint(5, 90, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    cm = calibrate(model, None, batch, ["q", "v"], steps=2)
    # the base model's forward on the batch and on half of it, the fastest of two passes each, with no
    # untimed pass first: the probe has just run the model
    assert passes == [(4, True, 2), (2, True, 2)]
    every = [r for r in cm.measured if len(r["layers"]) == n_layers]
    single = [r for r in cm.measured if len(r["layers"]) == 1]
    assert [r["rank"] for r in every] == [8, 32] and len(single) == 3
    # only the rank-8 all-layer placement was timed again (after the half batch's run), without a forward
    assert [len(r["warmup_s_by_round"]) for r in cm.measured] == [1, 1, 1, 2, 1]
    assert calls[-1] == (True, 8, False)
    # with one timed step after its warm-up, where the first rounds timed two; the row says so
    assert timed_steps[-1] == 1 and set(timed_steps[:-1]) == {2}
    assert every[0]["timed_steps_by_round"] == [2, 1] and every[0]["timings_s_per_step"] == [3.0, 3.0, 1.9]
    assert cost.timings_by_round(every[0]) == [[3.0, 3.0], [1.9]]
    assert all(r["timed_steps_by_round"] == [2] for r in single + every[1:])
    assert every[0]["s_per_step"] == pytest.approx(1.9) and every[1]["s_per_step"] == pytest.approx(2.0)
    # the rank-8 all-layer placement's forward from its first run; rank 32, single layers and half batch none
    assert every[0]["forward_s"] == pytest.approx(0.5 + 0.01 * 2 * n_layers)
    assert all(r["forward_s"] is None for r in single + every[1:])
    assert [c for c in calls if c[2]] == [(True, 8, True)]


def test_calibration_trains_with_the_plans_dropout_and_records_it(monkeypatch):
    import peft

    model = tiny_model("llama", seed=0)
    ids = torch.randint(5, 90, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    seen: list[float] = []
    wrap = peft.get_peft_model

    def recording(model, config, *args, **kwargs):
        seen.append(config.lora_dropout)
        return wrap(model, config, *args, **kwargs)

    monkeypatch.setattr(peft, "get_peft_model", recording)
    cm = calibrate(model, None, batch, ["q", "v"], steps=1, dropout=0.1)
    # every placement, the half batch's run included, trained with it; the model says so and keeps it
    assert len(seen) >= 6 and set(seen) == {0.1}
    assert cm.dropout == 0.1 and CostModel.from_dict(cm.to_dict()).dropout == 0.1
    # cards calibrated before it was recorded trained without dropout
    old = {k: v for k, v in cm.to_dict().items() if k != "dropout"}
    assert CostModel.from_dict(old).dropout == 0.0
    with pytest.raises(LayercardError, match="dropout must be in"):
        calibrate(model, None, batch, ["q", "v"], steps=1, dropout=1.0)


def test_calibration_starts_the_plan_from_what_the_card_leaves():
    model = tiny_model("llama", seed=0)
    ids = torch.randint(5, 90, (4, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if reset_peak_memory(CPU) is None:
        pytest.skip("this system has no per-run resident peak (/proc/self/clear_refs)")
    # a resident size far below what this process holds: the plan starts from what it holds after
    cm = calibrate(model, None, batch, ["q", "v"], steps=1, resident_mib=1.0)
    assert cm.memory_resident_before_mib == 1.0 and cm.memory_resident_mib > 100.0
    # what a placement adds is fitted as before, on top of that start
    terms = fit_memory(cm.measured, cm.n_layers, cm.memory_resident_mib)
    assert cm.memory_base_mib == pytest.approx(terms["memory_base_mib"])
    assert cm.memory_base_mib - cm.memory_resident_mib == pytest.approx(
        fit_memory(cm.measured, cm.n_layers, 1.0)["memory_base_mib"] - 1.0
    )
    # the same terms refitted to each row's first step, from the same start, are kept beside them
    first = fit_memory(cm.measured, cm.n_layers, cm.memory_resident_mib, key="first_step_peak_memory_mib")
    assert cm.memory_first_step["memory_base_mib"] == pytest.approx(first["memory_base_mib"])
    assert cm.memory_first_step["memory_per_layer_mib"] == pytest.approx(first["memory_per_layer_mib"])
    # and a run in this process, which has now calibrated, keeps the window's
    assert not prices_by_first_step("process_peak_rss")


def test_calibration_measures_memory_and_latency():
    model = tiny_model("llama", seed=0)
    torch.manual_seed(0)
    ids = torch.randint(5, 90, (4, 48))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    cm = calibrate(model, None, batch, ["q", "v"], steps=2, rounds=2)
    assert len(cm.measured) == 5 and cm.batch_tokens == 4 * 48
    # the mean width (d_in + d_out) of the calibration's modules: q and v of the tiny model
    qv = [s for s in models.units(model, ["q", "v"], layers=[0])]
    assert cm.step_module_width == pytest.approx(sum(s.d_in + s.d_out for s in qv) / len(qv))
    n_layers = cm.n_layers
    for row in cm.measured:
        assert row["s_per_step"] > 0 and row["peak_memory_mib"] > 0
        # the forward is timed on the rank-8 all-layer placement only: a single layer's adds next to
        # nothing, and rank 32 adapts the same modules
        if len(row["layers"]) == n_layers and row["rank"] == 8:
            assert row["forward_s"] > 0
        else:
            assert row["forward_s"] is None
        # two rounds of two timed steps each (a third of one step where the times contradicted each
        # other); the placement's time is the fastest of them
        steps = row["timings_s_per_step"]
        assert row["timed_steps_by_round"] in ([2, 2], [2, 2, 1]) and len(steps) == sum(
            row["timed_steps_by_round"]
        )
        # every round's untimed warm-up step is kept beside its timed ones
        assert len(row["warmup_s_by_round"]) == len(row["timed_steps_by_round"])
        assert min(row["warmup_s_by_round"]) > 0
        assert row["s_per_step"] == pytest.approx(min(steps), abs=2e-4)
    assert cm.forward_base_s is not None and cm.forward_base_s > 0 and cm.forward_per_module_s >= 0
    # two module counts, so the least-squares line runs through the base model's forward at none and the
    # all-layer placement's at its count (up to the rows' rounding), unless a term would go negative
    alls = [r for r in cm.measured if r["forward_s"]]
    assert len(alls) == 1
    base, fwd_all = cm.batch_scaling["forward_s"], alls[0]["forward_s"]
    if fwd_all >= base:
        assert cm.forward_time(0) == pytest.approx(base, abs=2e-4)
        assert cm.forward_time(alls[0]["modules"]) == pytest.approx(fwd_all, abs=2e-4)
    # the all-layer placement timed again on half the batch: how much of a step grows with positions
    scaling = cm.batch_scaling
    assert scaling["positions"] == 4 * 48 and scaling["half_positions"] == 2 * 48
    assert len(scaling["half_timings_s_per_step"]) == 2 and scaling["half_s_per_step"] > 0
    assert scaling["s_per_step"] == cm.measured[3]["s_per_step"]  # the full batch's all-layer rank-8 row
    assert cm.step_position_share == pytest.approx(
        position_share(scaling["s_per_step"], scaling["half_s_per_step"], 4 * 48, 2 * 48)
    )
    assert 0.0 <= cm.step_position_share <= 1.0
    # the base model's forward on both batches gives the forward's own share
    assert scaling["forward_s"] > 0 and scaling["half_forward_s"] > 0
    assert cm.forward_position_share == pytest.approx(
        position_share(scaling["forward_s"], scaling["half_forward_s"], 4 * 48, 2 * 48)
    )
    assert 0.0 <= cm.forward_position_share <= 1.0
    if reset_peak_memory(CPU) is None:
        assert cm.memory_base_mib is None  # a lifetime peak is not a per-placement measurement
        return
    assert all(row["peak_memory_mib"] >= row["resident_mib"] > 0 for row in cm.measured)
    # beside each round's window peak, the first step's peak plus the optimizer state, never above it; the
    # row's start is the rounds' median start, which one round's peaks may lie below where the heap grew
    for row in cm.measured:
        windows, first = row["peak_memory_by_round_mib"], row["first_step_peak_by_round_mib"]
        assert len(first) == len(windows) == len(row["warmup_s_by_round"])
        assert all(f <= w for f, w in zip(first, windows, strict=True))
        assert row["resident_mib"] <= row["first_step_peak_memory_mib"] <= row["peak_memory_mib"]
    assert cm.memory_base_mib >= cm.memory_resident_mib > 0
    # each row records its modules' input width, and the card their mean per module
    d_in = {s.name: s.d_in for s in models.units(model, ["q", "v"])}
    assert cm.memory_module_width == pytest.approx(
        sum(r["input_width"] for r in cm.measured) / sum(r["modules"] for r in cm.measured)
    )
    assert all(0 < r["input_width"] <= r["modules"] * max(d_in.values()) for r in cm.measured)
    for name in ("memory_per_layer_mib", "memory_per_module_mib", "memory_per_mparam_mib"):
        assert math.isfinite(getattr(cm, name)) and getattr(cm, name) >= 0
    assert cm.memory_position_share == pytest.approx(
        position_share(scaling["added_mib"], scaling["half_added_mib"], 4 * 48, 2 * 48)
    )
    # the model restores: no adapter left, nothing trainable added
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_contradicting_calibration_times_are_found():
    everything = list(range(30))
    configs = [([29], 8), ([0], 8), ([15], 8), (everything, 8), (everything, 32)]
    assert _out_of_order(configs, [2.2, 4.3, 3.2, 5.4, 6.3]) == []
    assert _out_of_order(configs, [2.2, 4.3, 3.2, 5.4, 5.405]) == []  # within jitter
    # rank 32 on every layer timed faster than rank 8 on every layer: load only slows a step, so the
    # cheaper rank-8 placement is the one timed again
    assert _out_of_order(configs, [2.2, 4.3, 3.2, 7.2, 6.1]) == [3]
    # the top layer alone slower than the bottom layer alone (and the middle): it was slowed
    assert _out_of_order(configs, [4.5, 4.3, 3.2, 5.4, 6.3]) == [0]
    # the bottom layer slower than both all-layer placements: only it
    assert _out_of_order(configs, [2.2, 6.5, 3.2, 5.4, 6.3]) == [1]


def test_the_figure_a_later_process_trains_by():
    from layercard.cost import figure_elsewhere, memory_figure

    first = {"memory_base_mib": 500.0}
    assert figure_elsewhere({"memory_kind": "process_peak_rss", "memory_first_step": first}) == "first_step"
    # the allocator's own peak (CUDA), or a card without first-step terms: the window's figure
    assert (
        figure_elsewhere({"memory_kind": "cuda_max_memory_allocated", "memory_first_step": first}) == "window"
    )
    assert figure_elsewhere({"memory_kind": "process_peak_rss"}) == "window"
    assert figure_elsewhere(None) == "window"
    assert memory_figure({"memory_kind": "process_peak_rss"}, figure_elsewhere(None)) == "window"


def test_a_peak_that_cannot_be_reset_is_named_the_process_lifetimes(monkeypatch, tmp_path):
    """Outside Linux, or where the resident high-water mark cannot be reset, a CPU run's peak is the
    process's since it began: it is named so, not passed off as the run's own."""
    from layercard import cost

    cpu = torch.device("cpu")
    monkeypatch.setattr(cost, "_RESET_FAILED", {"cpu": False})  # the test's own: later tests keep theirs
    assert cost.peak_memory_kind(torch.device("cuda")) == "cuda_max_memory_allocated"
    if cost._STATUS.exists() and cost._CLEAR_REFS.exists():
        assert cost.reset_peak_memory(cpu) is not None
        assert cost.peak_memory(cpu)[1] == "process_peak_rss"
    if not cost._STATUS.exists():
        monkeypatch.setattr(cost, "_STATUS", tmp_path / "status")
        cost._STATUS.write_text("VmRSS:\t100 kB\nVmHWM:\t200 kB\n")
    monkeypatch.setattr(cost, "_CLEAR_REFS", tmp_path)  # a folder: writing to it fails as a locked /proc
    assert cost.reset_peak_memory(cpu) is None
    peak, kind = cost.peak_memory(cpu)
    assert kind == "process_lifetime_peak_rss" == cost.peak_memory_kind(cpu) and peak > 0
    assert "not this run's alone" in cost.memory_kind_text(kind)
    monkeypatch.setattr(cost, "_STATUS", tmp_path / "none")  # no /proc at all
    cost._RESET_FAILED["cpu"] = False
    assert cost.reset_peak_memory(cpu) is None and cost.peak_memory(cpu)[1] == "process_lifetime_peak_rss"


def test_timing_waits_for_every_accelerator_not_cuda_alone(monkeypatch):
    """A clock read after queued GPU work times the queueing unless it waits first: on Apple's MPS too,
    where timing had waited on CUDA only."""
    from layercard.inference import synchronize

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps", None)))
    synchronize(torch.device("cpu"))
    synchronize(torch.device("cuda", 1))
    synchronize(torch.device("mps"))
    assert calls == [("cuda", torch.device("cuda", 1)), ("mps", None)]


def test_float64_statistics_leave_a_device_that_holds_none():
    """Apple's MPS holds no float64: the card's, coupling's, lens' and importance's float64 sums are taken
    on the CPU there, and on the tensor's own device elsewhere."""
    from layercard.inference import as_float64

    t = torch.ones(3, dtype=torch.float32)
    assert as_float64(t).dtype == torch.float64 and as_float64(t).device == t.device

    class OnMps(torch.Tensor):  # a tensor that says it lies on MPS, as torch cannot make one here
        @property
        def device(self):
            return torch.device("mps")

        def double(self):
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype")

        def cpu(self):
            return self.as_subclass(torch.Tensor)

    fake = torch.ones(2).as_subclass(OnMps)
    out = as_float64(fake)
    assert out.dtype == torch.float64 and out.tolist() == [1.0, 1.0]


def test_only_a_calibration_that_trained_on_a_cpu_marks_the_process(monkeypatch):
    """A later training in this process is priced by the window's figure only where a calibration's steps
    widened this process's heap: one refused before any step (a role the model lacks) leaves the process
    as it was."""
    from layercard import cost

    monkeypatch.setattr(cost, "_calibrated_here", False)
    model = tiny_model("llama", seed=0)
    ids = torch.randint(5, 90, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with pytest.raises(LayercardError, match="unknown role"):
        calibrate(model, None, batch, ["gate_nonexistent"], steps=1, rounds=1)
    assert cost.prices_by_first_step("process_peak_rss")  # still a process of its own
    calibrate(model, None, batch, ["q", "v"], steps=1, rounds=1)
    assert not cost.prices_by_first_step("process_peak_rss") and cost._calibrated_here
