"""Time and peak memory of `card`, `eval` and `train --dry-run` on large training data.

Writes JSONL files of 1,000, 200,000 and 2,000,000 records (``--sizes``), each record a question and
answer of the built-in synthetic facts task under an id of its own, and the 2,000,000 as a Parquet file
and a saved dataset (``--table-sizes``, ``save_to_disk``), and runs on each, in a process of its own:

- ``card --examples 16 --no-calibrate`` (16 probe examples, and the target entropy's sample);
- ``eval --examples 8`` (the base model on 8 examples);
- ``train --dry-run`` of a plan of 8 layers, 100 steps of 8 (the default), validated on 64 examples of a
  file of 1,000 facts test questions.

Each command's wall time and the peak resident memory of its process (``wait4``) are recorded. Commands
run with the package of this source tree; ``--src LABEL=PATH`` adds a source folder to compare (another
commit's ``src``), run the same way. A command past ``--max-s`` is stopped and recorded as such. Results
are kept per source, format, size and command in the JSON, each with the commit it ran at, so a second
call runs only what is missing.

    .venv/bin/python benchmarks/large_data.py
    git worktree add /tmp/before <commit> && \\
        .venv/bin/python benchmarks/large_data.py --src before=/tmp/before/src --max-s 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "large_data"
WORK = HERE.parent / "runs" / "large_data"
THIS = ("this", HERE.parent / "src")

COMMANDS = ("card", "eval", "train_dry_run")
FORMATS = ("jsonl", "parquet", "dataset")


def _records(path: Path, n: int, split: str) -> Path:
    """``n`` facts records (input, target) cycled under ids of their own, written once."""
    if path.is_file():
        return path
    from layercard.tasks import load_task

    examples = load_task(f"synthetic:facts:{split}").examples
    tmp = path.with_suffix(".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            ex = examples[i % len(examples)]
            f.write(json.dumps({"id": f"{split}-{i}", "input": ex.input, "target": ex.target}) + "\n")
    tmp.rename(path)
    return path


def _table_data(jsonl: Path, fmt: str) -> Path:
    """The records of ``jsonl`` as a Parquet file or a saved dataset folder, written once."""
    path = jsonl.with_suffix(".parquet" if fmt == "parquet" else ".dataset")
    if path.exists():
        return path
    import datasets
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    table = pj.read_json(jsonl)
    tmp = path.with_name(path.name + ".part")
    if fmt == "parquet":
        pq.write_table(table, tmp)
    else:
        datasets.Dataset(table).save_to_disk(str(tmp))
    tmp.rename(path)
    return path


def _mib(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2**20, 1)


def _run(args: list[str], src: Path, max_s: float) -> dict:
    """One layercard command in a process of its own: wall time, peak RSS, exit status."""
    env = os.environ | {"PYTHONPATH": str(src), "LAYERCARD_PROGRESS": "0"}
    t0 = time.perf_counter()
    with open(WORK / "last.log", "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "layercard", *args], stdout=log, stderr=log, env=env)
        stopped = False
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > max_s:
                p.kill()
                _, status, usage = os.wait4(p.pid, 0)
                stopped = True
                break
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and not stopped:
        raise SystemExit(
            f"layercard {' '.join(args)} failed ({code}): {(WORK / 'last.log').read_text()[-2000:]}"
        )
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "stopped": stopped}


def _commit(src: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _command(name: str, data: Path, val: Path, plan: Path, out: Path) -> list[str]:
    if name == "card":
        return [
            "card",
            "-m",
            "smollm2",
            "-t",
            str(data),
            "--examples",
            "16",
            "--no-calibrate",
            "-o",
            str(out),
        ]
    if name == "eval":
        return ["eval", "-m", "smollm2", "-t", str(data), "--examples", "8", "-o", str(out)]
    return ["train", "-p", str(plan), "-t", str(data), "--val-task", str(val), "--dry-run", "-o", str(out)]


def _plan(val: Path) -> Path:
    """A plan of 8 evenly spread layers from an uncalibrated card (the dry run needs a plan, not prices)."""
    plan = WORK / "plan.json"
    if not plan.is_file():
        env = os.environ | {"PYTHONPATH": str(THIS[1])}
        card = WORK / "plan_card"
        base = [sys.executable, "-m", "layercard"]
        probe = [
            "card",
            "-m",
            "smollm2",
            "-t",
            str(val),
            "--examples",
            "16",
            "--no-calibrate",
            "-o",
            str(card),
        ]
        subprocess.run([*base, *probe], check=True, capture_output=True, env=env)
        subprocess.run(
            [*base, "plan", "-c", str(card / "card.json"), "--policy", "uniform", "--budget", "layers=8"]
            + ["--out", str(plan)],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
    return plan


def _upgrade(results: dict) -> dict:
    """Results written before runs recorded their format and commit: JSONL, at the commit the file then
    named for their source."""
    sources = results.pop("sources", {})
    for r in results["runs"].values():
        r.setdefault("format", "jsonl")
        r.setdefault("commit", sources.get(r["source"]))
    return results


def _table(results: dict) -> str:
    from layercard.artifacts import machine_text

    lines = [
        "# Large training files: card, eval and train --dry-run",
        "",
        f"Machine: {machine_text(results['machine'])}. Each command in a process of its own, one at a time, "
        "with progress output off. Records: synthetic facts questions and answers under ids of their own "
        "(the file sizes below). `card --examples 16 --no-calibrate`, `eval --examples 8` (the base model), "
        "`train --dry-run` of an 8-layer plan at 100 steps of 8, validated on 64 of 1,000 test questions.",
        "",
        "The Parquet file and the saved dataset (`save_to_disk`) hold the 2,000,000-record file's records; "
        "their size is on disk (the Parquet file is compressed).",
        "",
        "| source | commit | format | records | size MiB | command | wall s | peak RSS MiB |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    order = {f: i for i, f in enumerate(FORMATS)}
    for r in sorted(
        results["runs"].values(), key=lambda r: (order[r["format"]], r["source"], r["records"], r["command"])
    ):
        wall = f"stopped at {r['wall_s']:.0f}" if r["stopped"] else f"{r['wall_s']:.1f}"
        peak = f"{r['peak_rss_mib']:,.0f}" + (" (at the stop)" if r["stopped"] else "")
        lines.append(
            f"| {r['source']} | {r['commit'] or '?'} | {r['format']} | {r['records']:,} "
            f"| {r['file_mib']:,.1f} | {r['command']} | {wall} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def _figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results["runs"].values())
    tables = [r for r in runs if r["format"] != "jsonl"]
    fig, axes = plt.subplots(2 if tables else 1, 2, figsize=(11, 8.4 if tables else 4.2), squeeze=False)
    styles = ["-", "--", ":", "-."]
    colours = {"card": "tab:blue", "eval": "tab:orange", "train_dry_run": "tab:green"}
    sources = list(dict.fromkeys(r["source"] for r in runs))
    for s, source in enumerate(sources):
        for command in COMMANDS:
            rows = sorted(
                (
                    r
                    for r in runs
                    if r["format"] == "jsonl" and r["source"] == source and r["command"] == command
                ),
                key=lambda r: r["records"],
            )
            if not rows:
                continue
            x = [r["records"] for r in rows]
            for ax, key in zip(axes[0], ("wall_s", "peak_rss_mib"), strict=True):
                ax.plot(x, [r[key] for r in rows], styles[s % 4], marker="o", color=colours[command],
                        label=f"{command} ({source}, {rows[0]['commit']})")  # fmt: skip
                for r in rows:
                    if r["stopped"]:
                        ax.annotate(
                            "stopped", (r["records"], r[key]), textcoords="offset points", xytext=(4, 4)
                        )
    for ax, label in zip(axes[0], ("wall time (s)", "peak resident memory (MiB)"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("records in the JSONL training file")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if tables:
        groups = list(dict.fromkeys((r["format"], r["records"], r["command"]) for r in tables))
        table_sources = list(dict.fromkeys(r["source"] for r in tables))
        width = 0.8 / len(table_sources)
        for ax, key, label in zip(
            axes[1], ("wall_s", "peak_rss_mib"), ("wall time (s)", "peak resident memory (MiB)"), strict=True
        ):
            for s, source in enumerate(table_sources):
                by = {
                    (r["format"], r["records"], r["command"]): r[key] for r in tables if r["source"] == source
                }
                xs = [g + s * width for g, k in enumerate(groups) if k in by]
                commit = next(r["commit"] for r in tables if r["source"] == source)
                ax.bar(xs, [by[k] for k in groups if k in by], width, label=f"{source}, {commit}")
            ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
            ax.set_xticklabels([f"{f}\n{c}" for f, _, c in groups], fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"Parquet and saved dataset, {groups[0][1]:,} records", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        axes[1][0].legend(fontsize=8)
    fig.suptitle("layercard on large training data (one command per process)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,200000,2000000", help="records per JSONL training file")
    ap.add_argument(
        "--table-sizes", default="2000000", help="records per Parquet file and saved dataset (of --sizes)"
    )
    ap.add_argument("--src", action="append", default=[], help="LABEL=PATH: another source folder to run")
    ap.add_argument("--max-s", type=float, default=900, help="stop a command after this many seconds")
    ap.add_argument("--redo", action="store_true", help="run every command again")
    args = ap.parse_args()
    from layercard.artifacts import machine_info, write_json

    sources = [THIS] + [(s.split("=", 1)[0], Path(s.split("=", 1)[1])) for s in args.src]
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "large_data.json"
    results = _upgrade(json.loads(path.read_text()) if path.is_file() and not args.redo else {"runs": {}})
    results["machine"] = machine_info()
    commits = {label: _commit(src) for label, src in sources}
    val = _records(WORK / "val.jsonl", 1000, "test")
    plan = _plan(val)
    table_sizes = {int(x) for x in args.table_sizes.split(",") if x}
    for n in [int(x) for x in args.sizes.split(",")]:
        jsonl = _records(WORK / f"train_{n}.jsonl", n, "train")
        for fmt in ("jsonl", "parquet", "dataset") if n in table_sizes else ("jsonl",):
            data = jsonl if fmt == "jsonl" else _table_data(jsonl, fmt)
            for label, src in sources:
                for command in COMMANDS:
                    key = f"{label}/{n}/{command}" if fmt == "jsonl" else f"{label}/{fmt}/{n}/{command}"
                    if key in results["runs"]:
                        continue
                    out = WORK / f"out_{label}_{fmt}_{n}_{command}"
                    r = _run(_command(command, data, val, plan, out), src, args.max_s)
                    results["runs"][key] = {
                        "source": label, "commit": commits[label], "format": fmt, "records": n,
                        "file_mib": _mib(data), "command": command, **r,
                    }  # fmt: skip
                    print(key, r, flush=True)
                    write_json(path, results)
    write_json(path, results)
    (RESULTS / "large_data.md").write_text(_table(results))
    _figure(results, RESULTS / "large_data.png")
    print(f"wrote {RESULTS}/large_data.{{json,md,png}}")


if __name__ == "__main__":
    main()
