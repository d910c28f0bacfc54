"""The stage runner: fingerprints, stage records, skipping and resuming, and each stage (docs/design.md §1).

Each stage folder holds ``stage.json`` with the stage's fingerprint, the sha256 of the stage config and
of its input artifacts (model weights, tokenizer files, task data, card.json, plan.json, adapter files...),
with the dtype and device type the model is loaded at, and, once it finished, the hashes of its outputs. A
stage whose recorded fingerprint matches and whose outputs are as recorded is skipped; one whose
fingerprint changed, or whose outputs were changed or removed since, is recomputed (and everything
downstream of it whose inputs then change). A stage that was stopped part-way has a record marked
``running``, one that stopped on an error ``failed`` with the error; training then continues from its last
checkpoint when nothing it depends on changed. A folder a stage would replace that holds no ``stage.json``
is not the run's, and is never deleted.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from layercard.artifacts import (
    SCHEMA_VERSION,
    check_unlocked,
    content_hash,
    hash_file,
    hash_folder,
    read_json,
    remove_folder,
    remove_stale_temps,
    sha256_json,
    write_json,
)
from layercard.errors import LayercardError, first_line, run_section
from layercard.pipeline.config import PlacementSpec, RunConfig
from layercard.progress import fewer_examples, say
from layercard.report import fmt as _fmt
from layercard.run_layout import RunLayout

__all__ = [
    "STAGE_KIND",
    "STAGE_VERSION",
    "Runner",
    "StageCallback",
    "StageResult",
    "stage_fingerprint",
]

STAGE_KIND = "stage"
# The stages whose settings are the keys of the run config's section of the same name.
_SECTIONS = ("card", "train", "trim", "eval")
# Bumped when a stage's code changes what it writes, so old records stop matching. 2: the practitioners'
# rules start at rank 8 (a plan's comparison), and an adapter's identity leaves its README out. 3: that
# identity also leaves hidden files out and hashes each file's size.
STAGE_VERSION = 3
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StageResult:
    """What one stage did in this invocation: ``ran``, ``resumed``, ``skipped`` (inputs unchanged),
    ``failed`` (an error; ``rows`` holds it) or ``stopped`` (interrupted; it resumes next time)."""

    stage: str
    status: str
    seconds: float
    folder: str
    fingerprint: str
    rows: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The stage as summary.json lists it."""
        return {
            "stage": self.stage,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "folder": self.folder,
            "fingerprint": self.fingerprint,
            "summary": _joined(self.rows),
        }


def _joined(rows: Sequence[tuple[str, str]]) -> dict[str, str]:
    """A stage's rows as a mapping; the values of a label said twice (two notes) are joined a line apart,
    where a plain dict would keep the last alone."""
    out: dict[str, str] = {}
    for label, value in rows:
        out[label] = f"{out[label]}\n{value}" if label in out else value
    return out


# Train settings added after run folders were first fingerprinted, with the default that trains as before.
_TRAIN_ADDED_LATER = {
    "keep_best": False, "early_stopping": 0, "max_grad_norm": None, "early_stopping_min_delta": 0.0,
    "group_by_length": False,
}  # fmt: skip

StageCallback = Callable[[str, str, "StageResult | None"], None]


def stage_fingerprint(
    kind: str, config: Any, inputs: Mapping[str, Any], *, version: int = STAGE_VERSION
) -> str:
    """sha256 of the stage kind, its config and its input artifacts' hashes, under stage ``version``."""
    return sha256_json({"stage": kind, "version": version, "config": config, "inputs": dict(inputs)})


def _other_version(old: Mapping[str, Any], kind: str, config: Any, inputs: Mapping[str, Any]) -> int | None:
    """The stage version of another layercard whose record ``old`` is, where it was made from these same
    settings and inputs (so that version, not the run's config, is why the stage is made again)."""
    recorded = old.get("stage_version")
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        candidates = [recorded] if recorded != STAGE_VERSION else []
    else:  # records written before they named their version
        candidates = list(range(1, STAGE_VERSION))
    fp = old.get("fingerprint")
    return next((v for v in candidates if stage_fingerprint(kind, config, inputs, version=v) == fp), None)


def _output_hash(path: Path) -> str | None:
    if path.is_dir():
        return hash_folder(path)
    return hash_file(path) if path.is_file() else None


def _outputs_intact(old: Mapping[str, Any], outputs: Sequence[Path], root: Path) -> bool:
    """Whether a finished stage's outputs are there and, where its record has their hashes, unchanged."""
    if not all(p.exists() for p in outputs):
        return False
    recorded = old.get("output_hashes")
    if not isinstance(recorded, dict):  # a record of an older layercard: existence is all it says
        return True
    return all(recorded.get(str(p.relative_to(root))) == _output_hash(p) for p in outputs)


def _check_stage_folder(folder: Path, record: Path) -> None:
    """Refuse to delete a folder that holds files but no stage record: they are not this run's."""
    if not record.is_file() and any(folder.iterdir()):
        raise LayercardError(
            f"{folder}: holds files but no {record.name}, so it is not a stage folder of this run; "
            "nothing was deleted: move them away, or give another run folder"
        )


def _read_record(path: Path, stage: str) -> dict[str, Any] | None:
    """The stage record at ``path``, or None where there is none to go by. One a newer layercard wrote is
    refused: its stage would be deleted and made again by older code, losing the newer one's work."""
    try:
        rec = raw = read_json(path, kind=STAGE_KIND)
    except LayercardError:  # none, unreadable, or of another schema version: which one, below
        rec = None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    newer = isinstance(raw, dict) and any(
        isinstance(raw.get(key), int) and raw[key] > ours
        for key, ours in (("schema_version", SCHEMA_VERSION), ("stage_version", STAGE_VERSION))
    )
    if newer:
        raise LayercardError(
            f"stage {stage}: {path} was written by a newer layercard (schema version "
            f"{raw.get('schema_version')}, stage version {raw.get('stage_version', '?')}; this one's "
            f"{SCHEMA_VERSION} and {STAGE_VERSION}); nothing was deleted: run it with that layercard, or "
            "give another run folder"
        )
    return rec


def _write_record(path: Path, **fields: Any) -> None:
    write_json(path, {"kind": STAGE_KIND, "schema_version": SCHEMA_VERSION, **fields})


def _in_section(section: str, call: Callable[..., T]) -> Callable[..., T]:
    """``call`` with the settings its messages name given as keys of the run config's ``section``."""

    def within(*args: Any) -> T:
        with run_section(section):
            return call(*args)

    return within


def _shared_note(shared: int, total: int) -> list[tuple[str, str]]:
    if not shared:
        return []
    return [("note", f"{shared} of the eval task's {total} examples are also training examples")]


def _examples_note(key: str, asked: int | None, have: int) -> list[tuple[str, str]]:
    """A row saying the config asked for more examples than the task has, and how many were used."""
    if asked is None or asked <= have:
        return []
    return [("note", fewer_examples(f"{key}=", asked, have))]


def _layers_text(layers: Sequence[int]) -> str:
    return (
        f"{len(layers)}: {list(layers)}" if len(layers) <= 12 else f"{len(layers)}: {layers[0]}–{layers[-1]}"
    )


class Runner:
    """Runs the stages of one config in one folder over one lazily loaded model."""

    def __init__(
        self,
        cfg: RunConfig,
        root: Path,
        *,
        progress: bool | None,
        on_stage: StageCallback | None,
        trains_here: bool = True,
    ) -> None:
        self.cfg = cfg
        # False where this call stops before training: a later process trains the plans made here
        self.trains_here = trains_here
        self.out = RunLayout(root)
        self.progress = progress
        self.on_stage = on_stage
        self.results: list[StageResult] = []
        self._loaded: Any = None
        self._model_hash: str | None = None
        self._tokenizer_hash: str | None = None
        self._config_hash: str | None = None
        self._device_type: str | None = None
        self._run_positions: tuple[float, int] | None = None
        self._train_data: Any = None
        self._cut_said = False
        # what is read from card.json once for every stage that needs it, keyed by the file's identity
        self._card_memo: dict[str, tuple[tuple[int, int, int], Any]] = {}
        # Whether this call goes on to evaluate: a training then first checks what the evaluation would
        # refuse before generating (gold answers, prompts past the model's context), not hours later.
        self.evaluates = False
        self._eval_checked = False
        self.train_task, self.eval_task = self._tasks()
        self.trim_task, self.trim_note = self._trim_task()

    # ---- inputs ------------------------------------------------------------------------------------
    def _tasks(self) -> tuple[Any, Any]:
        from layercard.tasks import is_file_spec, load_task, validation_task

        t = self.cfg.task
        # any task setting can fail a load (a field map, a prompt, the split): the whole section is asked
        train_from = eval_from = self.cfg.origin("task")
        kw = t.load_kwargs()  # field mapping and prompt settings, the same for every split
        try:
            train_task = load_task(t.train, split=t.train_split, seed=self.cfg.seed, **kw)
        except LayercardError as e:
            raise LayercardError(f"{train_from}: task.train: {e}") from None
        spec = t.eval or t.train
        try:
            # no split named: the held-out one, never the split training reads (a file: says so)
            eval_task = validation_task(
                t.eval, t.eval_split, t.train, train_task.split, seed=self.cfg.seed, **kw
            )
            if eval_task is None and is_file_spec(spec):
                raise LayercardError(
                    f"{spec}: a file has no held-out split; give task.eval (and task.eval_split)"
                )
            if eval_task is None:
                raise LayercardError(f"{spec}: found no validation or test split; give task.eval_split")
        except LayercardError as e:
            raise LayercardError(f"{eval_from}: task.eval: {e}") from None
        if len(train_task) == 0:
            raise LayercardError(f"{train_from}: task.train: no examples")
        if len(eval_task) == 0:
            raise LayercardError(f"{eval_from}: task.eval: no examples")
        # the trim stage selects on eval examples too, so this also keeps training data out of trimming
        shared = eval_task.shared_with(train_task)
        if eval_task.data_hash == train_task.data_hash or shared == len(eval_task):
            raise LayercardError(
                f"{eval_from}: task.eval: {spec} ({eval_task.split}) holds the same examples as task.train "
                f"({train_task.split}): the run would evaluate on its training examples; give another "
                "task.eval_split or task.eval"
            )
        # some shared (a copy that gained or lost rows): the evaluation says how many
        self.eval_shared = shared
        return train_task, eval_task

    def _trim_task(self) -> tuple[Any, str]:
        """Boundary selection on eval-split examples the final evaluation does not score, when there are."""
        n = self.cfg.eval.examples
        want = self.cfg.trim.config.examples if self.cfg.trim.config is not None else None
        split = self.eval_task.split
        if n is not None and len(self.eval_task) > n:
            rest = self.eval_task.subset(None, seed=self.cfg.seed, offset=n)
            used = len(rest) if want is None else min(want, len(rest))
            return rest, f"{used} {split} examples held out from eval"
        # Evaluating the whole split leaves nothing held out: the boundary is then chosen on the
        # examples it is scored on, which flatters the trimmed adapter; the summary says so.
        return self.eval_task, f"the eval examples themselves ({split}: none held out)"

    @property
    def loaded(self) -> Any:
        """The model, loaded on first use (a run whose stages are all skipped never loads it)."""
        if self._loaded is None:
            from layercard.models import load_model, resolve_device

            self._loaded = load_model(
                self.cfg.model,
                dtype=self.cfg.dtype,
                device=str(resolve_device(self.cfg.device)),
                trust_remote_code=self.cfg.trust_remote_code,
            )
            self._model_hash = self._loaded.model_hash
        return self._loaded

    def input_hashes(self) -> dict[str, str | None]:
        """The hashes of the model, its tokenizer and each task the run reads now, with the dtype and
        device type, keyed as the stage records key them: run.json keeps them, so that a summary or
        report takes no artifact made from others."""
        val = self.train_val
        return {
            "model": self.model_hash,
            **self.loading,
            "train_data": self.train_task.data_hash,
            "val_data": val.data_hash if val is not None else None,
            "eval_data": self.eval_task.data_hash,
            "trim_data": self.trim_task.data_hash,
        }

    @property
    def train_val(self) -> Any:
        """The validation task training measures (None when the train config asks for none)."""
        return self.eval_task if self.cfg.train.eval_examples else None

    @property
    def train_data(self) -> Any:
        """The training and validation examples, encoded once for every placement of the run."""
        if self._train_data is None:
            from layercard.train import prepare_data

            with run_section("train"):  # read for the plans too, which price the training's positions
                self._train_data = prepare_data(self.loaded, self.train_task, self.train_val, self.cfg.train)
        return self._train_data

    @property
    def train_steps(self) -> int:
        """The optimizer steps each placement trains, from the config and the training examples alone."""
        from layercard.train import planned_steps

        t = self.cfg.train
        n = len(self.train_task) if not t.train_examples else min(t.train_examples, len(self.train_task))
        return planned_steps(t, n)

    @property
    def run_positions(self) -> tuple[float, int]:
        """(mean padded positions per step, the largest micro-batch's) of this run's training, read once
        from its data order: every placement trains on the same stream."""
        if self._run_positions is None:
            from layercard.train import planned_positions

            self._run_positions = planned_positions(self.train_data, self.cfg.train)
        return self._run_positions

    def _model_folder(self) -> Path | None:
        """The model's folder where it is known without loading the model (a built-in, a local folder)."""
        from layercard import models

        spec = self.cfg.model
        path = Path(spec).expanduser()
        if spec in models.BUILTIN_MODELS:
            return models.builtin_path(spec)
        return path if path.is_dir() else None

    @property
    def model_hash(self) -> str:
        """The weights' hash without loading the model where the weights are a local folder."""
        if self._model_hash is None:
            from layercard import models

            folder = self._model_folder()
            if folder is not None and any(folder.glob("*.safetensors")):
                # the same memoised hash load_model records (sha256 of the safetensors files)
                self._model_hash = models._folder_hash(folder)
            else:
                self._model_hash = self.loaded.model_hash
        return self._model_hash

    @property
    def tokenizer_hash(self) -> str:
        """The hash of the tokenizer and chat-template files the model loads with
        (:func:`layercard.models.tokenizer_folder_hash`): they change the text every stage reads."""
        if self._tokenizer_hash is None:
            from layercard.models import tokenizer_folder_hash

            self._tokenizer_hash = tokenizer_folder_hash(self._files_folder())
        return self._tokenizer_hash

    @property
    def config_hash(self) -> str:
        """The hash of the model folder's config.json (:func:`layercard.models.config_folder_hash`): the
        same weights compute otherwise under other settings."""
        if self._config_hash is None:
            from layercard.models import config_folder_hash

            self._config_hash = config_folder_hash(self._files_folder())
        return self._config_hash

    def _files_folder(self) -> Path:
        """The folder the model's tokenizer and config files are read from: the local model folder, else
        the one the loaded model came from."""
        return self._model_folder() or Path(self.loaded.source)

    @property
    def n_layers(self) -> int:
        """The model's decoder layers: from its config where the model is a local folder, without loading
        the weights; else from the loaded model."""
        from layercard.models import config_num_layers, num_layers

        folder = self._model_folder()
        if self._loaded is None and folder is not None:
            n = config_num_layers(folder, trust_remote_code=self.cfg.trust_remote_code)
            if n is not None:
                return n
        return num_layers(self.loaded.model)

    @property
    def device_type(self) -> str:
        """The type of the device the model runs on (cpu, cuda, mps): ``device: auto`` resolved."""
        if self._device_type is None:
            from layercard.models import resolve_device

            self._device_type = resolve_device(self.cfg.device).type
        return self._device_type

    @property
    def loading(self) -> dict[str, str]:
        """What every stage that runs the model reads besides its weights: the tokenizer's files, and the
        dtype and device type it runs at (numbers, timings and memory all depend on them)."""
        return {
            "tokenizer": self.tokenizer_hash,
            "config": self.config_hash,
            "dtype": self.cfg.dtype,
            "device": self.device_type,
        }

    # ---- the stage mechanism ----------------------------------------------------------------------
    def stage(
        self,
        name: str,
        kind: str,
        folder: Path,
        config: Any,
        inputs: Mapping[str, Any],
        outputs: Sequence[Path],
        fn: Callable[[bool], None],
        summarize: Callable[[], list[tuple[str, str]]],
        *,
        record: Path | None = None,
        owns_folder: bool = True,
    ) -> StageResult:
        """Run ``fn(resume)`` unless the recorded fingerprint matches and every output is as recorded."""
        if kind in _SECTIONS:  # what the stage says names its settings as the config's keys, not as flags
            fn, summarize = _in_section(kind, fn), _in_section(kind, summarize)
        record = record or RunLayout.stage_record(folder)
        where = str(folder.resolve())  # the summary's paths are absolute, whatever the run folder given
        fp = stage_fingerprint(kind, config, inputs)
        old = _read_record(record, name)
        done = old is not None and old.get("fingerprint") == fp and old.get("status") == "done"
        if done and _outputs_intact(old, outputs, self.out.root):
            result = StageResult(name, "skipped", 0.0, where, fp, summarize())
            self._emit("end", name, result)
            return result
        if old is not None and old.get("fingerprint") != fp:
            version = _other_version(old, kind, config, inputs)
            if version is not None:
                say(
                    f"note: stage {name}: made again: it was made by a layercard of stage version {version}, "
                    f"whose outputs differ from this one's ({STAGE_VERSION})",
                    enabled=True,
                )
        unfinished = old is not None and old.get("status") in ("running", "failed")
        resume = unfinished and old.get("fingerprint") == fp
        if owns_folder:
            # before anything is deleted or recorded: a command of its own (train --resume) may write it
            check_unlocked(folder, what="stage folder")
            remove_stale_temps(folder.parent)  # a delete of an earlier call that was cut (remove_folder)
            remove_stale_temps(folder)  # a killed call's half-written record, before the folder is judged
        if owns_folder and folder.exists() and not resume:
            _check_stage_folder(folder, record)
            remove_folder(folder)  # outputs of other settings: nothing in them may leak into this run
        folder.mkdir(parents=True, exist_ok=True)
        self._emit("start", name, None)
        t0 = time.perf_counter()
        base = {
            "stage": name, "stage_version": STAGE_VERSION, "fingerprint": fp, "config": config,
            "inputs": dict(inputs),
        }  # fmt: skip
        _write_record(record, status="running", **base)
        try:
            fn(resume)
        except Exception as e:  # failed, and why, here and in its record; a bug or out of memory too
            known = isinstance(e, LayercardError)
            error = str(e) if known else first_line(e)
            _write_record(record, status="failed", error=error, **base)
            self.results.append(
                StageResult(name, "failed", time.perf_counter() - t0, where, fp, [("error", error)])
            )
            if known:  # said in one line, naming the stage; anything else keeps its traceback for --debug
                raise LayercardError(f"stage {name}: {e}", exit_code=e.exit_code) from e
            raise
        except BaseException:  # interrupted: the record stays `running`, so the next call resumes it
            self.results.append(StageResult(name, "stopped", time.perf_counter() - t0, where, fp))
            raise
        seconds = time.perf_counter() - t0
        rel = [str(p.relative_to(self.out.root)) for p in outputs]
        hashes = {r: _output_hash(p) for r, p in zip(rel, outputs, strict=True)}
        _write_record(
            record, status="done", outputs=rel, output_hashes=hashes, wall_time_s=round(seconds, 3), **base
        )
        result = StageResult(name, "resumed" if resume else "ran", seconds, where, fp, summarize())
        self._emit("end", name, result)
        return result

    def _emit(self, event: str, name: str, result: StageResult | None) -> None:
        if result is not None:
            self.results.append(result)
        if self.on_stage is not None:
            self.on_stage(event, name, result)

    # ---- card ---------------------------------------------------------------------------------------
    def _of_card_file(self, what: str, read: Callable[[Path], Any]) -> Any:
        """``read(card.json)``, once per card file for every stage that needs it (every plan, the card's
        summary): a large model's card takes a noticeable time to read and to hash. Keyed by the file's
        identity, so a card made again is read again."""
        path = self.out.card_json
        try:
            st = path.stat()
        except OSError:
            return read(path)  # no card: the reader says so, as it would have
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        got = self._card_memo.get(what)
        if got is None or got[0] != key:
            got = self._card_memo[what] = (key, read(path))
        return got[1]

    def read_card(self) -> Any:
        """The run's card.json as a Card, read once per card file."""
        from layercard.card import Card

        return self._of_card_file("card", Card.load)

    def card(self) -> None:
        """The Layer Card of the model on the training task."""
        out = self.out
        config = dataclasses.asdict(self.cfg.card)

        def fn(_resume: bool) -> None:
            from layercard.card import compute_card, write_card_folder

            card = compute_card(self.loaded, self.train_task, self.cfg.card, progress=self.progress)
            write_card_folder(card, out.card_dir)  # card.json last: its presence means the stage finished

        def summarize() -> list[tuple[str, str]]:
            from layercard.card.summary import top_layers

            card = self.read_card()
            rows = [
                ("model", f"{card.model['id']} ({card.n_layers} layers)"),
                ("probe", f"{card.task['n_examples']} examples, {card.n_target_tokens} target tokens"),
                ("probe loss", _fmt(card.loss)),
                (f"top-5 layers by {card.default_score}", str(top_layers(card, card.default_score))),
                ("coupling", "measured" if card.coupling else "not measured"),
                ("cost model", "calibrated" if card.cost else "not calibrated"),
            ]
            rows += _examples_note("card.examples", self.cfg.card.examples, len(self.train_task))
            from layercard.card.summary import timings_text

            return rows + [("time", timings_text(card.timings))]

        inputs = {"model": self.model_hash, **self.loading, "data": self.train_task.data_hash}
        self.stage("card", "card", out.card_dir, config, inputs, [out.card_json], fn, summarize)

    # ---- plan ---------------------------------------------------------------------------------------
    def plan(self, p: PlacementSpec) -> None:
        """The plan of placement ``p`` from the card."""
        from layercard.plan import Plan

        out = self.out
        path = out.plan_json(p.name)
        # priced at the batch the placement will train at, unless the plan names one
        batch = p.plan.batch_size if p.plan.batch_size is not None else self.cfg.train.batch_size
        # memory_figure auto is resolved when the plan is made, for the process that will train it (this
        # one, or a later one when this call stops before training); a cached plan keeps the figure it was
        # made with, so that a run resumed in a new process does not plan and train again
        accum = p.plan.grad_accum if p.plan.grad_accum is not None else self.cfg.train.grad_accum
        plan_cfg = dataclasses.replace(p.plan, batch_size=batch, grad_accum=accum)
        # ... and at the positions its training will compute, from its data order, unless the plan names
        # them: a run's largest micro-batch sets its peak (design §6, "a budget holds")
        at_run = p.plan.step_positions is None and p.plan.peak_positions is None

        def fn(_resume: bool) -> None:
            from layercard.plan import make_plan

            card = self.read_card()
            made = plan_cfg
            if made.memory_figure == "auto" and not self.trains_here:
                from layercard.cost import figure_elsewhere

                # auto means the figure of the process that trains, and that is a later one
                made = dataclasses.replace(made, memory_figure=figure_elsewhere(card.cost))
            if at_run and (card.cost or {}).get("batch_positions"):
                step, peak = self.run_positions
                made = dataclasses.replace(made, step_positions=step, peak_positions=float(peak))
            make_plan(card, made, card_path=str(out.card_json.resolve())).save(path)

        def summarize() -> list[tuple[str, str]]:
            from layercard.plan.frontier import row_label
            from layercard.plan.predict import positions_text
            from layercard.plan.space import budget_label
            from layercard.report import seconds_text

            plan = Plan.load(path)
            pr = plan.predicted
            frac = pr.get("fraction")
            rows = [
                (
                    "policy",
                    f"{plan.config['policy']}"
                    + (f" ({budget_label(plan.config['budget'])})" if plan.config["budget"] else ""),
                ),
                ("layers", _layers_text(plan.layers)),
                ("adapted modules", str(pr.get("modules"))),
                ("trainable params", f"{pr.get('params', 0):,}"),
            ]
            if "candidate" in pr:  # a search plan: the quality model's fraction, not a card-score gain
                c, q = pr["candidate"], pr["quality"]
                err = q.get("expected_error")
                rows += [
                    ("matrices · layers · rank", row_label(c)),
                    (
                        "predicted quality",
                        f"{q['fraction']:.3f}"
                        + ("" if err is None else f" ± {err:.3f}")
                        + " of the reference",
                    ),
                ]
            else:
                rows += [
                    (f"predicted gain ({pr.get('score')})", _fmt(pr.get("gain"))),
                    ("of all-layer gain", "—" if frac is None else f"{100 * frac:.1f}%"),
                ]
            if where := positions_text(plan.config):
                rows.append(("priced at", f"{where} (this run's)"))
            rows.append(("predicted s/step", _fmt(pr.get("step_time_s"), ".3g")))
            if where and pr.get("step_time_s"):
                steps = self.train_steps
                rows.append(
                    (
                        f"predicted time of the {steps:,} optimizer steps",
                        seconds_text(steps * pr["step_time_s"]),
                    )
                )
            if pr.get("memory"):
                from layercard.cost import peak_text

                rows.append(("predicted peak memory", peak_text(pr["memory"], pr.get("memory_figure"))))
            if pr.get("recommendation") and plan.config.get("policy") == "recommend":
                rows.append(("recommendation", pr["recommendation"]))
            return rows + [("warning", w) for w in plan.warnings]

        config = {
            **p.to_dict(),
            "seed": p.plan.seed,
            "batch_size": plan_cfg.batch_size,
            "grad_accum": plan_cfg.grad_accum,
        }
        inputs = {"card": self._of_card_file("content_hash", content_hash)}
        if at_run:  # what the training's positions follow
            t = self.cfg.train
            keys = ("batch_size", "grad_accum", "steps", "epochs", "max_length", "train_examples", "seed")
            config["train_positions"] = {k: getattr(t, k) for k in keys}
            inputs["train_data"] = self.train_task.data_hash
        # a plan's messages and sentences name its settings as the keys of its entry in the run config
        fn = _in_section(f"placements[{p.name}]", fn)
        self.stage(f"plan:{p.name}", "plan", out.plan_dir(p.name), config, inputs, [path], fn, summarize)

    # ---- train --------------------------------------------------------------------------------------
    def train(self, p: PlacementSpec) -> None:
        """Train the adapters of placement ``p``'s plan (resuming from a checkpoint when it can)."""
        out = self.out
        folder = out.train_dir(p.name)
        val = self.train_val

        def fn(resume: bool) -> None:
            from layercard.plan import Plan
            from layercard.train import METRICS_FILE, latest_checkpoint, train

            plan = Plan.load(out.plan_json(p.name))
            if self.evaluates and not self._eval_checked:
                from layercard.evaluate import check_evaluable

                try:
                    _in_section("eval", check_evaluable)(self.loaded, self.eval_task, self.cfg.eval)
                except LayercardError as e:
                    raise LayercardError(
                        f"eval (checked before training): {e}", exit_code=e.exit_code
                    ) from None
                self._eval_checked = True
            resume = resume and latest_checkpoint(folder) is not None
            # the metrics of a session cut after writing them: this stage's run is not done until recorded,
            # and it goes on from its checkpoint (or from the start) to the same figures
            (folder / METRICS_FILE).unlink(missing_ok=True)
            train(
                self.loaded,
                plan,
                self.train_task,
                val,
                self.cfg.train,
                folder,
                resume=resume,
                progress=self.progress,
                data=self.train_data,
                say_cut=not self._cut_said,  # every placement trains on the same examples
            )
            self._cut_said = True

        def summarize() -> list[tuple[str, str]]:
            from layercard.cost import memory_kind_text
            from layercard.report import (
                measured_step_text,
                memory_figure_note,
                predicted_peak_mib,
                predicted_s_per_step,
                read_train_metrics,
            )

            m = read_train_metrics(out.train_metrics(p.name))
            rows = [
                ("steps", f"{m.steps} ({m.epochs:.2f} epochs)"),
                ("trainable params", f"{m.trainable_params:,}"),
                (
                    "s/step measured (10th–90th percentile) / predicted at these tokens/step",
                    f"{measured_step_text(m.s_per_step, m.s_per_step_spread)} / "
                    f"{_fmt(predicted_s_per_step(m), '.3f')}",
                ),
                ("train loss first → last", f"{_fmt(m.first_train_loss)} → {_fmt(m.final_train_loss)}"),
                ("final val loss", _fmt(m.final_val_loss)),
                *([("adapter weights", kept)] if (kept := m.kept_text()) else []),
                *([("gradients clipped", clipped)] if (clipped := m.clipped_text()) else []),
                (
                    f"peak memory ({memory_kind_text(m.peak_memory_kind)}) measured / predicted",
                    f"{m.peak_memory_mib:,.0f} / {_fmt(predicted_peak_mib(m), ',.0f')} MiB"
                    + memory_figure_note(m.predicted_memory_figure),
                ),
            ]
            if m.resumed_from is not None:
                rows.append(("resumed from step", str(m.resumed_from)))
            asked = self.cfg.train.train_examples
            rows += _examples_note("train.train_examples", asked, len(self.train_task))
            if val is not None:
                rows += _examples_note("train.eval_examples", self.cfg.train.eval_examples, len(val))
            return rows + [("warning", line) for line in [*(m.budget_notes or []), *(m.price_notes or [])]]

        inputs = {
            "plan": content_hash(out.plan_json(p.name)),
            "model": self.model_hash,
            **self.loading,
            "train_data": self.train_task.data_hash,
            "val_data": val.data_hash if val is not None else None,
        }
        outputs = [out.adapter_dir(p.name), out.train_metrics(p.name)]
        # How often checkpoints are written changes no weight or figure of a finished run: not a reason to
        # train it again. Nor is a setting added since, left at the default that means what runs did before.
        config = {
            k: v
            for k, v in self.cfg.train.to_dict().items()
            if k != "checkpoint_every" and not (k in _TRAIN_ADDED_LATER and v == _TRAIN_ADDED_LATER[k])
        }
        self.stage(f"train:{p.name}", "train", folder, config, inputs, outputs, fn, summarize)

    # ---- trim ---------------------------------------------------------------------------------------
    def trim_target(self) -> str:
        """The placement to trim: the configured one, else the one whose plan adapts the most layers."""
        if self.cfg.trim.placement is not None:
            return self.cfg.trim.placement
        from layercard.plan import Plan

        sizes = [
            (len(Plan.load(self.out.plan_json(p.name)).layers), -i, p.name)
            for i, p in enumerate(self.cfg.placements)
        ]
        return max(sizes)[2]

    def trim(self, target: str) -> None:
        """Find the boundary layer of placement ``target``'s adapter and export the trimmed adapter."""
        out = self.out
        spec = self.cfg.trim

        def fn(_resume: bool) -> None:
            from layercard.trim import trim

            trim(
                self.loaded,
                out.adapter_dir(target),
                self.trim_task,
                spec.config,
                out.trim_dir,
                progress=self.progress,
            )

        def summarize() -> list[tuple[str, str]]:
            from layercard.report.results import read_trim
            from layercard.trim import capped_text, latency_text

            t = read_trim(out.trim_json)
            b, a = t["before"], t["after"]
            metric = t["metric"]

            def val(row: dict[str, Any]) -> Any:
                return row.get("loss") if metric == "loss" else row["metrics"].get(metric)

            by_loss = ""
            if t.get("chosen_by") == "loss":  # the metric tied at every K
                by_loss = f", by the held-out loss: every K scored the same {metric}"
            cands = ", ".join(f"{k}={v}" for k, v in (t.get("candidates") or {}).items())
            rows = [
                ("placement", target),
                ("selected on", self.trim_note),
                ("candidates", cands or "—"),
                ("boundaries swept", str(t["ks"])),
                ("chosen K", f"{t['chosen_k']} (adapters kept in layers ≤ K){by_loss}"),
                (f"{metric} before → after", f"{_fmt(val(b))} → {_fmt(val(a))}"),
                *([("loss before → after", f"{_fmt(b['loss'])} → {_fmt(a['loss'])}")] if by_loss else []),
                ("adapted layers before → after", f"{b['n_adapted_layers']} → {a['n_adapted_layers']}"),
                ("adapted modules before → after", f"{b['adapted_modules']} → {a['adapted_modules']}"),
                ("latency before → after", latency_text(b, a)),
            ]
            if t.get("after_matches_sweep") is False:
                said = "the trimmed adapter did not measure what the sweep measured at the chosen K"
                rows.append(("warning", said))
            capped = capped_text(t["sweep"], int(t["task"]["n_examples"]), t.get("max_new_tokens"))
            return rows + ([("note", capped)] if capped else [])

        # rule 2: a metric that ties at every K leaves K to the loss; a trim made under rule 1 is made again
        config = {**spec.to_dict(), "placement": target, "seed": self.cfg.seed, "boundary_rule": 2}
        inputs = {
            "adapter": hash_folder(out.adapter_dir(target)),
            "model": self.model_hash,
            **self.loading,
            "data": self.trim_task.data_hash,
        }
        outputs = [out.trim_json, out.trimmed_adapter]
        self.stage("trim", "trim", out.trim_dir, config, inputs, outputs, fn, summarize)

    # ---- eval ---------------------------------------------------------------------------------------
    def evaluate(self, name: str, adapter: Path | None) -> None:
        """Evaluate the base model (``adapter`` None) or an adapter into ``eval/<name>/``."""
        from layercard.evaluate import EvalResult

        out = self.out
        folder = out.eval_dir(name)

        def fn(_resume: bool) -> None:
            from layercard.evaluate import evaluate

            res = evaluate(
                self.loaded, self.eval_task, self.cfg.eval, adapter=adapter, progress=self.progress
            )
            res.save(folder)

        def summarize() -> list[tuple[str, str]]:
            r = EvalResult.load(out.eval_json(name))
            rows = [
                (m + (" (primary)" if i == 0 else ""), _fmt(v)) for i, (m, v) in enumerate(r.metrics.items())
            ]
            return rows + [
                ("loss", _fmt(r.loss)),
                ("examples", str(r.n)),
                ("s/example", _fmt(r.timing.get("s_per_example"), ".3f")),
                *_examples_note("eval.examples", self.cfg.eval.examples, len(self.eval_task)),
                *_shared_note(self.eval_shared, len(self.eval_task)),
                *[
                    ("note", line.removeprefix("note: "))
                    for said in (r.cut_note(), r.tool_call_note())
                    for line in (said or "").splitlines()
                ],
            ]

        inputs = {
            "model": self.model_hash,
            **self.loading,
            "data": self.eval_task.data_hash,
            "adapter": hash_folder(adapter) if adapter is not None else None,
        }
        outputs = [out.eval_json(name)]
        self.stage(f"eval:{name}", "eval", folder, self.cfg.eval.to_dict(), inputs, outputs, fn, summarize)

    # ---- report -------------------------------------------------------------------------------------
    def report(self) -> None:
        """report.html and report.md from the run folder's artifacts."""
        from layercard import report

        out = self.out
        html, md = out.report_html, out.report_md

        def fn(_resume: bool) -> None:
            report.build_report(out.root)

        def summarize() -> list[tuple[str, str]]:
            return [("html", str(html.resolve())), ("markdown", str(md.resolve()))]

        inputs = {str(p.relative_to(out.root)): hash_file(p) for p in report.report_inputs(out.root)}
        # the report names its run folder: a run copied or moved elsewhere makes it again
        config = {"report_version": report.REPORT_VERSION, "run_folder": str(out.root.resolve())}
        outputs = [html, md, out.root / report.FIGURES_DIR]  # a report whose images are gone is made again
        self.stage(
            "report",
            "report",
            out.root,
            config,
            inputs,
            outputs,
            fn,
            summarize,
            record=out.report_record,
            owns_folder=False,
        )
