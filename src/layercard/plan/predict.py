"""What a plan predicts for a layer set: gain (§4), costs (§5), and the warnings and provenance it carries.

Shared by make_plan and :meth:`Plan.restricted`, so a restricted plan's numbers are computed exactly as a
planned one's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from layercard.artifacts import Provenance
from layercard.card.artifact import Card
from layercard.errors import card_setting_text
from layercard.plan.space import AUTO_REFERENCE_RANK, Space


def unit_rank(rank: int | str) -> int:
    """The rank a layer set is costed at: the planned rank, or the uniform reference under ``auto``."""
    return AUTO_REFERENCE_RANK if rank == "auto" else int(rank)


def predicted(
    space: Space, layers: Sequence[int], score: str, params: int, captured: float | None
) -> dict[str, Any]:
    """The predicted gain and costs of adapting ``layers`` (and the batch the step times refer to)."""
    card = space.card
    gain = space.gain(layers)
    all_gain = space.gain(space.layers)
    out: dict[str, Any] = {
        "score": score,
        "score_basis": card.default_score_basis
        if score == card.default_score
        else "not the card's default score; no measured correlation recorded",
        "gain": gain,
        "all_layer_gain": all_gain,
        "fraction": gain / all_gain if all_gain > 0 else None,
        "additive_gain": space.additive_gain(layers),
        "redundancy": space.redundancy(layers),
        "coupling": _coupling_note(card),
        # at the placement's own ranks (rank auto spreads a budget unevenly), not the uniform rank's
        "step_time_s": space.step_time(layers, params),
        "all_layer_step_time_s": space.step_time(space.layers),
        "memory": space.memory(layers, params),
        "forward_s": space.forward_time(layers),
        "params": int(params),
        "all_layer_params": int(space.cost(space.layers, "params")),
        "modules": space.modules(layers),
        "input_width": space.input_width(layers),
        "n_layers": len(layers),
        "captured": captured,
    }
    if card.cost is not None:
        out |= calibration_batch(card.cost, card.provenance.get("machine"))
    if out["memory"]:
        out["memory_figure"] = space.memory_figure
    return out


def calibration_batch(cost: dict[str, Any], machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The batch a card's times and memory (its ``cost``) refer to (as the plan priced them), and how much
    of each grows with positions, so that train can compare like with like at its own batch (see
    ``train.metrics.predictions``); and the device and ``machine`` (the card's provenance) they were
    measured on."""
    return {
        "calibration_batch_size": cost.get("batch_size"),
        "calibration_batch_tokens": cost.get("batch_tokens"),
        "calibration_batch_positions": cost.get("batch_positions"),
        # where peak memory is priced at other positions than a step (a run's largest micro-batch)
        "calibration_memory_positions": cost.get("memory_positions"),
        "step_time_position_share": cost.get("step_position_share"),
        "step_micro_batches": cost.get("step_micro_batches", 1),
        "forward_position_share": cost.get("forward_position_share"),
        # runs trained otherwise are not priced like with like (train says so)
        "calibration_checkpointing": bool(cost.get("checkpointing", False)),
        "calibration_dtype": cost.get("dtype"),  # None: a card from before it was recorded
        "calibration_device": cost.get("device"),
        "calibration_machine": machine,
    }


def positions_text(config: dict[str, Any]) -> str:
    """The positions a plan's costs were priced at where it was given a run's (``step_positions``,
    ``peak_positions``), else an empty string."""
    step, peak = config.get("step_positions"), config.get("peak_positions")
    parts = [f"{step:,.0f} padded positions per step"] if step else []
    parts += [f"{peak:,.0f} in the largest micro-batch"] if peak else []
    return " and ".join(parts)


def kind_warnings(kind: str) -> list[str]:
    """The caveat of planning bottleneck adapters from LoRA measurements."""
    if kind == "lora":
        return []
    return [
        f"kind {kind}: predicted gain and step time come from LoRA measurements (a proxy); "
        "params count the two bottleneck adapters per layer that train builds"
    ]


def caveats(card: Card, kind: str, dropout: float, pred: dict[str, Any], score: str) -> list[str]:
    """What a layer-policy plan says of its own figures: the adapter kind's proxy, gains the quality model
    cannot vouch for, and costs measured at another LoRA dropout."""
    return kind_warnings(kind) + gain_warnings(pred, score) + dropout_warnings(card, dropout)


def dropout_warnings(card: Card, dropout: float) -> list[str]:
    """The caveat of pricing a plan's LoRA dropout with a calibration that trained with another: dropout
    keeps a dropped copy of every adapted module's input and draws random numbers, so its costs are not
    the calibration's (benchmarks/results/cost/dropout0.05)."""
    if card.cost is None:
        return []
    calibrated = float(card.cost.get("dropout", 0.0))
    if abs(calibrated - float(dropout)) < 1e-9:
        return []
    return [
        f"costs: the card's cost calibration trained with LoRA dropout {calibrated:g}, this plan's is "
        f"{float(dropout):g}, so its step time and memory are priced at {calibrated:g} (at 0.05 against "
        "a calibration at 0, smollm2's steps measured 4–36% longer and its peaks up to 26% higher than "
        f"priced); measure the card with {card_setting_text('calibrate_dropout', f'{float(dropout):g}')}"
    ]


def gain_warnings(pred: dict[str, Any], score: str) -> list[str]:
    """Warnings on predicted gains the quality model cannot vouch for."""
    warn = []
    if pred["gain"] > pred["additive_gain"] * (1 + 1e-6) + 1e-300:
        # Set gain above the sum of single-layer gains means C_SS is near-singular with gains that do not fit
        # it (cosines near 1, unequal gains): the §4 model is outside its range, so say so.
        warn.append(
            "predicted set gain exceeds the additive gain: the coupling matrix is near-singular for these "
            "layers; treat the set gain with caution"
        )
    if pred["all_layer_gain"] <= 0:
        warn.append(f"every layer's predicted gain under score {score!r} is ≤ 0; the fraction is undefined")
    return warn


def provenance(card: Card, config: dict[str, Any], t0: float) -> dict[str, Any]:
    """The provenance block of a plan made from ``card`` with ``config``, started at ``t0``."""
    return Provenance.make(
        stage="plan",
        model_id=card.model["id"],
        model_hash=card.model["hash"],
        task=card.task["name"],
        data_hash=card.task["data_hash"],
        config=config,
        seed=config["seed"],
        wall_time_s=time.perf_counter() - t0,
        tokenizer_hash=card.provenance.get("tokenizer_hash"),  # the card's tokens are the plan's
    ).to_dict()


def _coupling_note(card: Card) -> str:
    if card.coupling is None:
        return "absent (independent units assumed)"
    c = card.coupling
    return f"layer-level, {c.get('direction', '?')} directions, {c.get('examples', '?')} examples"


def card_summary(card: Card, card_path: str | None) -> dict[str, Any]:
    """What a plan records of the card it was made from (the model check and the prompt come from here)."""
    return {
        "path": card_path,
        "model_id": card.model["id"],
        "model_hash": card.model["hash"],
        "task": card.task["name"],
        "data_hash": card.task["data_hash"],
        "prompt": card.task.get("prompt"),
        "roles": list(card.roles),
        "n_layers": card.n_layers,
        # which card exactly, and how it was measured: cards of one model and task at another seed, dtype
        # or device hold other numbers
        "content_hash": card.content_hash,
        "seed": card.config.get("seed"),
        "dtype": card.provenance.get("config", {}).get("dtype"),
        "device": card.provenance.get("config", {}).get("device"),
    }
