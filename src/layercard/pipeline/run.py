"""The whole job over one loaded model: every stage in order, then the run summary (docs/design.md §1)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from layercard.artifacts import (
    SCHEMA_VERSION,
    check_out_folder,
    check_unlocked,
    is_temporary,
    remove_stale_temps,
    write_json,
    writer_lock,
)
from layercard.errors import LayercardError, expect
from layercard.pipeline.config import RunConfig
from layercard.pipeline.stages import Runner, StageCallback
from layercard.progress import say
from layercard.run_layout import BASE_EVAL, RUN_FILE, TRIMMED_EVAL, RunLayout

__all__ = ["RUN_KIND", "STAGE_ORDER", "SUMMARY_KIND", "choose_threads", "default_run_dir", "run_pipeline"]

RUN_KIND = "run_config"
SUMMARY_KIND = "run_summary"
# The stages in the order they run; ``until`` stops after one of them.
STAGE_ORDER = ("card", "plan", "train", "trim", "eval", "report")


def choose_threads(setting: int | str) -> int:
    """Torch intra-op threads for a run: the number given, or for ``auto`` the cores left idle.

    On a shared CPU, OpenMP threads beyond the idle cores spin-wait on their busy siblings: measured on
    2 cores with one other busy process, a SmolLM2 forward+backward took 17-23 s on 2 threads and 6-8 s
    on 1. ``auto`` therefore takes the cores minus those busy now (at least 1, at most torch's default).
    Busy cores are sampled over half a second from /proc/stat; the 1-minute load average, the fallback
    elsewhere, still counts work that just ended, such as this process's own previous run.
    """
    import os

    import torch

    default = torch.get_num_threads()
    if setting != "auto":
        return int(setting)
    busy = _busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform: keep torch's default
            return default
    idle = (os.cpu_count() or default) - round(busy)
    return max(1, min(default, idle))


def _busy_cores(interval: float = 0.5) -> float | None:
    """Cores busy over the next ``interval`` seconds (this process sleeps meanwhile), or None off Linux."""
    import os

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    first = sample()
    if first is None:
        return None
    time.sleep(interval)
    second = sample()
    if second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (total - idle) / total


def default_run_dir(cfg: RunConfig) -> Path:
    """``runs/<config file name>``: the run folder of a config given none."""
    return Path("runs") / Path(cfg.source).stem


def run_pipeline(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    *,
    progress: bool | None = None,
    on_stage: StageCallback | None = None,
    until: str = "report",
) -> dict[str, Any]:
    """Run every stage of ``cfg`` in ``run_dir``, skipping those whose inputs are unchanged.

    ``run_dir`` None is :func:`default_run_dir`, which configs of one file name share: a run there of
    another config file, or of a config built in memory where a file's ran (or the other way), is
    refused. A run folder given is used whichever config ran in it before (the stages whose inputs
    changed are made again).

    ``until`` stops after that stage (one of :data:`STAGE_ORDER`): ``plan`` measures the card and makes
    every plan, priced at the run's own batches, and trains nothing; a later call goes on from there.
    ``on_stage(event, name, result)`` is called with ``("start", name, None)`` before a stage runs and
    ``("end", name, result)`` after it ran or was skipped. Returns the run summary (also written to
    ``summary.json``): each stage's status and the headline numbers of every placement.
    """
    t0 = time.perf_counter()
    import torch

    expect("run_pipeline", "cfg", cfg, RunConfig, "read the YAML with layercard.load_config")
    if until not in STAGE_ORDER:
        raise LayercardError(f"until {until!r}: not a stage; valid: {', '.join(STAGE_ORDER)}")
    root = default_run_dir(cfg) if run_dir is None else Path(run_dir)
    runner = _open_run(
        cfg,
        root,
        progress=progress,
        on_stage=on_stage,
        trains_here=until not in ("card", "plan"),
        shared=run_dir is None,
    )
    # One process per run folder: a second one would interleave its stages with ours.
    with writer_lock(root, what="run folder"):
        remove_stale_temps(root)  # half-written files of a killed earlier run
        root.mkdir(parents=True, exist_ok=True)
        # the summary of an earlier call must not outlive this one, however this one ends
        runner.out.summary_json.unlink(missing_ok=True)
        # No times and no path but the config file's in run.json: its hash is one of the report's inputs.
        # The config file's path (the default folder's owner) moves it too, so a run of a config copied
        # or moved elsewhere remakes its report once.
        write_json(
            runner.out.run_json,
            {
                "kind": RUN_KIND,
                "schema_version": SCHEMA_VERSION,
                "config_path": cfg.path,
                "config": cfg.to_dict(),
                "inputs": runner.input_hashes(),
            },
        )
        threads_before = torch.get_num_threads()
        threads = choose_threads(cfg.threads)
        torch.set_num_threads(threads)
        try:
            _run_stages(runner, STAGE_ORDER.index(until))
        except BaseException:
            # a failed stage, Ctrl-C or a bug: a partial summary where one can be made, and the cause
            # propagates whatever happens to it
            with contextlib.suppress(Exception):
                write_json(runner.out.summary_json, _summary(runner, threads, t0, until, built=False))
            raise
        finally:
            torch.set_num_threads(threads_before)
        summary = _summary(runner, threads, t0, until)
        write_json(runner.out.summary_json, summary)
    return summary


def _open_run(
    cfg: RunConfig,
    root: Path,
    *,
    progress: bool | None,
    on_stage: StageCallback | None,
    trains_here: bool,
    shared: bool,
) -> Runner:
    """The runner of ``cfg`` in ``root``, after every check that can fail without writing anything;
    ``shared``: ``root`` is the default folder, which may hold the run of another config of the name."""
    check_out_folder(root, "run folder")
    _check_run_folder(root)
    if shared:
        _check_same_config(root, cfg)
    check_unlocked(root, what="run folder")
    # loads the tasks: may raise
    runner = Runner(cfg, root, progress=progress, on_stage=on_stage, trains_here=trains_here)
    try:
        _ = runner.device_type  # a device this machine lacks fails here, before anything is written
    except LayercardError as e:
        raise LayercardError(f"{cfg.origin('device')}: {e}", exit_code=e.exit_code) from None
    try:
        _ = runner.model_hash  # an unknown model fails here, before the run folder exists
    except LayercardError as e:
        raise LayercardError(f"{cfg.origin('model')}: model: {e}", exit_code=e.exit_code) from None
    _check_window(runner)
    return runner


def _check_window(runner: Runner) -> None:
    """Refuse a trim window past the model's last layer now, not after the card and the training."""
    cfg = runner.cfg
    window = cfg.trim.config.window if cfg.trim.enabled else None
    if window is None:
        return
    try:
        n = runner.n_layers
    except LayercardError as e:
        raise LayercardError(f"{cfg.origin('model')}: model: {e}", exit_code=e.exit_code) from None
    if window[1] >= n:
        raise LayercardError(
            f"{cfg.origin('trim.window')}: trim.window: {window[0]}:{window[1]} lies past the model's "
            f"layers 0..{n - 1}"
        )


def _check_same_config(root: Path, cfg: RunConfig) -> None:
    """Refuse a folder holding the run of another config file: a/config.yaml and b/config.yaml share
    the default folder, and the second would otherwise redo the first's stages or mix with them."""
    try:
        rec = json.loads((root / RUN_FILE).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return
    if not isinstance(rec, dict) or "config_path" not in rec:
        return  # a run recorded before run.json named its config
    other = rec["config_path"]
    if other == cfg.path:
        return

    def said(path: object) -> str:
        return str(path) if path is not None else "a config built in memory"

    if isinstance(other, str) and cfg.path is not None and not Path(other).exists():
        # the project was moved or copied (or that config deleted): no other config's run to keep apart
        say(
            f"note: run folder {root}: holds the run of {other}, which no longer exists; going on with it "
            f"as the run of {cfg.path}",
            enabled=True,
        )
        return
    raise LayercardError(
        f"run folder {root}: holds the run of {said(other)}, not of {said(cfg.path)}; give this config "
        f"a folder of its own with --out, or go on with that run with --out {root} (nothing was written)"
    )


def _is_run(folder: Path) -> bool:
    """Whether ``folder`` holds the run.json of a layercard run."""
    try:
        rec = json.loads((folder / RUN_FILE).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("kind") == RUN_KIND


def _check_run_folder(root: Path) -> None:
    """Refuse a run folder that is not empty and no run's (its files would be replaced by stage folders),
    and one inside another run's folder."""
    for parent in root.resolve().parents:
        if _is_run(parent):
            raise LayercardError(
                f"run folder {root}: lies inside the run folder {parent}; give one outside it"
            )
    # a killed run's half-written run.json is no content: the run sweeps it under the folder's lock
    if root.is_dir() and any(not is_temporary(p.name) for p in root.iterdir()) and not _is_run(root):
        raise LayercardError(
            f"run folder {root}: not empty and holds no {RUN_FILE} of a layercard run; give a new or empty "
            "folder (nothing was written)"
        )


def _run_stages(runner: Runner, last: int) -> None:
    """card → plan → train → trim → eval → report, each skipped when its inputs are unchanged, up to
    ``STAGE_ORDER[last]``."""
    cfg = runner.cfg
    runner.card()
    if last < 1:
        return
    for p in cfg.placements:
        runner.plan(p)
    if last < 2:
        return
    runner.evaluates = last >= STAGE_ORDER.index("eval")  # then training first checks the evaluation's inputs
    for p in cfg.placements:
        runner.train(p)
    if last < 3:
        return
    target = None
    if cfg.trim.enabled:
        target = runner.trim_target()
        runner.trim(target)
    if last < 4:
        return
    if cfg.eval_base:
        runner.evaluate(BASE_EVAL, None)
    for p in cfg.placements:
        runner.evaluate(p.name, runner.out.adapter_dir(p.name))
    if target is not None:
        runner.evaluate(TRIMMED_EVAL, runner.out.trimmed_adapter)
    if last < 5:
        return
    runner.report()


def _summary(runner: Runner, threads: int, t0: float, until: str, built: bool = True) -> dict[str, Any]:
    """What this invocation did (each stage's status) with the headline numbers of every model;
    ``built=False`` for a call that stopped at a failed stage (it built no report)."""
    from layercard.report import collect_results

    cfg, out = runner.cfg, runner.out
    results = collect_results(out.root)
    return {
        "kind": SUMMARY_KIND,
        "schema_version": SCHEMA_VERSION,
        # every path absolute: a script may read them from another folder
        "run_dir": str(out.root.resolve()),
        "config": cfg.path or cfg.source,
        "model": cfg.model,
        "task": {
            "train": runner.train_task.describe()["name"],
            "train_split": runner.train_task.split,
            "eval_split": runner.eval_task.split,
        },
        "stages": [r.to_dict() for r in runner.results],
        "ran": [r.stage for r in runner.results if r.status in ("ran", "resumed")],
        "skipped": [r.stage for r in runner.results if r.status == "skipped"],
        "primary_metric": results["primary_metric"],
        "reference": results["reference"],
        "recommendation": _recommendation(out.root, [p.name for p in cfg.placements]),
        "rows": results["rows"],
        "left_out": results["left_out"],
        "failed": results["failed"],
        # a run stopped early built no report this time (one from an earlier call may be out of date)
        "report": (
            {"html": str(out.report_html.resolve()), "markdown": str(out.report_md.resolve())}
            if until == "report" and built
            else None
        ),
        "until": until,
        "train_steps": runner.train_steps,
        "threads": threads,
        "wall_time_s": round(time.perf_counter() - t0, 3),
    }


def _recommendation(root: Path, names: list[str]) -> dict[str, Any] | None:
    """The recommend placement and its one-sentence comparison, if the run has one."""
    from layercard.plan import Plan

    lay = RunLayout(root)
    for name in names:
        if not lay.plan_json(name).is_file():
            continue
        plan = Plan.load(lay.plan_json(name))
        if plan.config.get("policy") == "recommend":
            return {"placement": name, "sentence": plan.predicted["recommendation"]}
    return None
