"""Human-readable views of a card: markdown table and the top layers by a score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layercard.card.artifact import SCORES, Card


def top_layers(card: Card, key: str = "resnorm", k: int = 5) -> list[int]:
    """The k layers with the highest per-layer value of ``key`` (a layer_table column)."""
    rows = card.layer_table()
    vals = np.array([r[key] for r in rows])
    return [int(i) for i in np.argsort(-vals, kind="stable")[:k]]


def _entropy_line(card: Card) -> list[str]:
    h = card.task.get("target_entropy")
    if h is None:
        return []
    n = card.task["target_entropy_tokens"]
    return [f"- target entropy {h:.3f} nats per token, over {n} target tokens of the task"]


def card_markdown(card: Card) -> str:
    rows = card.layer_table()
    lines = [
        f"# Layer Card · {card.model['id']} · {card.task['name']}",
        "",
        f"- model hash `{card.model['hash'][:16]}`, {card.n_layers} layers, family {card.model['family']}",
        f"- task `{card.task['source']}` split {card.task['split']}, {card.task['n_examples']} examples, "
        f"{card.n_positions} positions, {card.n_target_tokens} target tokens, probe loss {card.loss:.4f}",
        *_entropy_line(card),
        f"- roles {', '.join(card.roles)}; damping δ = {card.delta:g}; LoRA r={card.config['lora_rank']}, "
        f"α={card.config['lora_alpha']}, lr={card.config['lr']:g} for the first-step rate",
        f"- planner's default score: **{card.default_score}** ({card.default_score_basis})",
        "- timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in card.timings.items()),
        "",
        "| layer | resnorm | ‖∇W‖ | energy | κ | eff. rank | noise amp. | capacity | rate | LoRA params |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['resnorm']:.4g} | {r['gradnorm']:.4g} | "
            f"{r.get('energy', float('nan')):.4g} | "
            f"{r.get('kappa', float('nan')):.3g} | {r.get('effective_rank', float('nan')):.1f} | "
            f"{r.get('noise_amplification', float('nan')):.3g} | {r['capacity']:.4g} | {r['rate']:.4g} | "
            f"{int(r['lora_params'])} |"
        )
    lines += ["", "Top 5 layers by resnorm: " + ", ".join(map(str, top_layers(card, "resnorm")))]
    lines += [
        "Top 5 layers by the default score: " + ", ".join(map(str, top_layers(card, card.default_score)))
    ]
    lines += ["", "## Scores", ""] + [f"- `{k}`: {v}" for k, v in SCORES.items()]
    if card.cost:
        c = card.cost
        lines += [
            "",
            "## Cost model (measured on this machine)",
            "",
            f"`{c['formula']}` with intercept {c['intercept_s']:.3f} s, per-layer backward "
            f"{c['per_layer_backward_s']:.4f} s, per-module {c['per_module_s']:.4f} s"
            + (
                f" (a module as wide as the calibration's mean, d_in + d_out = {c['step_module_width']:,.0f})"
                if c.get("step_module_width")
                else ""
            )
            + f", per million adapter parameters {c.get('per_mparam_s', 0.0):.4f} s "
            f"(batch {c['batch_size']} sequences, {c['batch_tokens']} tokens"
            + (f", {c['batch_positions']:,.0f} padded positions" if c.get("batch_positions") else "")
            + f", {c['device']}).",
            *_memory_terms(c),
            "",
            "| adapted layers | modules | rank | measured s/step | predicted s/step |",
            "|---|---:|---:|---:|---:|",
        ]
        from layercard.cost import CostModel

        cm = CostModel.from_dict(c)
        for m in c["measured"]:
            ls = m["layers"]
            desc = f"{ls[0]}–{ls[-1]}" if len(ls) > 1 else str(ls[0])
            predicted = cm.step_time(ls, m["modules"], m.get("params", 0))
            lines.append(
                f"| {desc} | {m['modules']} | {m.get('rank', 8)} | {m['s_per_step']:.3f} | {predicted:.3f} |"
            )
        b = c.get("batch_scaling")
        if b:
            memory = c.get("memory_position_share")
            lines += [
                "",
                f"Every layer at rank 8 on half the batch ({b['half_positions']} of {b['positions']} padded "
                f"positions): {b['half_s_per_step']:.3f} s/step, so {100 * c['step_position_share']:.0f}% of "
                "a step grows with the positions it computes"
                + (f", and {100 * memory:.0f}% of the memory training adds" if memory is not None else "")
                + ". A run at another batch is priced by that share.",
            ]
    if card.coupling:
        c = np.asarray(card.coupling["matrix"])
        off = c[~np.eye(c.shape[0], dtype=bool)]
        lines += [
            "",
            "## Coupling",
            "",
            f"Layer-level cosines of update effects ({card.coupling['direction']} directions, "
            f"{card.coupling['examples']} examples): mean off-diagonal {off.mean():.3f}, "
            f"max {off.max():.3f}.",
        ]
    return "\n".join(lines) + "\n"


def _memory_terms(c: dict[str, Any]) -> list[str]:
    """The cost model's memory terms as card.md states them, where the card measured peak memory."""
    if c.get("memory_base_mib") is None:
        return []
    from layercard.cost import memory_kind_text

    def term(key: str) -> float:
        return float(c.get(key) or 0.0)

    return [
        "",
        (f"`{c['memory_formula']}` with" if c.get("memory_formula") else "Peak training memory:")
        + f" base {term('memory_base_mib'):,.1f} MiB (of which "
        f"{term('memory_resident_mib'):,.1f} MiB in use before the steps), per layer "
        f"{term('memory_per_layer_mib'):.2f} MiB, per module {term('memory_per_module_mib'):.2f} MiB, per "
        f"million adapter parameters {term('memory_per_mparam_mib'):.1f} MiB (the "
        f"{memory_kind_text(c.get('memory_kind'))}).",
    ]


def write_card_folder(card: Card, out: str | Path) -> list[Path]:
    """``out/card.json``, ``card.md`` and the figures, all or none of them; returns the figure paths.

    Everything is built in a temporary folder inside ``out`` first, so a failure there (a figure, a
    number JSON cannot hold) leaves ``out`` as it was. Then the old card.json goes, the figures and card.md
    move in, a figure of an earlier card that this one lacks is removed, and card.json comes last: its
    presence means a complete card, and a folder caught between the moves holds none.
    """
    import contextlib
    import os
    import shutil
    import tempfile

    from layercard.artifacts import _temp_prefix, check_out_folder, non_finite, remove_stale_temps, write_text
    from layercard.card.artifact import CARD_FILE
    from layercard.card.figures import FIGURES, write_all
    from layercard.errors import LayercardError

    out = check_out_folder(out)
    found = non_finite(card.to_dict())
    if found is not None:  # named at the path it was meant for, not the temporary one
        raise LayercardError(
            f"{out / CARD_FILE}: refusing to write a non-finite number at {found[0]} "
            "(JSON has no NaN or Infinity); nothing was written"
        )
    out.mkdir(parents=True, exist_ok=True)
    # Named as every temporary is, and the next card's write removes one a killed process left (the
    # other writes into the folder sweep only the names they write).
    remove_stale_temps(out, "card")
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix("card"), suffix=".tmp", dir=out))
    try:
        names = [p.name for p in write_all(card, tmp)]
        write_text(tmp / "card.md", card_markdown(card))
        card.save(tmp / CARD_FILE)
        for name in (*names, "card.md", CARD_FILE):
            if (out / name).is_dir() and not (out / name).is_symlink():
                raise LayercardError(f"{out / name}: is a folder; the card cannot write its {name} there")
        with contextlib.suppress(FileNotFoundError):
            (out / CARD_FILE).unlink()
        for name in (*names, "card.md"):
            os.replace(tmp / name, out / name)
        for name in FIGURES:
            if name not in names:
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
        os.replace(tmp / CARD_FILE, out / CARD_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in names]


_TIMING_NAMES = {
    "probe_s": "probe pass",
    "coupling_s": "coupling",
    "calibrate_s": "cost calibration",
    "target_entropy_s": "target entropy",
    "weight_snr_s": "weight SNR",
}


def timings_text(timings: dict[str, float]) -> str:
    """A card's timings in words: the total, then each part (the statistics are part of the probe pass)."""
    rest = dict(timings)
    total = rest.pop("total_s", None)
    stats = rest.pop("stats_s", None)
    parts = []
    for key, value in rest.items():
        name = _TIMING_NAMES.get(key, key.removesuffix("_s").replace("_", " "))
        within = f" (its statistics {stats:.1f} s)" if key == "probe_s" and stats is not None else ""
        parts.append(f"{name} {value:.1f} s{within}")
    head = f"{total:.1f} s in all" if total is not None else "time"
    return f"{head}: {', '.join(parts)}" if parts else head
