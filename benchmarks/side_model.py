"""What a plan needs beside the side form's fractions once it is the default: its expected error by depth
left out, and the shortfall its target-entropy caution quotes.

pooled_quality.py chose ``side-gamma-beta`` (x_p^γ_s·c^β_s, one γ and β per side of the target-entropy
threshold) on ten tasks, and batch_v2.py ``rescore`` adopted it on the four confirmation tasks at the batch it
was fitted at. This script reads only committed runs (no model is loaded):

- ``band``: each of the ten tasks' placements predicted by the form fitted on the other nine; the line
  a + b·u of a prediction's absolute error against the depth share it leaves out (u = 1 − coverage), fitted
  as the default's band was (``fit_error_band``), beside one error for all. Each is fitted on nine tasks'
  errors and scored (mean absolute difference from the errors) on the tenth; the line is kept where it
  scores lower, as it was for the two-task default. The band a plan quotes is the one fitted on all ten.
- ``shortfall``: predicted minus measured over the placements that cover under half the depth, per task:
  the ten tasks from the fits on the other nine, the four confirmation tasks from the fit on all ten (gsm8k
  and samsum at batch 4, as batch_v2.py trained them).

    .venv/bin/python benchmarks/side_model.py     # results/quality/side_model.{json,md}
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "quality"
CHOSEN = "side-gamma-beta"


def held_out_predictions() -> tuple[Any, np.ndarray]:
    """The ten tasks' placements as rows, and each one's fraction predicted by the chosen form fitted on the
    other nine tasks."""
    import pooled_quality as Q

    form = {f.name: f for f in Q.FORMS}[CHOSEN]
    rows = Q.rows_of(Q.pool_records()[0])
    pred = np.zeros(len(rows.y))
    for t, v in Q.held_out(form, rows).items():
        m = rows.task == t
        pred[m] = Q.predict(form, v["params"], rows.where(m))
    return rows, pred


def band_scores(uncovered: np.ndarray, errors: np.ndarray, task: np.ndarray) -> dict[str, Any]:
    """The line and one error for all, each fitted on every task but one and scored on that one: per task
    the mean absolute difference of the fitted band from the errors, and the mean over tasks."""
    from layercard.plan.quality import fit_error_band

    per: dict[str, dict[str, float]] = {}
    for t in sorted(set(task)):
        fit_on, test = task != t, task == t
        a, b = fit_error_band(list(uncovered[fit_on]), list(errors[fit_on]))
        one = float(np.mean(errors[fit_on]))
        per[str(t)] = {
            "line": float(np.mean(np.abs(a + b * uncovered[test] - errors[test]))),
            "one": float(np.mean(np.abs(one - errors[test]))),
        }
    mean = {k: statistics.fmean(v[k] for v in per.values()) for k in ("line", "one")}
    return {"tasks": per, "mean": mean, "chosen": "line" if mean["line"] < mean["one"] else "one"}


def shortfalls(pred: np.ndarray, rows: Any) -> dict[str, dict[str, Any]]:
    """Per task: the mean of predicted minus measured over its placements under half the depth."""
    out = {}
    for t in sorted(set(rows.task)):
        m = (rows.task == t) & (rows.cov < 0.5)
        if m.any():
            d = pred[m] - rows.y[m]
            if not np.all(np.isfinite(d)):
                raise SystemExit(f"side_model.py: {t}: a non-finite predicted or measured fraction")
            out[str(t)] = {
                "shortfall": float(np.mean(d)),
                "placements": int(m.sum()),
                "high": bool(rows.side[m][0]),
            }
    return out


def confirm_rows() -> Any:
    """The confirmation tasks' placements as rescore reads them (gsm8k and samsum at batch 4)."""
    import batch_v2 as B
    import pooled_quality as Q

    return Q.rows_of(B.confirm_records_at_batch())


def score() -> dict[str, Any]:
    import pooled_quality as Q

    from layercard.artifacts import read_json, write_json, write_text
    from layercard.plan.quality import fit_error_band

    pooled = read_json(OUT / "pooled.json")
    if pooled["rule"]["chosen"] != CHOSEN:
        raise SystemExit(f"side_model.py: pooled.json chose {pooled['rule']['chosen']!r}, not {CHOSEN!r}")
    params = pooled["forms"][CHOSEN]["pooled"]["params"]
    rows, pred = held_out_predictions()
    uncovered, errors = 1.0 - rows.cov, np.abs(pred - rows.y)
    a, b = fit_error_band(list(uncovered), list(errors))
    conf = confirm_rows()
    form = {f.name: f for f in Q.FORMS}[CHOSEN]
    out = {
        "form": CHOSEN,
        "params": params,
        "held_out_mae": float(np.mean(errors)),
        "band_check": band_scores(uncovered, errors, rows.task),
        "band": [a, b],
        "shortfall": {
            "held_out": shortfalls(pred, rows),
            "confirm": shortfalls(Q.predict(form, params, conf), conf),
        },
    }
    write_json(OUT / "side_model.json", out)
    write_text(OUT / "side_model.md", markdown(out))
    return out


def markdown(out: dict[str, Any]) -> str:
    bc = out["band_check"]
    a, b = out["band"]
    lines = [
        "# The side form as the default: its error band and its shortfall under half the depth",
        "",
        f"`{out['form']}` (x_p^γ_s·c^β_s), each of the ten pooled tasks predicted by the fit on the other "
        f"nine (mean absolute error {out['held_out_mae']:.3f} over their placements). No model was loaded.",
        "",
        "## Expected error against the depth left out",
        "",
        "Each band fitted on nine tasks' errors, scored on the tenth's (mean absolute difference):",
        "",
        "| task | line a + b·u | one error for all |",
        "|---|---:|---:|",
        *(f"| {t} | {v['line']:.3f} | {v['one']:.3f} |" for t, v in bc["tasks"].items()),
        f"| **mean** | **{bc['mean']['line']:.3f}** | **{bc['mean']['one']:.3f}** |",
        "",
        f"Kept: {'the line' if bc['chosen'] == 'line' else 'one error for all'}. Fitted on all ten: "
        f"{a:.3f} + {b:.3f}·u.",
        "",
        "## Shortfall under half the depth (predicted minus measured, mean)",
        "",
        "| task | side | shortfall | placements | from |",
        "|---|---|---:|---:|---|",
    ]
    for what, label in (("held_out", "fit on the other nine"), ("confirm", "fit on all ten")):
        for t, v in sorted(out["shortfall"][what].items(), key=lambda kv: kv[1]["shortfall"]):
            side = "at or above" if v["high"] else "below"
            lines.append(f"| {t} | {side} | {v['shortfall']:+.3f} | {v['placements']} | {label} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from usage import no_options

    no_options(__doc__)
    print(markdown(score()))
