"""Summarise a plan→train→eval run folder (see plan_train_e2e.sh) into JSON + markdown.

.venv/bin/python benchmarks/summarize_plan_train.py RUN_DIR OUT_PREFIX
"""

from __future__ import annotations

import time
from pathlib import Path


def _load(p: Path) -> dict | None:
    from layercard.artifacts import read_json

    return read_json(p) if p.exists() else None


def main(run: Path, out: Path) -> None:
    from layercard.artifacts import machine_info, package_versions, write_json

    rows = {}
    base = _load(run / "eval_base" / "eval.json")
    for pol in ("card", "all"):
        plan = _load(run / f"plan_{pol}.json")
        tm = _load(run / f"train_{pol}" / "train_metrics.json")
        ev = _load(run / f"eval_{pol}" / "eval.json")
        if plan is None:
            continue
        rows[pol] = {
            "layers": plan["layers"],
            "modules": plan["predicted"]["modules"],
            "params_planned": plan["predicted"]["params"],
            "predicted_gain_fraction": plan["predicted"].get("fraction"),
            "predicted_step_time_s": plan["predicted"].get("step_time_s"),
            "train": None
            if tm is None
            else {
                k: tm.get(k)
                for k in (
                    "trainable_params",
                    "s_per_step",
                    "tokens_per_s",
                    "peak_memory_mib",
                    "peak_memory_kind",
                    "first_train_loss",
                    "final_train_loss",
                    "final_val_loss",
                    "predicted_step_time_s",
                    "step_time_ratio",
                    "predicted_batch_tokens",
                    "batch_tokens_per_step",
                    "wall_time_s",
                    "steps",
                )
            },
            "eval": None
            if ev is None
            else {
                "metrics": ev["metrics"],
                "loss": ev["loss"],
                "n": ev["n"],
                "s_per_example": ev["timing"].get("s_per_example"),
            },
        }
    res = {
        "run": str(run),
        "base_eval": None
        if base is None
        else {"metrics": base["metrics"], "loss": base["loss"], "n": base["n"]},
        "policies": rows,
        "machine": machine_info(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(str(out) + ".json"), res)
    lines = [
        "# Plan → train → eval on smollm2 / e2e_nlg",
        "",
        "Train on e2e_nlg validation (547 MRs, first reference), 100 steps, batch 8, max 128 tokens, "
        "LoRA r=8, "
        "α=16, AdamW lr 1e-3, seed 0; evaluate greedy generation on the first seeded "
        f"{base['n'] if base else '?'} examples of e2e_nlg test against all references. "
        f"Machine: {res['machine'].get('cpu_count')} CPU cores, {res['date']}.",
        "",
        "| placement | layers | modules | trainable params | s/step measured | s/step predicted "
        "| peak mem MiB "
        "| val loss | test loss | BLEU | ROUGE-L |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if base:
        m = base["metrics"]
        lines.append(
            f"| base (no adapter) | – | 0 | 0 | – | – | – | – | {base['loss']:.4f} | "
            f"{m.get('bleu', float('nan')):.2f} | {m.get('rouge_l', float('nan')):.4f} |"
        )
    for pol, r in rows.items():
        t, e = r["train"] or {}, r["eval"] or {}
        m = e.get("metrics", {})
        pst = r["predicted_step_time_s"]
        lines.append(
            f"| {pol} | {','.join(map(str, r['layers']))} | {r['modules']} | {t.get('trainable_params')} | "
            f"{t.get('s_per_step', float('nan')):.2f} | {pst if pst is None else f'{pst:.2f}'} | "
            f"{t.get('peak_memory_mib', float('nan')):.0f} | {t.get('final_val_loss', float('nan')):.4f} | "
            f"{e.get('loss', float('nan')):.4f} | {m.get('bleu', float('nan')):.2f} | "
            f"{m.get('rouge_l', float('nan')):.4f} |"
        )
    lines += [
        "",
        "Predicted s/step comes from the card's calibrated cost model (its calibration batch is the card's "
        "first probe micro-batch; the training batches differ in length, so the comparison is indicative).",
    ]
    Path(str(out) + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("out_prefix", type=Path)
    args = ap.parse_args()
    main(args.run_dir, args.out_prefix)
