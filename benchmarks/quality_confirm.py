"""The frozen quality model scored, unchanged, on placements it was never fitted on.

benchmarks/placement_v2.py trained LoRA placements of six tasks on smollm2 (36 steps, lr 2e-3, each task's
own card); its run files keep every placement's units and test loss. This script predicts each distinct
placement's fraction of the reference's loss drop with the default quality model and with the candidate
`saturation` form (its parameters from the pooled fit in results/quality/saturation.json), from the card
placement_v2 measured for that task, and scores both against the measured fraction (mean over the
placement's seeds). gsm8k, samsum, facts and format were used to fit neither; e2e_nlg and sst2 fitted both,
on other placements. No model is loaded.

    .venv/bin/python benchmarks/quality_confirm.py        # writes results/quality/confirm.{json,md}
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "quality"
FITTED_ON = ("e2e_nlg", "sst2")
CANDIDATE = "saturation"


def placements(task: str) -> list[dict[str, Any]]:
    """Each distinct LoRA placement of ``task`` (default initialisation): units, seeds and mean test loss."""
    from placement_v2_summary import _runs

    out = []
    for sig, by_seed in _runs(task).items():
        rs = [by_seed[k] for k in sorted(by_seed)]
        if rs[0].get("kind") == "lora" and rs[0].get("init", "default") == "default":
            out.append(
                {
                    "signature": sig,
                    "label": rs[0]["label"],
                    "units": rs[0]["units"],
                    "seeds": sorted(by_seed),
                    "test_loss": statistics.mean(float(r["test_loss"]) for r in rs),
                }
            )
    return out


def score() -> dict[str, Any]:
    import placement_v2 as P

    from layercard.artifacts import read_json, write_json, write_text
    from layercard.card import Card
    from layercard.plan.quality import ALL_FORMS, default_model, features

    summary = read_json(P.RESULTS / "summary.json")
    model = default_model()
    cand = tuple(read_json(OUT / "saturation.json")["pooled"]["seed mean"]["params"])
    out: dict[str, Any] = {
        "model": model.describe(),
        "candidate": {"form": CANDIDATE, "params": list(cand)},
        "steps": P.STEPS,
        "lr": P.LR,
        "tasks": {},
    }
    for task, facts in summary["tasks"].items():
        card = Card.load(P.RESULTS / "cards" / task / "card.json")
        by_pos = {(u.layer, u.role): u.key for u in card.units}
        base, ref = float(facts["base_loss"]), float(facts["reference_loss"])
        rows = []
        for p in placements(task):
            ranks = {by_pos[(layer, role)]: int(r) for layer, role, r in p["units"]}
            f = features(card, ranks, score=model.score, steps=P.STEPS, lr=P.LR)
            rows.append(
                {
                    "label": p["label"],
                    "seeds": p["seeds"],
                    "params_share": f.params,
                    "measured": (base - p["test_loss"]) / (base - ref),
                    "predicted": model.predict(f),
                    "candidate": ALL_FORMS[CANDIDATE].fn(f, cand),
                    "steps_over_tau": f.steps_over_tau,
                }
            )
        rows = [r for r in rows if abs(r["measured"] - 1.0) > 1e-12 or r["params_share"] < 0.999]
        out["tasks"][task] = {
            "fitted_on": task in FITTED_ON,
            "placements": len(rows),
            "steps_over_tau": rows[0]["steps_over_tau"] if rows else None,
            "tau_steps": (P.STEPS / rows[0]["steps_over_tau"] * cand[1]) if rows else None,
            "mae": statistics.mean(abs(r["predicted"] - r["measured"]) for r in rows),
            "mae_candidate": statistics.mean(abs(r["candidate"] - r["measured"]) for r in rows),
            "runs": rows,
        }
    unseen = [t for t, v in out["tasks"].items() if not v["fitted_on"]]
    out["unseen_mae"] = statistics.mean(out["tasks"][t]["mae"] for t in unseen)
    out["unseen_mae_candidate"] = statistics.mean(out["tasks"][t]["mae_candidate"] for t in unseen)
    write_json(OUT / "confirm.json", out)
    write_text(OUT / "confirm.md", _markdown(out))
    return out


def _markdown(out: dict[str, Any]) -> str:
    m, c = out["model"], out["candidate"]
    lines = [
        "# Quality model on placements it was not fitted on",
        "",
        f"The default model (`{m['form']}`, params {', '.join(f'{v:g}' for v in m['params'])}) and the "
        f"candidate `{c['form']}` (γ, c, κ = {', '.join(f'{v:.4g}' for v in c['params'])}), frozen, "
        "predicting every "
        f"distinct LoRA placement benchmarks/placement_v2.py trained on smollm2 ({out['steps']} steps, lr "
        f"{out['lr']:g}), from that benchmark's card of each task. Measured: the placement's fraction of the "
        "reference's loss drop, mean over its seeds. gsm8k, samsum, facts and format fitted neither form. "
        f"T/τ: the run's steps over the reference's time constant `{c['form']}` estimates from the card.",
        "",
        f"| task | used to fit | placements | T/τ (τ in steps) | MAE, default | MAE, {c['form']} |",
        "|---|---|---:|---|---:|---:|",
    ]
    for t, v in out["tasks"].items():
        lines.append(
            f"| {t} | {'yes (other placements)' if v['fitted_on'] else 'no'} | {v['placements']} | "
            f"{out['steps'] / v['tau_steps']:.2f} ({v['tau_steps']:.1f}) | **{v['mae']:.3f}** | "
            f"{v['mae_candidate']:.3f} |"
        )
    lines += [
        "",
        f"Mean over the four tasks used to fit neither: default **{out['unseen_mae']:.3f}**, {c['form']} "
        f"{out['unseen_mae_candidate']:.3f}.",
        "",
        f"| task | placement | seeds | params share | measured | default | {c['form']} |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for t, v in out["tasks"].items():
        for r in v["runs"]:
            lines.append(
                f"| {t} | {r['label']} | {len(r['seeds'])} | {r['params_share']:.3f} | {r['measured']:.3f} | "
                f"{r['predicted']:.3f} | {r['candidate']:.3f} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import json

    res = score()
    per = {t: {k: v[k] for k in ("placements", "mae", "mae_candidate")} for t, v in res["tasks"].items()}
    print(json.dumps(per | {"unseen": [res["unseen_mae"], res["unseen_mae_candidate"]]}, indent=1))
