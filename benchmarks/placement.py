"""Placement benchmark: does card-guided placement beat fixed rules at the same budget, on real data?

The claim under test: at the same layer budget, card-guided LoRA placement beats fixed rules and
comes close to all-layer LoRA at a fraction of its cost. Model smollm2; tasks e2e_nlg (train on
validation, evaluate on test), sst2 (train → validation), gsm8k (train → test, subsets) and samsum
(train on validation, evaluate on test), all from ../shared/data.

Phases, each a sub-command (``all`` runs them in order, skipping whatever is cached)::

    cards     one Layer Card per task on its training split (64 examples, coupling and cost calibration)
    single    single-layer LoRA runs at 8 layers per task: measured test-loss drop vs the base model
    select    e2e_nlg and sst2 only: Spearman of every predicted-gain score with those drops; the best
              mean is frozen in RESULTS/placement_default_score.json (never overwritten without --refreeze)
    confirm   the frozen score's Spearman on gsm8k and samsum, unchanged (every score's too, for transparency)
    policies  the budget × policy grid (card policies use the frozen score), then the 3-seed repeats
    trim      trim the all-30 run of each task (layercard.trim.trim) and evaluate the trimmed adapter
    report    JSON + markdown tables + PNG plots under RESULTS (works on partial results, listing the gaps)

Every train+eval run is cached as ROOT/runs/<sha256 of its full config>/result.json, written last and
atomically: a crashed run leaves no result.json and is redone from scratch. Finished runs are also copied
to the committed ledger RESULTS/placement_runs/<sha256>.json (cards to RESULTS/placement_cards/), so a
fresh checkout resumes where the last sitting stopped. The config is what is trained
and evaluated (model and data hashes, layers, LoRA config, training and evaluation settings), so two
policies that pick the same layers share one run, and a changed card only re-runs placements that moved.

    .venv/bin/python benchmarks/placement.py --estimate                 # planned runs and hours
    .venv/bin/python benchmarks/placement.py all                        # everything (about 3 h on 2 cores)
    .venv/bin/python benchmarks/placement.py policies --tasks e2e_nlg --only card,uniform --limit-runs 5
    .venv/bin/python benchmarks/placement.py --dry-run-tiny all         # whole control flow, ~1-2 min

``--dry-run-tiny`` builds a tiny random 30-layer Llama folder and uses synthetic tasks with 2 training
steps; it writes under runs/placement-dry/ (results included) and never touches benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import math
import os
import re
import shutil
import statistics
import string
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
ROOT = REPO / "runs" / "placement"
DRY_ROOT = REPO / "runs" / "placement-dry"
GPU_ROOT = REPO / "runs" / "placement-gpu"
BENCH = "placement/1"
PHASES = ("cards", "single", "select", "confirm", "policies", "trim", "report", "all")
FULL_POLICIES = (
    "card",
    "card-additive",
    "card-stratified",
    "gradnorm",
    "top",
    "bottom",
    "middle",
    "uniform",
    "random",
)
SMALL_POLICIES = ("card", "card-stratified", "gradnorm", "top", "middle", "uniform")
CARD_POLICIES = ("card", "card-additive", "card-stratified")
FROZEN_FILE = "placement_default_score.json"
MEASURED_FILE = "placement_measured_on.json"
CONFIRM_FILE = "placement_confirm.json"


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSetting:
    """One task: where its data comes from and the per-task lengths and evaluation sizes."""

    name: str
    train_spec: str
    train_split: str
    test_spec: str
    test_split: str
    grid: str  # "full" (budgets 4 and 8, every policy, seed repeats) or "small" (budget 8, 7 policies)
    batch_size: int
    max_length: int
    loss_examples: int  # test examples scored by teacher-forced loss
    gen_examples: int  # test examples scored by greedy generation with the task metric (a subset of those)
    max_new_tokens: int
    max_input_tokens: int | None = None  # caps the prompt (training and generation) below the preset's
    trim_examples: int = 24  # held-out test examples for the boundary sweep, disjoint from the above
    data_seed: int = 0  # synthetic tasks only
    why: str = ""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers; the same rank, lr, steps, tokens and seed for every policy."""

    model: str
    tasks: tuple[TaskSetting, ...]
    roles: str = "q,v"
    rank: int = 8
    alpha: float = 16.0
    lr: float = 2e-3
    steps: int = 36
    train_examples: int = 1000  # seeded subset of the training split the stream cycles through
    seed: int = 0
    eval_seed: int = 0
    eval_batch_size: int = 16
    card_examples: int = 64
    card_batch_size: int = 8
    coupling_examples: int = 8
    n_layers: int = 30
    single_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 29)
    budgets: tuple[int, ...] = (4, 8)  # "full" tasks
    small_budget: int = 8  # "small" tasks
    random_seeds: tuple[int, ...] = (0, 1, 2)
    repeat_seeds: tuple[int, ...] = (1, 2)
    repeat_policies: tuple[str, ...] = ("card", "card-stratified", "uniform", "all")
    repeat_budget: int = 8
    select_tasks: tuple[str, ...] = ("e2e_nlg", "sst2")
    confirm_tasks: tuple[str, ...] = ("gsm8k", "samsum")
    deltas: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    trim_radius: int = 2
    dry_run: bool = False
    profile: str = "cpu"  # "cpu" (the 2-core grid) or "gpu" (more steps and examples, one GPU)

    def task(self, name: str) -> TaskSetting:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SystemExit(f"unknown task {name!r}; valid: {', '.join(t.name for t in self.tasks)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def real_settings() -> Settings:
    """The benchmark's settings: sized so the whole grid fits about three hours on 2 CPU cores."""
    return Settings(
        model="smollm2",
        tasks=(
            TaskSetting(
                "e2e_nlg",
                "e2e_nlg",
                "validation",
                "e2e_nlg",
                "test",
                "full",
                batch_size=4,
                max_length=128,
                loss_examples=64,
                gen_examples=32,
                max_new_tokens=64,
                why="128 tokens keep 91% of prompts whole (median 110 tokens with target); 64 new tokens "
                "cover the 95th-percentile target (44)",
            ),
            TaskSetting(
                "sst2",
                "sst2",
                "train",
                "sst2",
                "validation",
                "full",
                batch_size=4,
                max_length=96,
                loss_examples=96,
                gen_examples=96,
                max_new_tokens=4,
                why="96 tokens cut 1% of prompts; the target is 2 tokens, so the loss sees only 192 target "
                "tokens on 96 examples; accuracy (2-token generation) is scored on the same 96",
            ),
            TaskSetting(
                "gsm8k",
                "gsm8k",
                "train",
                "gsm8k",
                "test",
                "small",
                batch_size=2,
                max_length=256,
                loss_examples=48,
                gen_examples=16,
                max_new_tokens=160,
                trim_examples=16,
                why="256 tokens (median 225) cut the end of 35% of the reasoning targets; batch 2 keeps a "
                "step near e2e_nlg's cost; a 135M model solves almost none, so the test loss is the "
                "measure and accuracy on 16 problems (160 new tokens) only a sanity check",
            ),
            TaskSetting(
                "samsum",
                "samsum",
                "validation",
                "samsum",
                "test",
                "small",
                batch_size=2,
                max_length=192,
                loss_examples=64,
                gen_examples=32,
                max_new_tokens=64,
                max_input_tokens=160,
                why="prompts capped at 160 tokens (the dialogue's start is cut in 28% of examples; median "
                "prompt 162 uncapped) and 192 in all; 64 new tokens cover the 95th-percentile target (56)",
            ),
        ),
    )


def gpu_settings() -> Settings:
    """--profile gpu: the same grid and lengths with 120 steps (3.3×), bigger batches, 4-8× the test
    examples and a 4× larger card; sized for about 20 minutes of one H100 with the tasks in parallel."""
    more = {
        "e2e_nlg": dict(batch_size=8, loss_examples=512, gen_examples=128, trim_examples=64),
        "sst2": dict(batch_size=8, loss_examples=512, gen_examples=512, trim_examples=64),
        "gsm8k": dict(batch_size=4, loss_examples=256, gen_examples=64, trim_examples=32),
        "samsum": dict(batch_size=4, loss_examples=256, gen_examples=128, trim_examples=64),
    }

    def scaled(t: TaskSetting) -> TaskSetting:
        m = more[t.name]
        return dataclasses.replace(
            t,
            **m,
            why=f"lengths as the CPU profile's (benchmarks/results/placement.md); batch {m['batch_size']}; "
            f"test loss on {m['loss_examples']} examples, the task metric by generation on "
            f"{m['gen_examples']} of them, the boundary sweep on {m['trim_examples']} others",
        )

    cpu = real_settings()
    return dataclasses.replace(
        cpu,
        tasks=tuple(scaled(t) for t in cpu.tasks),
        lr=1e-3,
        steps=120,
        train_examples=4000,
        eval_batch_size=64,
        card_examples=256,
        card_batch_size=16,
        coupling_examples=16,
        profile="gpu",
    )


def tiny_settings() -> Settings:
    """--dry-run-tiny: a tiny random Llama with the real layer count, synthetic data, 2 steps."""
    tiny = dict(
        batch_size=2, max_length=160, loss_examples=8, gen_examples=4, max_new_tokens=8, trim_examples=4
    )
    return Settings(
        model="tiny-llama-30",
        tasks=(
            TaskSetting("e2e_nlg", "synthetic:format", "train", "synthetic:format", "test", "full", **tiny),
            TaskSetting("sst2", "synthetic:facts", "train", "synthetic:facts", "test", "full", **tiny),
            TaskSetting(
                "gsm8k", "synthetic:facts", "train", "synthetic:facts", "test", "small", data_seed=1, **tiny
            ),
            TaskSetting(
                "samsum",
                "synthetic:format",
                "train",
                "synthetic:format",
                "test",
                "small",
                max_input_tokens=120,
                data_seed=1,
                **tiny,
            ),
        ),
        steps=2,
        train_examples=16,
        eval_batch_size=8,
        card_examples=8,
        card_batch_size=4,
        coupling_examples=2,
        dry_run=True,
    )


def why(s: Settings) -> list[str]:
    """The reasons for the shared settings, in words (the per-task ones are in ``TaskSetting.why``)."""
    lora = f"LoRA r={s.rank}, α={s.alpha:g} on {s.roles} (the card's roles), AdamW lr {s.lr:g} constant, "
    if s.profile == "gpu":
        head = [
            lora + "no warm-up: the pilot's lr (DESIGN §3a, batch 8); batches are 8 (e2e_nlg, sst2) and 4 "
            "(gsm8k, samsum), twice the CPU profile's.",
            f"{s.steps} steps for every run (policies and single layers alike), 3.3× the CPU profile's, with "
            "4-8× its test examples and a 4× larger card. The default score is the one the CPU profile "
            "froze (selected on its e2e_nlg and sst2 single-layer runs), reported unchanged on all four "
            "tasks here. Each task ran in its own process, the four sharing the GPU, so s/step compares "
            "policies within a task only.",
        ]
    else:
        head = [
            lora + "no warm-up: the pilot (DESIGN §3a) used lr 1e-3 at batch 8 for 60 steps; the lr is "
            "doubled because these runs are shorter and their batches smaller.",
            f"{s.steps} steps for every run (policies and single layers alike): what fits the grid (about "
            "110 runs) into about three hours on 2 cores (see the estimate). Short runs favour scores built "
            "on the first optimizer step (rate, saturating); keep that in mind when reading the Spearman "
            "table.",
        ]
    return [
        *head,
        f"The same training seed ({s.seed}) for every policy; data order, the training subset and LoRA A "
        f"init come from it. {', '.join(s.repeat_policies)} are repeated with seeds "
        f"{', '.join(map(str, s.repeat_seeds))} on the seed-repeat tasks at budget {s.repeat_budget}; "
        f"random is drawn with placement seeds {', '.join(map(str, s.random_seeds))} "
        f"(training seed {s.seed}).",
        "Evaluation on fixed seeded test subsets, the same for every run of a task: teacher-forced loss (the "
        "primary measure: lower variance than generation metrics at these sizes) and greedy generation on a "
        "nested subset for the task metric. Single-layer runs are loss-only.",
        f"Cards: {s.card_examples} training examples at the run's max_length, coupling on (first-step "
        f"directions, {s.coupling_examples} examples), cost model calibrated, lr/rank/α/horizon equal to the "
        "runs' so the first-step rate and the saturating score describe these runs.",
        "Peak memory on CPU: the peak rise of resident memory during training over its level at the start, "
        "sampled every 5 ms with glibc's mmap threshold fixed at 1 MiB so freed tensors leave RSS (the "
        "process-wide ru_maxrss never falls, so it cannot tell runs in one process apart). On CUDA: "
        "max_memory_allocated.",
    ]


# ---------------------------------------------------------------------------------------------------------
# Score variants (DESIGN §3a): what `select` compares
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """A predicted-gain score of the card with its settings (damping δ for the capacity family)."""

    name: str
    score: str
    delta: float | None = None

    def layer_scores(self, card: Any) -> np.ndarray:
        return np.asarray(card.layer_scores(self.score, delta=self.delta), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _delta_text(d: float) -> str:
    e = math.log10(d)
    return f"1e{int(round(e))}" if abs(e - round(e)) < 1e-9 else f"{d:g}"


def variants(settings: Settings) -> list[Variant]:
    """capacity at every δ, then the other scores at the card's own settings."""
    out = [Variant(f"capacity@δ={_delta_text(d)}", "capacity", d) for d in settings.deltas]
    out += [Variant(s, s) for s in ("capacity_energy", "gradnorm", "gradnorm_energy", "rate", "rate_linear")]
    out.append(Variant("saturating", "saturating"))
    return out


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    from layercard.card.stats import spearman

    if len(a) < 3 or np.ptp(np.asarray(a, dtype=float)) == 0 or np.ptp(np.asarray(b, dtype=float)) == 0:
        return None  # undefined for constant input
    r = spearman(list(a), list(b))
    return None if not math.isfinite(r) else r


# ---------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One placement to train and evaluate; several jobs may resolve to the same run (same layers)."""

    task: str
    group: str  # "single", "grid" or "repeat"
    policy: str  # a plan policy, or "single"
    budget: int | None = None
    plan_seed: int = 0
    train_seed: int = 0
    layer: int | None = None

    @property
    def label(self) -> str:
        parts = [self.task, self.policy if self.layer is None else f"layer {self.layer}"]
        if self.budget is not None:
            parts.append(f"k={self.budget}")
        if self.policy == "random":
            parts.append(f"placement seed {self.plan_seed}")
        if self.train_seed:
            parts.append(f"train seed {self.train_seed}")
        return " · ".join(parts)


def single_jobs(s: Settings, tasks: Sequence[str]) -> list[Job]:
    return [Job(t, "single", "single", layer=layer) for t in tasks for layer in s.single_layers]


def grid_jobs(
    s: Settings, tasks: Sequence[str], only: set[str] | None = None, groups: set[str] | None = None
) -> list[Job]:
    """The budget × policy grid, then the seed repeats; ``only``/``groups`` keep the named policies/groups."""
    jobs: list[Job] = []
    for t in tasks:
        ts = s.task(t)
        budgets = s.budgets if ts.grid == "full" else (s.small_budget,)
        policies = FULL_POLICIES if ts.grid == "full" else SMALL_POLICIES
        for b in budgets:
            for p in policies:
                for ps in s.random_seeds if p == "random" else (0,):
                    jobs.append(Job(t, "grid", p, b, plan_seed=ps))
        jobs.append(Job(t, "grid", "all"))
    for t in tasks:
        if s.task(t).grid != "full":
            continue
        for seed in s.repeat_seeds:
            for p in s.repeat_policies:
                jobs.append(Job(t, "repeat", p, None if p == "all" else s.repeat_budget, train_seed=seed))
    return [j for j in jobs if (only is None or j.policy in only) and (groups is None or j.group in groups)]


# ---------------------------------------------------------------------------------------------------------
# Measuring helpers: peak memory, load, base-model integrity
# ---------------------------------------------------------------------------------------------------------


def _fix_malloc(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold: large freed buffers are unmapped at once, so RSS tracks live memory."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, threshold))


class PeakRss:
    """Peak resident memory above the level at entry, sampled on a thread (Linux /proc; None elsewhere)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._max = 0
        self._base = 0
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int | None:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * self._page
        except OSError:
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            r = self._rss()
            if r is not None and r > self._max:
                self._max = r
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        base = self._rss()
        if base is not None:
            self._base = self._max = base
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mib = (self._max - self._base) / 2**20


def _load() -> float:
    with contextlib.suppress(OSError):
        return round(os.getloadavg()[0], 2)
    return float("nan")


def _cheap_hash(model: Any) -> str:
    """Structure (names, shapes, grad flags, mode) plus the bytes of the q/k/v/o weights LoRA touches."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}|{tuple(p.shape)}|{p.requires_grad}\n".encode())
        if any(r in name for r in ("q_proj", "k_proj", "v_proj", "o_proj")):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    h.update(f"training={model.training}|{type(model).__name__}".encode())
    return h.hexdigest()


# The planner's default-score declaration in the card package: which score the planner uses changes no
# number in a card, so it is left out of the card code hash (the benchmark itself sets that default).
_DEFAULT_DECL = re.compile(
    rb"^(?:# .*\n)*DEFAULT_SCORE = .*?\n(?:DEFAULT_SCORE_BASIS = \(\n(?:    .*\n)*?\)\n)?", re.M
)


def _card_code_hash() -> str:
    """sha256 of the card package's source: a change to the card's definitions changes this."""
    import layercard.card as card_pkg

    h = hashlib.sha256()
    for f in sorted(Path(card_pkg.__file__).parent.glob("*.py")):
        h.update(f.name.encode() + b"\n" + _DEFAULT_DECL.sub(b"", f.read_bytes()))
    return h.hexdigest()


class StopBench(Exception):
    """--limit-runs reached."""


# ---------------------------------------------------------------------------------------------------------
# The tiny model of --dry-run-tiny
# ---------------------------------------------------------------------------------------------------------

_TINY_CHAT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>' + message['content'] + '\n' }}"
    "{% else %}{{ '<|assistant|>' + message['content'] + '<eos>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tiny_model(folder: Path, n_layers: int) -> Path:
    """A random Llama (d=32, ``n_layers`` layers) with a character-level chat tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from layercard.artifacts import atomic_path

    specials = ("<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>")
    chars = " \n" + string.ascii_lowercase + string.digits + string.punctuation
    backend = Tokenizer(
        models.WordLevel(vocab={t: i for i, t in enumerate(specials + tuple(chars))}, unk_token="<unk>")
    )
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tok.chat_template = _TINY_CHAT
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return folder


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(statistics.fmean(vals)) if vals else None


class Bench:
    """Holds the model (loaded once), tasks, cards and the frozen score; runs and looks up cached runs."""

    def __init__(
        self,
        settings: Settings,
        root: Path,
        results: Path,
        *,
        tasks: Sequence[str],
        only: set[str] | None = None,
        groups: set[str] | None = None,
        limit_runs: int | None = None,
    ) -> None:
        self.s = settings
        self.root = root
        self.results = results
        self.task_names = tuple(tasks)
        self.only = only
        self.groups = groups
        self.limit_runs = limit_runs
        self.new_runs = 0
        self._loaded: Any = None
        self._tasks: dict[tuple[str, str], Any] = {}
        self._cards: dict[str, Any] = {}
        self._plans: dict[Job, tuple[dict[str, Any] | None, str | None]] = {}
        self._base_full: str | None = None
        self._base_cheap: str | None = None
        self.checks = {"cheap": 0, "full": 0}
        self._machine_noted = False

    # ---- model, tasks, cards -------------------------------------------------------------------------------
    @property
    def loaded(self) -> Any:
        if self._loaded is None:
            import torch

            from layercard.models import load_model, weights_hash

            spec = self.s.model
            if self.s.dry_run:
                torch.set_num_threads(1)  # tiny ops gain nothing from threads, and the machine is shared
                spec = str(build_tiny_model(self.root / "tiny-model", self.s.n_layers))
            device = "cuda" if torch.cuda.is_available() else "cpu"
            t0 = time.perf_counter()
            self._loaded = load_model(spec, device=device)
            self._base_full = weights_hash(self._loaded.model)
            self._base_cheap = _cheap_hash(self._loaded.model)
            print(f"loaded {self.s.model} on {device} in {time.perf_counter() - t0:.1f} s", flush=True)
        return self._loaded

    def check_base(self, *, full: bool = False) -> None:
        """The base model must be exactly the unmodified one between runs (train/eval restore it)."""
        from layercard.models import weights_hash

        model = self.loaded.model
        got = _cheap_hash(model)
        self.checks["cheap"] += 1
        if got != self._base_cheap:
            raise RuntimeError(
                "the base model changed between runs (q/k/v/o weights, structure or grad flags)"
            )
        if full:
            self.checks["full"] += 1
            if weights_hash(model) != self._base_full:
                raise RuntimeError("the base model's weights changed between runs (full weights hash)")

    def task(self, name: str, which: str) -> Any:
        """The training (``which='train'``) or test split of a task, with the run's prompt cap applied."""
        key = (name, which)
        if key not in self._tasks:
            from layercard.tasks import load_task

            ts = self.s.task(name)
            spec, split = (
                (ts.train_spec, ts.train_split) if which == "train" else (ts.test_spec, ts.test_split)
            )
            task = load_task(spec, split=split, seed=ts.data_seed)
            if ts.max_input_tokens is not None:
                task = task.with_format(
                    dataclasses.replace(task.format, max_input_tokens=ts.max_input_tokens)
                )
            self._tasks[key] = task
        return self._tasks[key]

    def card_config(self, ts: TaskSetting) -> Any:
        from layercard.card import CardConfig

        return CardConfig(
            roles=self.s.roles,
            examples=self.s.card_examples,
            max_length=ts.max_length,
            batch_size=self.s.card_batch_size,
            lora_rank=self.s.rank,
            lora_alpha=self.s.alpha,
            lr=self.s.lr,
            seed=self.s.seed,
            coupling=True,
            coupling_examples=self.s.coupling_examples,
            calibrate=True,
            horizon_steps=self.s.steps,
        )

    def card(self, name: str, *, compute: bool = True) -> Any:
        """The task's card, cached under ROOT/cards/TASK/ and keyed by its config, data, model and code."""
        if name in self._cards:
            return self._cards[name]
        from layercard.artifacts import read_json, sha256_json, write_json
        from layercard.card import Card, compute_card

        ts = self.s.task(name)
        cfg = self.card_config(ts)
        train = self.task(name, "train")
        key = sha256_json(
            {
                "bench": BENCH,
                "config": dataclasses.asdict(cfg),
                "model_hash": self.loaded.model_hash,
                "data_hash": train.data_hash,
                "format": train.format.to_dict(),
                "code": _card_code_hash(),
            }
        )
        folder = self.root / "cards" / name
        meta_path, card_path = folder / "meta.json", folder / "card.json"
        # Cards are kept beside the results too (committed), so a fresh checkout reuses them.
        saved = self.results / "placement_cards" / name
        if not card_path.is_file() and (saved / "card.json").is_file() and (saved / "meta.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(saved / "card.json", card_path)
            shutil.copyfile(saved / "meta.json", meta_path)
        if card_path.is_file() and meta_path.is_file() and read_json(meta_path).get("key") == key:
            card = Card.load(card_path)
        elif not compute:
            return None
        else:
            if card_path.is_file():
                old = read_json(meta_path).get("key", "unknown") if meta_path.is_file() else "unknown"
                kept = folder / f"card.{old[:12]}.json"
                shutil.copyfile(card_path, kept)
                print(
                    f"card {name}: settings or card code changed; recomputing (old card kept as {kept.name})"
                )
            print(
                f"[card] {name}: {cfg.examples} examples × ≤{cfg.max_length} tokens, coupling, calibration",
                flush=True,
            )
            t0, load0 = time.perf_counter(), _load()
            card = compute_card(self.loaded, train, cfg, progress=False)
            card.save(card_path)
            write_json(
                meta_path,
                {
                    "key": key,
                    "code_hash": _card_code_hash(),
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "load_avg": [load0, _load()],
                    "created": _now(),
                },
            )
            saved.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(card_path, saved / "card.json")
            shutil.copyfile(meta_path, saved / "meta.json")
            self.check_base()
            print(f"  card {name}: {card.timings.get('total_s', 0):.0f} s", flush=True)
        self._cards[name] = card
        return card

    # ---- where the runs were measured ----------------------------------------------------------------------
    @property
    def measured_on_path(self) -> Path:
        return self.results / MEASURED_FILE

    def measured_on(self) -> list[dict[str, Any]]:
        """Each distinct machine (and package versions) that measured runs into these results."""
        from layercard.artifacts import read_json

        return read_json(self.measured_on_path)["machines"] if self.measured_on_path.is_file() else []

    def note_machine(self) -> None:
        """Record this machine before it measures a run, so a report made elsewhere still names it."""
        if self._machine_noted:  # the machine does not change within one process
            return
        self._machine_noted = True
        from layercard.artifacts import machine_info, package_versions, write_json

        entry = {"machine": machine_info(), "versions": package_versions()}
        known = self.measured_on()
        if entry not in known:
            write_json(self.measured_on_path, {"machines": [*known, entry]})

    # ---- the frozen score ---------------------------------------------------------------------------------
    @property
    def frozen_path(self) -> Path:
        return self.results / FROZEN_FILE

    def frozen(self) -> dict[str, Any] | None:
        from layercard.artifacts import read_json

        return read_json(self.frozen_path) if self.frozen_path.is_file() else None

    def frozen_variant(self) -> Variant | None:
        f = self.frozen()
        return Variant(**f["variant"]) if f else None

    # ---- plans --------------------------------------------------------------------------------------------
    def _plan_card(self, name: str, variant: Variant | None) -> Any:
        """The card, with its damping set to the frozen variant's δ when that variant has one."""
        card = self.card(name)
        if variant is not None and variant.delta is not None:
            card = dataclasses.replace(card, config={**card.config, "delta": variant.delta})
        return card

    def plan(self, job: Job) -> tuple[dict[str, Any] | None, str | None]:
        """(plan dict, None) or (None, reason) — e.g. no frozen score yet, or a policy with no placement."""
        if job in self._plans:
            return self._plans[job]
        from layercard.errors import LayercardError
        from layercard.plan import Budget, PlanConfig, make_plan

        variant = self.frozen_variant()
        kw = dict(rank=self.s.rank, alpha=self.s.alpha, roles=self.s.roles)
        out: tuple[dict[str, Any] | None, str | None]
        if job.policy == "single":
            base = make_plan(self.card(job.task), PlanConfig("all", **kw)).to_dict()
            out = (_layer_plan(base, [int(job.layer)]), None)  # type: ignore[arg-type]
        elif variant is None and job.policy in CARD_POLICIES:
            out = (None, "no frozen default score yet (run `select`)")
        else:
            card = self._plan_card(job.task, variant)
            budget = Budget("layers", job.budget) if job.budget is not None else None
            cfg = PlanConfig(
                job.policy, budget=budget, seed=job.plan_seed, score=variant.score if variant else None, **kw
            )
            try:
                out = (make_plan(card, cfg).to_dict(), None)
            except LayercardError as e:
                out = (None, f"no placement: {e}")
        self._plans[job] = out
        return out

    # ---- runs ---------------------------------------------------------------------------------------------
    def eval_settings(self, ts: TaskSetting) -> dict[str, Any]:
        return {
            "loss_examples": ts.loss_examples,
            "gen_examples": ts.gen_examples,
            "max_new_tokens": ts.max_new_tokens,
            "max_length": ts.max_length,
            "batch_size": self.s.eval_batch_size,
            "seed": self.s.eval_seed,
        }

    def train_config(self, ts: TaskSetting, seed: int) -> Any:
        from layercard.train import TrainConfig

        return TrainConfig(
            steps=self.s.steps,
            batch_size=ts.batch_size,
            lr=self.s.lr,
            max_length=ts.max_length,
            train_examples=self.s.train_examples,
            eval_examples=0,
            eval_every=0,
            checkpoint_every=0,
            seed=seed,
        )

    def run_config(self, job: Job | None, task: str, plan: dict[str, Any] | None) -> dict[str, Any]:
        """Everything a run's numbers depend on; its sha256 names the run (``job=None``: the base model)."""
        ts = self.s.task(task)
        train, test = self.task(task, "train"), self.task(task, "test")
        cfg: dict[str, Any] = {
            "bench": BENCH,
            "kind": "base" if job is None else "train",
            "model": self.s.model,
            "model_hash": self.loaded.model_hash,
            "task": task,
            "test_data": {"spec": ts.test_spec, "split": ts.test_split, "data_hash": test.data_hash},
            "format": test.format.to_dict(),
            "eval": self.eval_settings(ts),
        }
        if job is not None and plan is not None:
            lc = plan["lora_config"]
            cfg["train_data"] = {"spec": ts.train_spec, "split": ts.train_split, "data_hash": train.data_hash}
            cfg["train"] = self.train_config(ts, job.train_seed).to_dict()
            cfg["layers"] = sorted(int(x) for x in plan["layers"])
            cfg["lora"] = {
                "r": lc["r"],
                "alpha": lc["lora_alpha"],
                "dropout": lc["lora_dropout"],
                "targets": sorted(lc["target_modules"]),
                "rank_pattern": lc.get("rank_pattern") or {},
                "alpha_pattern": lc.get("alpha_pattern") or {},
            }
            cfg["generation"] = job.group != "single"
        return cfg

    def _count_new(self, label: str) -> None:
        if self.limit_runs is not None and self.new_runs >= self.limit_runs:
            raise StopBench(f"--limit-runs {self.limit_runs} reached before {label}")
        self.new_runs += 1

    def result(self, job: Job | None, task: str, *, execute: bool) -> dict[str, Any] | None:
        """The run's cached result; with ``execute`` it is trained and evaluated when missing."""
        from layercard.artifacts import read_json, sha256_json, write_json

        plan = None
        if job is not None:
            plan, why = self.plan(job)
            if plan is None:
                return {"status": "no_plan", "reason": why}
        cfg = self.run_config(job, task, plan)
        key = sha256_json(cfg)
        folder = self.root / "runs" / key
        done = folder / "result.json"
        # The ledger under results/ is committed, so finished runs survive a fresh checkout (the run
        # folder with its adapter does not).
        ledger = self.results / "placement_runs" / f"{key}.json"
        if done.is_file():
            return _without_texts(read_json(done))
        if ledger.is_file():
            return _without_texts(read_json(ledger))
        if not execute:
            return None
        label = job.label if job is not None else f"{task} · base model"
        self._count_new(label)
        self.note_machine()
        if folder.exists():  # a crashed run: start over
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_json(folder / "config.json", cfg)
        layers = cfg.get("layers", [])
        print(f"[run {self.new_runs}] {label}: layers {_layers_text(layers)}", flush=True)
        t0, load0 = time.perf_counter(), _load()
        res: dict[str, Any] = {"kind": "placement_run", "key": key, "config": cfg, "layers": layers}
        adapter = None
        if job is not None:
            from layercard.train import train

            ts = self.s.task(task)
            with PeakRss() as mem:
                m = train(
                    self.loaded,
                    plan,
                    self.task(task, "train"),
                    None,
                    self.train_config(ts, job.train_seed),
                    folder / "train",
                    progress=False,
                )
            cuda = m.get("peak_memory_kind") == "cuda_max_memory_allocated"
            res["train"] = {
                "trainable_params": m["trainable_params"],
                "modules": m["plan"]["modules"],
                "s_per_step": m["s_per_step"],
                "tokens_per_s": m["tokens_per_s"],
                "batch_tokens_per_step": m["batch_tokens_per_step"],
                "peak_memory_mib": m["peak_memory_mib"] if cuda else mem.peak_mib,
                "peak_memory_kind": m["peak_memory_kind"] if cuda else "rss_rise_during_train",
                "process_peak_rss_mib": None if cuda else m["peak_memory_mib"],
                "first_train_loss": m["first_train_loss"],
                "final_train_loss": m["final_train_loss"],
                "loss_curve": m["loss_curve"],
                "predicted_step_time_s": m["predicted_step_time_s"],
                "wall_s": m["wall_time_s"],
            }
            adapter = folder / "train" / "adapter"
        res["eval"] = self.evaluate(task, adapter, generation=cfg.get("generation", True))
        self.check_base()
        res["base_unchanged_after"] = True
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        res["load_avg"] = [load0, _load()]
        res["created"] = _now()
        write_json(done, res)
        write_json(ledger, res)
        ev, tr = res["eval"], res.get("train", {})
        extra = f", {tr['s_per_step']:.2f} s/step" if tr else ""
        metric = ev.get("metric")
        mtxt = f", {ev['metric_name']} {metric:.4g}" if metric is not None else ""
        print(f"  test loss {ev['test_loss']:.4f}{mtxt}{extra}, {res['wall_s']:.0f} s", flush=True)
        return res

    @contextlib.contextmanager
    def attached(self, adapter: Path | None) -> Iterator[Any]:
        """The base with ``adapter`` attached for the block (unloaded afterwards), or the base itself."""
        model = self.loaded.model
        if adapter is None:
            yield model
            return
        from layercard.adapters import load_adapter

        flags = [(p, p.requires_grad) for p in model.parameters()]
        net = load_adapter(model, adapter, is_trainable=False)
        try:
            yield net
        finally:
            net.unload()
            for p, r in flags:
                p.requires_grad_(r)

    def evaluate(self, task: str, adapter: Path | None, *, generation: bool = True) -> dict[str, Any]:
        """Teacher-forced test loss on the loss subset; task metric by generation on the nested gen subset."""
        from layercard.evaluate import EvalConfig, eval_loss, evaluate

        ts = self.s.task(task)
        test = self.task(task, "test")
        loss_sub = test.subset(ts.loss_examples, seed=self.s.eval_seed)
        out: dict[str, Any] = {"loss_examples": len(loss_sub)}
        with self.attached(adapter) as net:
            t0 = time.perf_counter()
            out["test_loss"] = eval_loss(
                net,
                self.loaded.tokenizer,
                loss_sub,
                loss_sub.examples,
                batch_size=self.s.eval_batch_size,
                max_length=ts.max_length,
            )
            out["loss_s"] = round(time.perf_counter() - t0, 2)
            if generation and ts.gen_examples:
                cfg = EvalConfig(
                    examples=ts.gen_examples,
                    batch_size=self.s.eval_batch_size,
                    max_new_tokens=ts.max_new_tokens,
                    loss=False,
                    seed=self.s.eval_seed,
                )
                r = evaluate(self.loaded, test, cfg, model=net, progress=False)
                out.update(
                    metric_name=r.primary_metric,
                    metric=r.metrics[r.primary_metric],
                    metrics=r.metrics,
                    gen_examples=r.n,
                    gen_timing={k: round(float(v), 4) for k, v in r.timing.items()},
                    # the example's id, never its text: the committed ledger holds no dataset text
                    samples=[{"id": p["id"], "prediction": p["prediction"]} for p in r.predictions[:3]],
                )
        return out

    # ---- phases -------------------------------------------------------------------------------------------
    def phase_cards(self) -> None:
        for t in self.task_names:
            card = self.card(t)
            v = variants(self.s)
            top = {
                x.name: _layers_text(sorted(np.argsort(-x.layer_scores(card))[:4].tolist())) for x in v[-6:]
            }
            print(f"  {t}: top-4 layers by score: " + "; ".join(f"{k} {w}" for k, w in top.items()))
        self.check_base(full=True)

    def phase_single(self) -> None:
        for t in self.task_names:
            self.card(t)
            self.result(None, t, execute=True)
            for job in single_jobs(self.s, [t]):
                self.result(job, t, execute=True)
            self.check_base(full=True)

    def single_drops(self, task: str) -> tuple[dict[int, float], list[str]]:
        """Measured test-loss drop (base − run) per single layer, and what is missing."""
        base = self.result(None, task, execute=False)
        drops: dict[int, float] = {}
        missing: list[str] = [] if base else [f"{task} base model"]
        for job in single_jobs(self.s, [task]):
            r = self.result(job, task, execute=False)
            if r is None or r.get("status") == "no_plan":
                missing.append(job.label)
            elif base:
                drops[int(job.layer)] = base["eval"]["test_loss"] - r["eval"]["test_loss"]  # type: ignore[arg-type]
        return drops, missing

    def spearman_table(self, task: str) -> dict[str, Any] | None:
        """Spearman of every score variant's per-layer prediction with the measured single-layer drops."""
        card = self.card(task, compute=False)
        drops, missing = self.single_drops(task)
        if card is None or missing:
            return None
        layers = sorted(drops)
        measured = [drops[k] for k in layers]
        rows = {}
        for v in variants(self.s):
            sc = v.layer_scores(card)
            rows[v.name] = {
                "spearman": _spearman([sc[k] for k in layers], measured),
                "predicted": [float(sc[k]) for k in layers],
            }
        return {"layers": layers, "measured_drop": measured, "variants": rows}

    def phase_select(self, *, refreeze: bool, reason: str | None) -> None:
        tables: dict[str, Any] = {}
        for t in self.s.select_tasks:
            self.card(t)
            tab = self.spearman_table(t)
            if tab is None:
                _, missing = self.single_drops(t)
                raise SystemExit(
                    f"select: {t} lacks single-layer runs ({', '.join(missing[:3])}…); "
                    f"run `single --tasks {','.join(self.s.select_tasks)}` first"
                )
            tables[t] = tab
        vs = variants(self.s)
        mean = {}
        for v in vs:
            vals = [tables[t]["variants"][v.name]["spearman"] for t in self.s.select_tasks]
            mean[v.name] = None if any(x is None for x in vals) else float(np.mean(vals))
        best = max(vs, key=lambda v: mean[v.name] if mean[v.name] is not None else -math.inf)
        choice = {
            "variant": best.to_dict(),
            "mean_spearman": mean[best.name],
            "selected_on": list(self.s.select_tasks),
            "spearman": {t: {v.name: tables[t]["variants"][v.name]["spearman"] for v in vs} for t in tables},
            "mean_spearman_all": mean,
            "measured_drop": {
                t: dict(zip(tables[t]["layers"], tables[t]["measured_drop"], strict=True)) for t in tables
            },
            "card_code_hash": _card_code_hash(),
            "settings": {"steps": self.s.steps, "lr": self.s.lr, "rank": self.s.rank, "model": self.s.model},
            "created": _now(),
        }
        print("select: mean Spearman over " + ", ".join(self.s.select_tasks) + " (single-layer drops):")
        for v in vs:
            per = "  ".join(f"{t} {_f(tables[t]['variants'][v.name]['spearman'], '+.3f')}" for t in tables)
            mark = "  ← best" if v is best else ""
            print(f"  {v.name:22s} {_f(mean[v.name], '+.3f')}   ({per}){mark}")
        old = self.frozen()
        from layercard.artifacts import write_json

        if old is not None and not refreeze:
            same = old["variant"]["name"] == best.name
            print(
                f"select: frozen choice {old['variant']['name']} (mean {_f(old['mean_spearman'], '+.3f')}, "
                f"{old['created']}) kept; today's data {'agree' if same else 'would pick ' + best.name}. "
                "Pass --refreeze (with --reason) to replace it; the change is recorded with before/after "
                "numbers."
            )
            return
        history = list(old.get("history", [])) if old else []
        if old is not None:
            history.append(
                {
                    "date": _now(),
                    "reason": reason or "(no reason given)",
                    "before": {
                        "variant": old["variant"],
                        "mean_spearman": old["mean_spearman"],
                        "spearman": old["spearman"],
                        "card_code_hash": old.get("card_code_hash"),
                    },
                    "after": {
                        "variant": choice["variant"],
                        "mean_spearman": choice["mean_spearman"],
                        "spearman": choice["spearman"],
                        "card_code_hash": choice["card_code_hash"],
                    },
                }
            )
        choice = {"kind": "placement_default_score", **choice, "history": history}
        write_json(self.frozen_path, choice)
        self._plans.clear()  # card-policy plans made before this choice are stale
        print(f"select: froze {best.name} → {self.frozen_path}")

    def phase_confirm(self) -> None:
        from layercard.artifacts import write_json

        v = self.frozen_variant()
        if v is None:
            raise SystemExit("confirm: no frozen default score; run `select` first")
        out: dict[str, Any] = {"variant": v.to_dict(), "tasks": {}, "created": _now()}
        for t in self.s.confirm_tasks:
            self.card(t)
            tab = self.spearman_table(t)
            if tab is None:
                print(f"confirm: {t} lacks single-layer runs; run `single --tasks {t}`")
                continue
            rho = tab["variants"][v.name]["spearman"]
            out["tasks"][t] = {
                "frozen_spearman": rho,
                "all": {k: r["spearman"] for k, r in tab["variants"].items()},
            }
            best = max(tab["variants"].items(), key=lambda kv: kv[1]["spearman"] or -math.inf)
            print(
                f"confirm: {t}: frozen {v.name} Spearman {_f(rho, '+.3f')} "
                f"(best on this task, for transparency only: {best[0]} {_f(best[1]['spearman'], '+.3f')})"
            )
        write_json(self.results / CONFIRM_FILE, out)

    def phase_policies(self) -> None:
        if self.frozen_variant() is None:
            raise SystemExit("policies: no frozen default score; run `single` and `select` first")
        for t in self.task_names:
            self.card(t)
            self.result(None, t, execute=True)
            for job in grid_jobs(self.s, [t], self.only, self.groups):
                r = self.result(job, t, execute=True)
                if r is not None and r.get("status") == "no_plan":
                    print(f"[skip] {job.label}: {r['reason']}")
            self.check_base(full=True)

    def trim_dir(self, task: str, key: str) -> Path:
        return self.root / "trim" / task / key[:16]

    def phase_trim(self) -> None:
        from layercard.artifacts import write_json
        from layercard.trim import TrimConfig, trim

        for t in self.task_names:
            ts = self.s.task(t)
            self.card(t)
            r = self.result(Job(t, "grid", "all"), t, execute=True)
            assert r is not None
            out = self.trim_dir(t, r["key"])
            adapter = self.root / "runs" / r["key"] / "train" / "adapter"
            if not (out / "trim.json").is_file():
                self._count_new(f"{t} trim")
                test = self.task(t, "test")
                held_out = test.subset(ts.trim_examples, seed=self.s.eval_seed, offset=ts.loss_examples)
                cfg = TrimConfig(
                    examples=None,
                    batch_size=self.s.eval_batch_size,
                    max_new_tokens=ts.max_new_tokens,
                    max_length=ts.max_length,
                    radius=self.s.trim_radius,
                    latency_repeats=1,
                    seed=self.s.eval_seed,
                )
                print(f"[trim] {t}: all-30 adapter on {len(held_out)} held-out test examples", flush=True)
                res = trim(self.loaded, adapter, held_out, cfg, out, progress=False)
                print(
                    f"  boundary K={res['chosen_k']}: {len(res['adapted_modules_before'])} → "
                    f"{len(res['adapted_modules_after'])} modules",
                    flush=True,
                )
                self.check_base()
            if not (out / "eval_trimmed.json").is_file():
                ev = self.evaluate(t, out / "adapter-trimmed")
                write_json(out / "eval_trimmed.json", {"kind": "placement_trim_eval", "eval": ev})
                self.check_base(full=True)

    # ---- rows for the report ------------------------------------------------------------------------------
    def rows(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One row per job (done, missing or without placement) and the base results per task."""
        rows: list[dict[str, Any]] = []
        bases: dict[str, Any] = {}
        for t in self.task_names:
            if self.card(t, compute=False) is None:
                bases[t] = None
                continue
            bases[t] = self.result(None, t, execute=False)
            for job in single_jobs(self.s, [t]) + grid_jobs(self.s, [t]):
                rows.append(self._row(job, self.result(job, t, execute=False)))
        return rows, bases

    def _row(self, job: Job, r: dict[str, Any] | None) -> dict[str, Any]:
        row: dict[str, Any] = {
            "task": job.task,
            "group": job.group,
            "policy": job.policy,
            "budget": job.budget,
            "plan_seed": job.plan_seed,
            "train_seed": job.train_seed,
            "layer": job.layer,
        }
        plan, why = self.plan(job)
        if plan is None:
            row.update(status="no_plan", note=why)
            return row
        row["layers"] = plan["layers"]
        row["n_layers"] = len(plan["layers"])
        pred = plan.get("predicted") or {}
        if pred:
            row["predicted"] = {
                k: pred.get(k)
                for k in (
                    "score",
                    "gain",
                    "fraction",
                    "additive_gain",
                    "redundancy",
                    "step_time_s",
                    "params",
                    "modules",
                )
            }
        if plan.get("warnings"):
            row["plan_warnings"] = plan["warnings"]
        if r is None:
            row["status"] = "missing"
            return row
        tr, ev = r.get("train", {}), r["eval"]
        row.update(
            status="done",
            run=r["key"],
            trainable_params=tr.get("trainable_params"),
            modules=tr.get("modules"),
            s_per_step=tr.get("s_per_step"),
            peak_memory_mib=tr.get("peak_memory_mib"),
            peak_memory_kind=tr.get("peak_memory_kind"),
            test_loss=ev["test_loss"],
            metric_name=ev.get("metric_name"),
            metric=ev.get("metric"),
            metrics=ev.get("metrics"),
            final_train_loss=tr.get("final_train_loss"),
            wall_s=r.get("wall_s"),
            load_avg=r.get("load_avg"),
        )
        return row


def _layer_plan(all_plan: dict[str, Any], layers: Sequence[int]) -> dict[str, Any]:
    """The all-layer plan restricted to ``layers`` (single-layer runs: a placement no policy names)."""
    keep = set(layers)
    units = [u for u in all_plan["units"] if int(u["layer"]) in keep]
    lc = {
        **all_plan["lora_config"],
        "target_modules": [u["name"] for u in units],
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    return {
        **all_plan,
        "units": units,
        "layers": sorted(keep),
        "lora_config": lc,
        "config": {**all_plan["config"], "policy": "single"},
        "predicted": {},
        "warnings": [],
    }


def _layers_text(layers: Sequence[int]) -> str:
    layers = sorted(int(x) for x in layers)
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}–{layers[-1]}"
    return ",".join(map(str, layers))


def _f(x: Any, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, spec)


# ---------------------------------------------------------------------------------------------------------
# Estimate
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Costs:
    """Time constants of smollm2 on 2 CPU cores, fp32 (DESIGN §10 and the pilot of §3a)."""

    train_all_s_per_ktok: float = 5.6  # all-30 LoRA q,v step per 1024 padded tokens
    fwd_s_per_ktok: float = 2.0  # forward only (eval loss, generation prefill) per 1024 tokens
    decode_s_per_step: float = 0.04  # one greedy decode step of a batch of 16
    run_overhead_s: float = 5.0  # PEFT wrap/unload, adapter save and load, hashes
    card_s_per_ktok: float = 45.0 / 8.192  # a card pass over 64×128 tokens ≈ 45 s
    card_extra_s: float = 75.0  # coupling (8 examples) and cost calibration (4 placements × 3 steps)
    trim_ks: int = 8  # boundaries swept per trim (±2 around two candidates, deduplicated, plus the last)


def depth_factor(min_layer: int, n_adapted: int, n_layers: int) -> float:
    """Step time relative to all-30, fitted to the pilot: layer 29 alone 0.38, layer 0 alone 0.95, all 1."""
    return 0.357 + 0.587 * (n_layers - min_layer) / n_layers + 0.056 * n_adapted / n_layers


def _assumed_min_layer(job: Job, n_layers: int) -> tuple[int, int]:
    """(lowest adapted layer, adapted layers) a job is costed at before its plan exists (conservative)."""
    if job.layer is not None:
        return job.layer, 1
    if job.policy == "all" or job.budget is None:
        return 0, n_layers
    k = job.budget
    if job.policy == "top":
        return n_layers - k, k
    if job.policy == "middle":
        return (n_layers - k) // 2, k
    if job.policy == "uniform":
        return n_layers // (2 * k), k
    return 0, k  # bottom, random, gradnorm and the card policies can reach layer 0


def token_stats(settings: Settings, tok: Any) -> dict[str, dict[str, float]]:
    """Mean padded tokens per training batch, eval lengths and prompt lengths, from 256 examples per split."""
    import random

    from layercard.tasks import encode_prompt, encode_task, load_task

    out = {}
    for ts in settings.tasks:

        def get(spec: str, split: str, ts: TaskSetting = ts) -> Any:
            t = load_task(spec, split=split, seed=ts.data_seed)
            if ts.max_input_tokens is not None:
                t = t.with_format(dataclasses.replace(t.format, max_input_tokens=ts.max_input_tokens))
            return t.subset(256, seed=0)

        train, test = get(ts.train_spec, ts.train_split), get(ts.test_spec, ts.test_split)
        enc = encode_task(tok, train, max_length=ts.max_length)
        lens = [len(e) for e in enc]
        rng = random.Random(0)
        rng.shuffle(lens)
        b = ts.batch_size
        step = [max(lens[i : i + b]) * b for i in range(0, len(lens) - b + 1, b)]
        tenc = encode_task(tok, test, max_length=ts.max_length)
        targets = sorted(len(e) - e.prompt_len for e in tenc)
        prompts = [len(encode_prompt(tok, test.format, ex.input)) for ex in test.examples]
        out[ts.name] = {
            "step_tokens": float(np.mean(step)),
            "eval_tokens": float(np.mean([len(e) for e in tenc])),
            "prompt_tokens": float(np.mean(prompts)),
            "decode_steps": float(min(ts.max_new_tokens, targets[int(0.9 * (len(targets) - 1))] + 1)),
        }
    return out


def estimate(settings: Settings, stats: dict[str, dict[str, float]], c: Costs = Costs()) -> dict[str, Any]:
    """Planned runs and expected seconds per task and phase, from the constants and the token statistics."""
    L = settings.n_layers
    tasks = [t.name for t in settings.tasks]
    per: dict[str, dict[str, Any]] = {}
    for ts in settings.tasks:
        st = stats[ts.name]
        step_all = c.train_all_s_per_ktok * st["step_tokens"] / 1024
        loss_s = ts.loss_examples * st["eval_tokens"] * c.fwd_s_per_ktok / 1024
        gen_s = (
            ts.gen_examples * st["prompt_tokens"] * c.fwd_s_per_ktok / 1024
            + math.ceil(ts.gen_examples / settings.eval_batch_size) * st["decode_steps"] * c.decode_s_per_step
        )

        def job_s(
            job: Job, step_all: float = step_all, loss_s: float = loss_s, gen_s: float = gen_s
        ) -> float:
            lo, n = _assumed_min_layer(job, L)
            ev = loss_s + (gen_s if job.group != "single" else 0.0)
            return settings.steps * step_all * depth_factor(lo, n, L) + ev + c.run_overhead_s

        singles = single_jobs(settings, [ts.name])
        grid = grid_jobs(settings, [ts.name])
        card_s = (
            c.card_s_per_ktok * settings.card_examples * min(ts.max_length, st["eval_tokens"] * 1.15) / 1024
        )
        trim_n = ts.trim_examples
        trim_gen = (
            trim_n * st["prompt_tokens"] * c.fwd_s_per_ktok / 1024
            + math.ceil(trim_n / settings.eval_batch_size) * st["decode_steps"] * c.decode_s_per_step
        )
        trim_loss = trim_n * st["eval_tokens"] * c.fwd_s_per_ktok / 1024
        per[ts.name] = {
            "all30_s_per_step": round(step_all, 2),
            "eval_s": round(loss_s + gen_s, 1),
            "runs": {
                "single": len(singles),
                "grid": sum(j.group == "grid" for j in grid),
                "repeat": sum(j.group == "repeat" for j in grid),
                "base": 1,
            },
            "seconds": {
                "card": card_s + c.card_extra_s,
                "base": loss_s + gen_s + c.run_overhead_s,
                "single": sum(job_s(j) for j in singles),
                "grid": sum(job_s(j) for j in grid if j.group == "grid"),
                "repeat": sum(job_s(j) for j in grid if j.group == "repeat"),
                "trim": (c.trim_ks + 2) * (trim_gen + trim_loss) + 2 * (loss_s + gen_s),
            },
        }
    total = sum(sum(p["seconds"].values()) for p in per.values())
    n_runs = sum(sum(p["runs"].values()) for p in per.values())
    return {
        "tasks": tasks,
        "per_task": per,
        "runs": n_runs,
        "total_s": total,
        "hours": total / 3600,
        "constants": dataclasses.asdict(c),
        "token_stats": stats,
    }


def print_estimate(est: dict[str, Any]) -> None:
    print("Planned work (train+eval runs; base = base-model evaluation; one card and one trim per task):")
    print(
        f"{'task':9s} {'single':>6s} {'grid':>5s} {'repeat':>6s} {'all-30 s/step':>13s} {'eval s':>7s} "
        f"{'card':>6s} {'single':>7s} {'grid':>7s} {'repeat':>7s} {'trim':>6s} {'total':>7s}"
    )
    for t, p in est["per_task"].items():
        r, s = p["runs"], p["seconds"]
        print(
            f"{t:9s} {r['single']:6d} {r['grid']:5d} {r['repeat']:6d} {p['all30_s_per_step']:13.2f} "
            f"{p['eval_s']:7.0f} {s['card'] / 60:5.1f}m {s['single'] / 60:6.1f}m {s['grid'] / 60:6.1f}m "
            f"{s['repeat'] / 60:6.1f}m {s['trim'] / 60:5.1f}m {sum(s.values()) / 60:6.1f}m"
        )
    print(
        f"total: {est['runs']} runs (at most: placements that coincide share a run) "
        f"≈ {est['hours']:.2f} h on 2 CPU cores"
    )


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

_POLICY_ORDER = (*FULL_POLICIES, "all")


def _grid_rows(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["task"] == task and r["group"] == "grid"]


def _policy_value(rows: list[dict[str, Any]], policy: str, budget: int | None, field: str) -> float | None:
    """A policy's value at a budget (training seed 0); random is the mean over its placement seeds."""
    vals = [
        r.get(field)
        for r in rows
        if r["policy"] == policy and r["budget"] == budget and r["status"] == "done" and r["train_seed"] == 0
    ]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def seed_stats(rows: list[dict[str, Any]], s: Settings, task: str) -> dict[str, Any]:
    """Mean and spread over training seeds for the repeated policies; the spread is the noise threshold."""
    out: dict[str, Any] = {}
    for p in s.repeat_policies:
        b = None if p == "all" else s.repeat_budget
        runs = [
            r
            for r in rows
            if r["task"] == task
            and r["policy"] == p
            and r["budget"] == b
            and r["status"] == "done"
            and r["group"] in ("grid", "repeat")
            and r["plan_seed"] == 0
        ]
        if not runs:
            continue
        entry: dict[str, Any] = {"n": len(runs), "seeds": sorted(r["train_seed"] for r in runs)}
        for field in ("test_loss", "metric"):
            v = [r[field] for r in runs if r.get(field) is not None]
            if v:
                entry[field] = {
                    "mean": float(np.mean(v)),
                    "std": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                    "min": float(min(v)),
                    "max": float(max(v)),
                    "range": float(max(v) - min(v)),
                }
        out[p] = entry
    full = [e for e in out.values() if e["n"] >= len(s.repeat_seeds) + 1]
    noise = {}
    for field in ("test_loss", "metric"):
        ranges = [e[field]["range"] for e in full if field in e]
        noise[field] = max(ranges) if ranges else None
    return {"policies": out, "noise": noise, "complete": len(full) == len(s.repeat_policies)}


def _seed_means(seeds: dict[str, Any], base_loss: float | None, s: Settings) -> dict[str, Any] | None:
    """Card against the other repeated policies on their means over every training seed."""
    n = len(s.repeat_seeds) + 1
    means = {
        p: e["test_loss"]["mean"] for p, e in seeds["policies"].items() if e["n"] >= n and "test_loss" in e
    }
    others = [p for p in means if p not in ("card", "all")]
    if "card" not in means or not others:
        return None
    best = min(others, key=lambda p: means[p])
    d = means["card"] - means[best]
    thr = seeds["noise"].get("test_loss")
    out: dict[str, Any] = {
        "means": means,
        "best_other": best,
        "loss_diff_vs_best_other": d,
        "difference_real": abs(d) > thr if thr is not None else None,
    }
    if base_loss is not None and "all" in means and base_loss - means["all"] > 0:
        all_drop = base_loss - means["all"]
        out["card_gap_to_all30_pct"] = 100 * (all_drop - (base_loss - means["card"])) / all_drop
    return out


def task_summary(
    rows: list[dict[str, Any]],
    base: dict[str, Any] | None,
    s: Settings,
    task: str,
    noise_ref: dict[str, float | None],
) -> dict[str, Any]:
    """Card's rank per budget, its gap to all-30 in % of the all-30 improvement and its relative cost."""
    ts = s.task(task)
    g = _grid_rows(rows, task)
    base_loss = base["eval"]["test_loss"] if base else None
    all_loss = _policy_value(g, "all", None, "test_loss")
    all_drop = base_loss - all_loss if base_loss is not None and all_loss is not None else None
    seeds = seed_stats(rows, s, task)
    own_noise = seeds["noise"] if seeds["policies"] else None
    noise = own_noise if own_noise and own_noise.get("test_loss") is not None else noise_ref
    out: dict[str, Any] = {
        "base": {
            "test_loss": base_loss,
            "metric": base["eval"].get("metric") if base else None,
            "metric_name": base["eval"].get("metric_name") if base else None,
        },
        "all30": {
            f: _policy_value(g, "all", None, f)
            for f in ("test_loss", "metric", "s_per_step", "peak_memory_mib", "trainable_params", "modules")
        },
        "all30_drop": all_drop,
        "seeds": seeds,
        "seed_means": _seed_means(seeds, base_loss, s),
        "noise": noise,
        "noise_source": "own seed repeats"
        if noise is own_noise
        else "largest spread on the seed-repeat tasks",
        "budgets": {},
    }
    budgets = s.budgets if ts.grid == "full" else (s.small_budget,)
    policies = FULL_POLICIES if ts.grid == "full" else SMALL_POLICIES
    for b in budgets:
        table = []
        for p in policies:
            loss = _policy_value(g, p, b, "test_loss")
            if loss is None:
                continue
            table.append(
                {
                    "policy": p,
                    "test_loss": loss,
                    "metric": _policy_value(g, p, b, "metric"),
                    "s_per_step": _policy_value(g, p, b, "s_per_step"),
                    "peak_memory_mib": _policy_value(g, p, b, "peak_memory_mib"),
                }
            )
        entry: dict[str, Any] = {"n_policies": len(table), "complete": len(table) == len(policies)}
        by_loss = sorted(table, key=lambda r: r["test_loss"])
        entry["ranking_loss"] = [r["policy"] for r in by_loss]
        with_metric = [r for r in table if r["metric"] is not None]
        by_metric = sorted(with_metric, key=lambda r: -r["metric"])
        entry["ranking_metric"] = [r["policy"] for r in by_metric]
        card = next((r for r in table if r["policy"] == "card"), None)
        if card is not None:
            # Rank = 1 + the number of policies strictly better: ties share a rank.
            entry["card_rank_loss"] = 1 + sum(r["test_loss"] < card["test_loss"] for r in table)
            if card["metric"] is not None:
                entry["card_rank_metric"] = 1 + sum(r["metric"] > card["metric"] for r in with_metric)
            others = [r for r in by_loss if r["policy"] != "card"]
            if others:
                best = others[0]
                d = card["test_loss"] - best["test_loss"]  # > 0: card is worse
                thr = noise.get("test_loss") if noise else None
                entry.update(
                    card_wins=d < 0,
                    card_ties=d == 0,
                    best_other=best["policy"],
                    loss_diff_vs_best_other=d,
                    difference_real=(abs(d) > thr) if thr is not None else None,
                    noise_threshold=thr,
                )
            if base_loss is not None and all_drop:
                drop = base_loss - card["test_loss"]
                entry["card_drop"] = drop
                entry["card_fraction_of_all30"] = drop / all_drop
                entry["card_gap_to_all30_pct"] = 100 * (all_drop - drop) / all_drop
            a = out["all30"]
            if a["s_per_step"] and card["s_per_step"]:
                entry["card_s_per_step_rel_all30"] = card["s_per_step"] / a["s_per_step"]
            if a["peak_memory_mib"] and card["peak_memory_mib"]:
                entry["card_peak_memory_rel_all30"] = card["peak_memory_mib"] / a["peak_memory_mib"]
        entry["table"] = table
        out["budgets"][str(b)] = entry
    return out


def placement_prediction(
    rows: list[dict[str, Any]], bench: Bench, task: str, base: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Predicted set gain (every score, coupled as in §4) vs measured drop over a task's placements."""
    from layercard.card.stats import set_gain

    card = bench.card(task, compute=False)
    if card is None or base is None:
        return None
    seen: dict[tuple[int, ...], float] = {}
    for r in rows:
        if r["task"] == task and r["group"] == "grid" and r["status"] == "done" and r["train_seed"] == 0:
            seen.setdefault(tuple(r["layers"]), base["eval"]["test_loss"] - r["test_loss"])
    if len(seen) < 3:
        return None
    n = card.n_layers
    c = np.eye(n)
    if card.coupling is not None:
        idx = [int(x) for x in card.coupling["layers"]]
        c[np.ix_(idx, idx)] = np.asarray(card.coupling["matrix"], dtype=np.float64)
    sets = list(seen)
    measured = [seen[k] for k in sets]
    out: dict[str, Any] = {"n_placements": len(sets), "variants": {}}
    for v in variants(bench.s):
        g = v.layer_scores(card)
        coupled = [set_gain(g[list(S)], c[np.ix_(list(S), list(S))]) for S in sets]
        additive = [float(np.clip(g[list(S)], 0, None).sum()) for S in sets]
        out["variants"][v.name] = {
            "spearman_coupled": _spearman(coupled, measured),
            "spearman_additive": _spearman(additive, measured),
        }
    return out


def _trim_summary(bench: Bench, task: str, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    from layercard.artifacts import read_json

    r = next(
        (
            x
            for x in rows
            if x["task"] == task and x["policy"] == "all" and x["group"] == "grid" and x["status"] == "done"
        ),
        None,
    )
    if r is None:
        return None
    folder = bench.trim_dir(task, r["run"])
    if not (folder / "trim.json").is_file():
        return None
    t = read_json(folder / "trim.json")
    ev = read_json(folder / "eval_trimmed.json")["eval"] if (folder / "eval_trimmed.json").is_file() else None
    return {
        "chosen_k": t["chosen_k"],
        "candidates": t["candidates"],
        "ks": t["ks"],
        "metric": t["metric"],
        "layers_before": len(t["adapted_layers"]),
        "layers_after": len([k for k in t["adapted_layers"] if k <= t["chosen_k"]]),
        "modules_before": len(t["adapted_modules_before"]),
        "modules_after": len(t["adapted_modules_after"]),
        "selection_set": {
            "n": t["task"]["n_examples"],
            "before": t["before"]["metrics"],
            "after": t["after"]["metrics"],
            "loss_before": t["before"]["loss"],
            "loss_after": t["after"]["loss"],
            "s_per_example_before": t["before"]["s_per_example"],
            "s_per_example_after": t["after"]["s_per_example"],
        },
        "test": {
            "before": {"test_loss": r["test_loss"], "metric": r.get("metric")},
            "after": {"test_loss": ev["test_loss"], "metric": ev.get("metric")} if ev else None,
        },
    }


def _has_texts(res: dict[str, Any]) -> bool:
    """Whether the run result holds dataset texts (sample references written by older runs)."""
    return any("reference" in x for x in res.get("eval", {}).get("samples") or [])


def _without_texts(res: dict[str, Any]) -> dict[str, Any]:
    """The run result without dataset texts (sample references written by older runs)."""
    if _has_texts(res):
        res["eval"]["samples"] = [
            {k: v for k, v in x.items() if k != "reference"} for x in res["eval"]["samples"]
        ]
    return res


def scrub_ledger(results: Path) -> int:
    """Drop dataset texts (sample references) that older runs wrote into the committed ledger."""
    from layercard.artifacts import read_json, write_json

    n = 0
    for f in sorted((results / "placement_runs").glob("*.json")):
        res = read_json(f)
        if _has_texts(res):
            write_json(f, _without_texts(res))
            n += 1
    return n


def report(bench: Bench, est: dict[str, Any] | None) -> dict[str, Any]:
    """Collect every cached result into RESULTS/placement.{json,md} and the PNG plots."""
    from layercard.artifacts import machine_info, package_versions, read_json, write_json, write_text

    s = bench.s
    measured = bench.measured_on() or [{"machine": machine_info(), "versions": package_versions()}]
    scrubbed = scrub_ledger(bench.results)
    if scrubbed:
        print(f"report: removed dataset texts from {scrubbed} ledger files")
    rows, bases = bench.rows()
    frozen = bench.frozen()
    confirm = read_json(bench.results / CONFIRM_FILE) if (bench.results / CONFIRM_FILE).is_file() else None
    spearman = {t: bench.spearman_table(t) for t in bench.task_names if bench.card(t, compute=False)}
    seeds_noise = [seed_stats(rows, s, t)["noise"] for t in bench.task_names if s.task(t).grid == "full"]
    # Borrowed only for the loss: the tasks' metrics have different units (BLEU, accuracy, ROUGE).
    ref = {
        "test_loss": max(
            [n["test_loss"] for n in seeds_noise if n.get("test_loss") is not None], default=None
        ),
        "metric": None,
    }
    summary = {t: task_summary(rows, bases.get(t), s, t, ref) for t in bench.task_names if bases.get(t)}
    for t, sm in summary.items():
        base = bases[t]
        all_drop = sm["all30_drop"]
        for r in rows:
            if r["task"] == t and r["status"] == "done":
                r["drop"] = base["eval"]["test_loss"] - r["test_loss"]
                r["fraction_of_all30"] = r["drop"] / all_drop if all_drop else None
    prediction = {t: placement_prediction(rows, bench, t, bases.get(t)) for t in bench.task_names}
    trims = {t: _trim_summary(bench, t, rows) for t in bench.task_names}
    cards = {}
    for t in bench.task_names:
        card = bench.card(t, compute=False)
        if card is not None:
            meta = read_json(bench.root / "cards" / t / "meta.json")
            cards[t] = {
                "timings": card.timings,
                "loss": card.loss,
                "n_target_tokens": card.n_target_tokens,
                "code_hash": meta.get("code_hash"),
                "cost_model": card.cost,
            }
    status = {k: sum(r["status"] == k for r in rows) for k in ("done", "missing", "no_plan")}
    code_now = _card_code_hash()
    changes: list[dict[str, Any]] = list(frozen.get("history", [])) if frozen else []
    code_note = None
    if frozen and frozen.get("card_code_hash") != code_now:
        code_note = (
            "the card's code changed after the default score was frozen: re-run `select --refreeze "
            "--reason ...` so the change is listed with its before/after numbers"
        )
    out = {
        "kind": "placement_benchmark",
        "created": _now(),
        "settings": s.to_dict(),
        "why": why(s),
        "machine": measured[0]["machine"],
        "versions": measured[0]["versions"],
        "measured_on": measured,
        "estimate": est,
        "status": status,
        "frozen_default": frozen,
        "confirm": confirm,
        "spearman_single_layer": spearman,
        "spearman_placements": prediction,
        "summary": summary,
        "trim": trims,
        "cards": cards,
        "changes_after_results": changes,
        "card_code_hash": code_now,
        "card_code_note": code_note,
        "base": {t: (b["eval"] if b else None) for t, b in bases.items()},
        "rows": rows,
    }
    bench.results.mkdir(parents=True, exist_ok=True)
    write_json(bench.results / "placement.json", out)
    write_text(bench.results / "placement.md", markdown(out, bench))
    plots(out, bench)
    print(
        f"report: {status['done']} placements measured, {status['missing']} missing, "
        f"{status['no_plan']} without placement → {bench.results / 'placement.md'}"
    )
    return out


def _md_table(head: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(sep) + " |",
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows),
        "",
    ]


def markdown(out: dict[str, Any], bench: Bench) -> str:
    """The results as markdown tables, with a plain statement wherever `card` does not win."""
    s = bench.s
    st = out["status"]
    frozen = out["frozen_default"]
    L: list[str] = [f"# Placement benchmark — {s.model}", ""]
    total = st["done"] + st["missing"]
    if st["missing"]:
        L += [
            f"**Partial results: {st['done']} of {total} placements measured, {st['missing']} missing.** "
            "Missing runs show as –; rankings below cover only what was measured.",
            "",
        ]
    if s.dry_run:
        L += [
            "**Dry run (`--dry-run-tiny`): a tiny random model on synthetic data, 2 steps. The numbers "
            "exercise the control flow and mean nothing.**",
            "",
        ]
    L += [f"Generated {out['created']}; measured on:", ""]
    for e in out.get("measured_on") or [{"machine": out["machine"], "versions": out["versions"]}]:
        m = e["machine"]
        L += [
            "- "
            + (f"{m['cuda_device']} · " if m.get("cuda_device") else "")
            + f"{m.get('processor')} · {m.get('cpu_count')} cores · torch threads {m.get('torch_threads')} · "
            + ", ".join(f"{k} {v}" for k, v in e["versions"].items())
        ]
    L += [""]

    L += ["## Settings and why", ""]
    L += _md_table(
        [
            "task",
            "train on",
            "evaluate on",
            "batch",
            "max tokens",
            "prompt cap",
            "loss ex.",
            "metric ex.",
            "new tokens",
            "trim ex.",
        ],
        [
            [
                t.name,
                f"{t.train_spec}:{t.train_split}",
                f"{t.test_spec}:{t.test_split}",
                t.batch_size,
                t.max_length,
                t.max_input_tokens or "preset",
                t.loss_examples,
                t.gen_examples,
                t.max_new_tokens,
                t.trim_examples,
            ]
            for t in s.tasks
        ],
        "lllrrrrrrr",
    )
    L += [
        f"Every run: LoRA r={s.rank}, α={s.alpha:g} on {s.roles}; AdamW lr {s.lr:g}, constant; "
        f"{s.steps} steps; "
        f"training seed {s.seed} (repeats: {', '.join(map(str, s.repeat_seeds))}); a seeded subset of "
        f"{s.train_examples} training examples; card on {s.card_examples} training examples.",
        "",
    ]
    L += [f"- {w}" for w in out["why"]] + [f"- {t.name}: {t.why}" for t in s.tasks if t.why] + [""]
    est = out.get("estimate")
    if est:
        L += [
            f"Planned: {est['runs']} runs, estimated {est['hours']:.2f} h on 2 CPU cores "
            "(`--estimate`; constants in the JSON).",
            "",
        ]

    if out["cards"]:
        body = []
        for t, c in out["cards"].items():
            tm, cm = c["timings"], c.get("cost_model") or {}
            body.append(
                [
                    t,
                    _f(tm.get("total_s"), ".0f"),
                    _f(tm.get("probe_s"), ".0f"),
                    _f(tm.get("coupling_s"), ".0f"),
                    _f(tm.get("calibrate_s"), ".0f"),
                    _f(cm.get("intercept_s"), ".2f"),
                    _f(cm.get("per_layer_backward_s"), ".3f"),
                    _f(cm.get("per_module_s"), ".4f"),
                ]
            )
        L += ["Cards (seconds; cost model t = a + b·(30 − min S) + c·modules at the card's batch):", ""]
        L += _md_table(["task", "card s", "probe s", "coupling s", "calibration s", "a", "b", "c"], body)
    L += [
        "## Protocol",
        "",
        f"1. Single-layer runs at layers {', '.join(map(str, s.single_layers))} on every task; "
        "measured gain = "
        "base test loss − test loss after training that layer alone.",
        f"2. On {' and '.join(s.select_tasks)} only: Spearman of each predicted-gain score with those "
        "gains; the "
        "best mean is frozen (`placement_default_score.json`) and never replaced without `--refreeze`, which "
        "records the before/after numbers.",
        f"3. The frozen score is reported unchanged on {' and '.join(s.confirm_tasks)}.",
        "4. The card policies of the budget grid use the frozen score.",
        "5. A difference between two policies counts as real only when it exceeds the spread (max − min) "
        "over 3 training seeds of the repeated policies on that task (gsm8k and samsum have no repeats: the "
        "largest spread of the other two tasks is used).",
        "",
    ]

    L += ["## 1. Does the card predict? Single-layer runs", ""]
    if frozen:
        v = frozen["variant"]
        L += [
            f"**Frozen default score: `{v['name']}`** "
            f"(mean Spearman {_f(frozen['mean_spearman'], '+.3f')} on "
            f"{', '.join(frozen['selected_on'])}; frozen {frozen['created']})"
            + (
                f", adopted from {frozen['frozen_by']}: the mean is the CPU runs'."
                if frozen.get("frozen_by")
                else "."
            )
            + (" Here every task's Spearman is a confirmation." if s.profile == "gpu" else ""),
            "",
        ]
    else:
        L += ["No default score frozen yet (`select` has not run).", ""]
    sp = out["spearman_single_layer"]
    tasks = [t for t in bench.task_names if sp.get(t)]
    if tasks:
        names = [v.name for v in variants(s)]
        sel = [t for t in s.select_tasks if t in tasks]
        conf = [t for t in s.confirm_tasks if t in tasks]
        head = ["score", *tasks, "mean (select)", "mean (confirm)"]
        body = []
        for n in names:
            vals = {t: sp[t]["variants"][n]["spearman"] for t in tasks}
            ms = _mean([vals[t] for t in sel]) if sel and all(vals[t] is not None for t in sel) else None
            mc = _mean([vals[t] for t in conf]) if conf and all(vals[t] is not None for t in conf) else None
            star = " **(frozen)**" if frozen and frozen["variant"]["name"] == n else ""
            body.append(
                [f"`{n}`{star}", *(_f(vals[t], "+.3f") for t in tasks), _f(ms, "+.3f"), _f(mc, "+.3f")]
            )
        L += [
            "Spearman of each score (per layer, q+v) with the measured single-layer test-loss drop (n = "
            f"{len(s.single_layers)} layers per task). Selection used only "
            f"{', '.join(s.select_tasks)}; the confirm columns were not looked at when choosing.",
            "",
        ]
        L += _md_table(head, body)
        if frozen:
            fz = frozen["variant"]["name"]
            for t in conf:
                rho = sp[t]["variants"][fz]["spearman"]
                L += [f"- Confirmation on {t}: frozen `{fz}` Spearman **{_f(rho, '+.3f')}**."]
            L += [""]
        head = ["layer", *(f"{t} drop" for t in tasks)]
        layers = sorted({k for t in tasks for k in sp[t]["layers"]})
        body = [
            [
                k,
                *(
                    _f(dict(zip(sp[t]["layers"], sp[t]["measured_drop"], strict=True))[k], ".4f")
                    if k in sp[t]["layers"]
                    else "–"
                    for t in tasks
                ),
            ]
            for k in layers
        ]
        L += ["Measured single-layer test-loss drops:", ""] + _md_table(head, body)
    pp = {t: p for t, p in out["spearman_placements"].items() if p}
    if pp:
        L += [
            "Predicted set gain (§4, coupled) vs measured loss drop over each task's distinct placements "
            "(budget grid, training seed 0): Spearman, coupled / additive.",
            "",
        ]
        names = [v.name for v in variants(s)]
        head = ["score", *(f"{t} (n={p['n_placements']})" for t, p in pp.items())]
        body = [
            [
                f"`{n}`",
                *(
                    f"{_f(p['variants'][n]['spearman_coupled'], '+.2f')} / "
                    f"{_f(p['variants'][n]['spearman_additive'], '+.2f')}"
                    for p in pp.values()
                ),
            ]
            for n in names
        ]
        L += _md_table(head, body)

    L += ["## 2. Placement at a budget", ""]
    for t in bench.task_names:
        sm = out["summary"].get(t)
        if not sm:
            L += [f"### {t}", "", "No base-model result yet.", ""]
            continue
        b = sm["base"]
        mname = b.get("metric_name") or "metric"
        a = sm["all30"]
        L += [
            f"### {t}",
            "",
            f"Base model: test loss {_f(b['test_loss'], '.4f')}, {mname} {_f(b['metric'], '.4f')}. "
            f"All-30: test loss {_f(a['test_loss'], '.4f')}, {mname} {_f(a['metric'], '.4f')}, "
            f"{_f(a['s_per_step'], '.2f')} s/step, {_f(a['peak_memory_mib'], '.0f')} MiB, "
            f"{_f(int(a['trainable_params']) if a['trainable_params'] else None, ',')} trainable params.",
            "",
        ]
        rows = sorted(
            (r for r in out["rows"] if r["task"] == t and r["group"] == "grid"),
            key=lambda r: (r["budget"] or 99, _POLICY_ORDER.index(r["policy"]), r["plan_seed"]),
        )
        body = []
        for r in rows:
            pol = r["policy"] + (f" (seed {r['plan_seed']})" if r["policy"] == "random" else "")
            pr = r.get("predicted") or {}
            body.append(
                [
                    r["budget"] or "all",
                    pol,
                    _layers_text(r.get("layers", [])) if r.get("layers") else "–",
                    _f(r.get("trainable_params"), ","),
                    _f(r.get("s_per_step"), ".2f"),
                    _f(r.get("peak_memory_mib"), ".0f"),
                    _f(r.get("test_loss"), ".4f"),
                    _f(r.get("metric"), ".4f"),
                    _f(r.get("drop"), ".4f"),
                    _f(100 * r["fraction_of_all30"], ".0f")
                    if r.get("fraction_of_all30") is not None
                    else "–",
                    _f(pr.get("fraction"), ".2f"),
                    r["status"] if r["status"] != "done" else "",
                ]
            )
        L += _md_table(
            [
                "budget",
                "policy",
                "layers",
                "params",
                "s/step",
                "peak MiB",
                "test loss",
                mname,
                "loss drop",
                "% of all-30",
                "pred. fraction",
                "status",
            ],
            body,
            "llllrrrrrrrl",
        )
        for bud, e in sm["budgets"].items():
            L += [_verdict(t, bud, e)]
        L += [""]

    L += ["## 3. Training-seed spread", ""]
    body = []
    for t in bench.task_names:
        sm = out["summary"].get(t)
        if not sm or s.task(t).grid != "full":
            continue
        for p, e in sm["seeds"]["policies"].items():
            tl, mt = e.get("test_loss", {}), e.get("metric", {})
            body.append(
                [
                    t,
                    p,
                    e["n"],
                    f"{_f(tl.get('mean'), '.4f')} ± {_f(tl.get('std'), '.4f')}",
                    _f(tl.get("range"), ".4f"),
                    f"{_f(mt.get('mean'), '.4f')} ± {_f(mt.get('std'), '.4f')}",
                    _f(mt.get("range"), ".4f"),
                ]
            )
    if body:
        L += _md_table(
            [
                "task",
                "policy (budget 8 / all)",
                "seeds",
                "test loss mean ± sd",
                "range",
                "metric mean ± sd",
                "range",
            ],
            body,
        )
        for t in bench.task_names:
            sm = out["summary"].get(t)
            if sm and sm.get("noise"):
                L += [
                    f"- {t}: noise threshold (test loss) {_f(sm['noise'].get('test_loss'), '.4f')}, "
                    + (
                        f"(metric) {_f(sm['noise'].get('metric'), '.4f')}"
                        if sm["noise"].get("metric") is not None
                        else "(metric) not known without repeats on this task"
                    )
                    + f" — {sm['noise_source']}."
                ]
            sd = (sm or {}).get("seed_means")
            if sd:
                real = {True: "beyond", False: "within", None: "no"}[sd["difference_real"]]
                who = (
                    f"`card` beats `{sd['best_other']}` by {_f(-sd['loss_diff_vs_best_other'], '.4f')}"
                    if sd["loss_diff_vs_best_other"] < 0
                    else f"**`card` does not win**: `{sd['best_other']}` is better by "
                    f"{_f(sd['loss_diff_vs_best_other'], '.4f')}"
                )
                L += [
                    f"  - {t}, means over seeds at budget {s.repeat_budget}: {who} ({real} the seed spread); "
                    f"card's gap to all-30 {_f(sd.get('card_gap_to_all30_pct'), '.0f')}% of its improvement."
                ]
        L += [""]
    else:
        L += ["No seed repeats yet.", ""]

    L += ["## 4. Summary: the numbers for the closing note", ""]
    body = []
    for t in bench.task_names:
        sm = out["summary"].get(t)
        for bud, e in (sm or {}).get("budgets", {}).items():
            body.append(
                [
                    t,
                    bud,
                    f"{e.get('card_rank_loss', '–')}/{e['n_policies']}",
                    f"{e.get('card_rank_metric', '–')}/{len(e['ranking_metric'])}",
                    _f(e.get("card_gap_to_all30_pct"), ".0f"),
                    _f(e.get("card_s_per_step_rel_all30"), ".2f"),
                    _f(e.get("card_peak_memory_rel_all30"), ".2f"),
                    {True: "yes", False: "no", None: "–"}[e.get("card_wins")],
                    {True: "yes", False: "no", None: "–"}[e.get("difference_real")],
                ]
            )
    L += _md_table(
        [
            "task",
            "budget",
            "card rank (loss)",
            "card rank (metric)",
            "gap to all-30 (% of its drop)",
            "s/step vs all-30",
            "peak mem vs all-30",
            "card best?",
            "beyond seed spread?",
        ],
        body,
    )

    L += ["## 5. Trimming the all-30 runs", ""]
    body = []
    for t, tr in out["trim"].items():
        if not tr:
            continue
        sel, te = tr["selection_set"], tr["test"]
        body.append(
            [
                t,
                tr["chosen_k"],
                f"{tr['layers_before']} → {tr['layers_after']}",
                f"{tr['modules_before']} → {tr['modules_after']}",
                f"{_f(te['before']['test_loss'], '.4f')} → {_f((te['after'] or {}).get('test_loss'), '.4f')}",
                f"{_f(te['before']['metric'], '.4f')} → {_f((te['after'] or {}).get('metric'), '.4f')}",
                f"{_f(sel['s_per_example_before'], '.3f')} → {_f(sel['s_per_example_after'], '.3f')}",
            ]
        )
    if body:
        L += [
            "Boundary chosen on held-out test examples (disjoint from the evaluation subsets) by the task "
            "metric; test numbers on the same subsets as every other run.",
            "",
        ]
        L += _md_table(
            ["task", "K", "layers", "modules", "test loss", "metric", "s/example (selection set)"], body
        )
    else:
        L += ["No trims yet.", ""]

    L += ["## 6. Changes made after seeing results", ""]
    if out["changes_after_results"]:
        for c in out["changes_after_results"]:
            L += [
                f"- {c['date']}: default score `{c['before']['variant']['name']}` (mean "
                f"{_f(c['before']['mean_spearman'], '+.3f')}) → `{c['after']['variant']['name']}` (mean "
                f"{_f(c['after']['mean_spearman'], '+.3f')}); reason: {c['reason']}. Card code "
                f"{str(c['before'].get('card_code_hash'))[:12]} → "
                f"{str(c['after'].get('card_code_hash'))[:12]}."
            ]
        L += [""]
    else:
        L += ["None: the default score was frozen once and the card's definitions did not change since.", ""]
    if out["card_code_note"]:
        L += [f"**Warning: {out['card_code_note']}.**", ""]

    if s.profile == "gpu":
        L += [
            "## Reproduce",
            "",
            "One process per task (cards, single, policies, trim; the four share the GPU), then `confirm` "
            "and `report`; resumable:",
            "",
            "```",
            "benchmarks/placement_gpu.sh",
            "```",
            "",
        ]
        return "\n".join(L) + "\n"
    L += [
        "## Reproduce",
        "",
        "```",
        ".venv/bin/python benchmarks/placement.py --estimate",
        ".venv/bin/python benchmarks/placement.py all            # resumable; or phase by phase:",
        ".venv/bin/python benchmarks/placement.py cards",
        ".venv/bin/python benchmarks/placement.py single --limit-runs 10   # a slice per sitting",
        ".venv/bin/python benchmarks/placement.py select",
        ".venv/bin/python benchmarks/placement.py confirm",
        ".venv/bin/python benchmarks/placement.py policies --tasks e2e_nlg,sst2",
        ".venv/bin/python benchmarks/placement.py policies --tasks gsm8k,samsum",
        ".venv/bin/python benchmarks/placement.py trim",
        ".venv/bin/python benchmarks/placement.py report",
        "```",
        "",
    ]
    return "\n".join(L) + "\n"


def _verdict(task: str, budget: str, e: dict[str, Any]) -> str:
    """One plain sentence per budget on whether `card` won, and whether the margin is beyond noise."""
    if "card_rank_loss" not in e:
        return f"- budget {budget}: no `card` result yet."
    thr = e.get("noise_threshold")
    d = e.get("loss_diff_vs_best_other")
    if d is None:
        return f"- budget {budget}: `card` is the only policy measured so far."
    real = e.get("difference_real")

    def judged(if_real: str, if_noise: str) -> str:
        if thr is None:
            return "no seed spread measured yet, so whether it is real is not known"
        return f"seed spread {_f(thr, '.4f')}: {if_real if real else if_noise}"

    gap = e.get("card_gap_to_all30_pct")
    tail = f" Its gap to all-30 is {_f(gap, '.0f')}% of the all-30 improvement." if gap is not None else ""
    part = "" if e.get("complete") else " (not every policy measured yet)"
    if e.get("card_ties"):
        return (
            f"- budget {budget}: `card` ties with `{e['best_other']}` for the lowest test loss{part}.{tail}"
        )
    if e.get("card_wins"):
        return (
            f"- budget {budget}: `card` has the lowest test loss{part}, {_f(-d, '.4f')} below "
            f"`{e['best_other']}` ({judged('a real lead', 'within noise, so not a real win')}).{tail}"
        )
    return (
        f"- budget {budget}: **`card` does not win on {task}**{part}: `{e['best_other']}` is better by "
        f"{_f(d, '.4f')} test loss ({judged('a real difference', 'within noise')}); "
        f"`card` ranks {e['card_rank_loss']} of {e['n_policies']}.{tail}"
    )


def plots(out: dict[str, Any], bench: Bench) -> None:
    """Metric vs budget per policy; quality vs cost; predicted vs measured; Spearman per score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = bench.s
    res = bench.results
    tasks = [t for t in bench.task_names if out["summary"].get(t)]
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(_POLICY_ORDER)}
    rows = [r for r in out["rows"] if r["status"] == "done" and r["group"] == "grid"]
    if tasks:
        fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.2 * len(tasks)), squeeze=False)
        for i, t in enumerate(tasks):
            sm = out["summary"][t]
            for j, field in enumerate(("test_loss", "metric")):
                ax = axes[i][j]
                for p in _POLICY_ORDER[:-1]:
                    pts = [
                        (b, _policy_value([r for r in rows if r["task"] == t], p, b, field))
                        for b in (*s.budgets, s.small_budget)
                    ]
                    pts = sorted({(b, v) for b, v in pts if v is not None})
                    if pts:
                        ax.plot(
                            [x for x, _ in pts], [y for _, y in pts], marker="o", label=p, color=colors[p]
                        )
                va = sm["all30"].get(field)
                vb = sm["base"].get(field if field == "test_loss" else "metric")
                if va is not None:
                    ax.axhline(va, color="k", ls=":", lw=1)
                    ax.scatter([s.n_layers], [va], color="k", marker="*", s=80, label="all 30", zorder=3)
                if vb is not None:
                    ax.axhline(vb, color="grey", ls="--", lw=1, label="base")
                ticks = sorted({*(s.budgets if s.task(t).grid == "full" else (s.small_budget,)), s.n_layers})
                ax.set_xticks(ticks)
                ax.set_xlim(ticks[0] - 2, ticks[-1] + 2)
                ax.set_xlabel(f"budget (layers of {s.n_layers})")
                ax.set_ylabel(
                    "test loss" if field == "test_loss" else sm["base"].get("metric_name") or "metric"
                )
                ax.set_title(t, fontsize=9)
                ax.grid(alpha=0.3)
        axes[0][1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(res / "placement_budget.png", dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(len(tasks), 3, figsize=(13, 3.2 * len(tasks)), squeeze=False)
        for i, t in enumerate(tasks):
            tr = [r for r in rows if r["task"] == t and r.get("fraction_of_all30") is not None]
            for j, (field, lab) in enumerate(
                (
                    ("s_per_step", "s/step"),
                    ("peak_memory_mib", "peak memory MiB"),
                    ("modules", "adapted modules"),
                )
            ):
                ax = axes[i][j]
                for r in tr:
                    if r.get(field) is None:
                        continue
                    mk = {4: "o", 8: "s"}.get(r["budget"], "*")
                    ax.scatter(
                        r[field],
                        100 * r["fraction_of_all30"],
                        color=colors[r["policy"]],
                        marker=mk,
                        s=30,
                        label=r["policy"],
                    )
                ax.set_xlabel(lab)
                ax.set_ylabel("% of all-30 loss drop")
                ax.set_title(f"{t} (○ k=4, □ k=8, ★ all)", fontsize=9)
                ax.grid(alpha=0.3)
            h, lab = axes[i][0].get_legend_handles_labels()
            uniq = dict(zip(lab, h, strict=True))
            axes[i][0].legend(uniq.values(), uniq.keys(), fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(res / "placement_cost.png", dpi=110)
        plt.close(fig)

        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
        for i, t in enumerate(tasks):
            ax = axes[0][i]
            for r in rows:
                pr = (r.get("predicted") or {}).get("fraction")
                if r["task"] != t or pr is None or r.get("fraction_of_all30") is None:
                    continue
                ax.scatter(pr, r["fraction_of_all30"], color=colors[r["policy"]], s=25, label=r["policy"])
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            ax.set_xlabel("predicted fraction of all-30 gain (frozen score)")
            ax.set_ylabel("measured fraction of all-30 loss drop")
            ax.set_title(t, fontsize=9)
            ax.grid(alpha=0.3)
            h, lab = ax.get_legend_handles_labels()
            uniq = dict(zip(lab, h, strict=True))
            ax.legend(uniq.values(), uniq.keys(), fontsize=6)
        fig.tight_layout()
        fig.savefig(res / "placement_predicted.png", dpi=110)
        plt.close(fig)

    sp = {t: v for t, v in out["spearman_single_layer"].items() if v}
    if sp:
        names = [v.name for v in variants(s)]
        fig, ax = plt.subplots(figsize=(12, 4))
        w = 0.8 / len(sp)
        for i, (t, tab) in enumerate(sp.items()):
            vals = [tab["variants"][n]["spearman"] for n in names]
            ax.bar(
                np.arange(len(names)) + i * w,
                [v if v is not None else 0 for v in vals],
                w,
                label=f"{t} ({'select' if t in s.select_tasks else 'confirm'})",
            )
        fz = (out["frozen_default"] or {}).get("variant", {}).get("name")
        if fz in names:
            ax.axvspan(names.index(fz) - 0.1, names.index(fz) + 0.9, color="gold", alpha=0.25, label="frozen")
        ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Spearman with single-layer loss drop")
        ax.axhline(0, color="k", lw=0.8)
        lows = [
            v["spearman"]
            for tab in sp.values()
            for v in tab["variants"].values()
            if v["spearman"] is not None
        ]
        ax.set_ylim(min(-0.2, min(lows, default=0.0) - 0.05), 1.05)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(res / "placement_spearman.png", dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Placement benchmark (resumable; see the module docstring).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("phase", nargs="?", choices=PHASES, help="what to run (default with --estimate: nothing)")
    ap.add_argument("--tasks", help="comma-separated subset of e2e_nlg,sst2,gsm8k,samsum")
    ap.add_argument("--only", help="policies phase: only these policies (comma-separated; 'all' = all-30)")
    ap.add_argument("--groups", help="policies phase: only these job groups (grid, repeat; comma-separated)")
    ap.add_argument("--limit-runs", type=int, help="stop after this many new runs (train+eval, base or trim)")
    ap.add_argument("--refreeze", action="store_true", help="select: replace the frozen default score")
    ap.add_argument("--reason", help="select --refreeze: why (recorded with the before/after numbers)")
    ap.add_argument("--estimate", action="store_true", help="print the planned runs and expected hours")
    ap.add_argument(
        "--dry-run-tiny", action="store_true", help="tiny random model + synthetic tasks, 2 steps"
    )
    ap.add_argument(
        "--profile",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: the 2-core grid (default); gpu: 120 steps, more examples (results/gpu-DEVICE)",
    )
    ap.add_argument(
        "--root", type=Path, help="run cache folder (default runs/placement or runs/placement-dry)"
    )
    ap.add_argument(
        "--results", type=Path, help="results folder (default benchmarks/results, dry run: ROOT/results)"
    )
    args = ap.parse_args()
    if args.phase is None and not args.estimate:
        ap.error("give a phase, or --estimate")
    return args


def main() -> None:
    args = _parse()
    gpu = args.profile == "gpu" and not args.dry_run_tiny
    settings = tiny_settings() if args.dry_run_tiny else gpu_settings() if gpu else real_settings()
    root = args.root or (DRY_ROOT if args.dry_run_tiny else GPU_ROOT if gpu else ROOT)
    results = args.results or (root / "results" if args.dry_run_tiny else _gpu_results() if gpu else RESULTS)
    if gpu:
        _adopt_frozen(results)
    names = [t.name for t in settings.tasks]
    tasks = names if not args.tasks else [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        settings.task(t)
    only = {p.strip() for p in args.only.split(",")} if args.only else None
    if only:
        bad = only - set(FULL_POLICIES) - {"all"}
        if bad:
            raise SystemExit(
                f"--only: unknown policies {sorted(bad)}; valid: {', '.join(FULL_POLICIES)}, all"
            )
    groups = {g.strip() for g in args.groups.split(",") if g.strip()} if args.groups else None
    if groups and groups - {"grid", "repeat"}:
        raise SystemExit(f"--groups: unknown {sorted(groups - {'grid', 'repeat'})}; valid: grid, repeat")
    os.environ.setdefault("LAYERCARD_PROGRESS", "0")
    shared = REPO.parent / "shared" / "data"
    if shared.is_dir():  # PRESET:SPLIT specs resolve from any working directory
        os.environ.setdefault("LAYERCARD_DATA", str(shared))
    if args.phase is not None:
        _fix_malloc()
    bench = Bench(settings, root, results, tasks=tasks, only=only, groups=groups, limit_runs=args.limit_runs)

    est = None
    if args.estimate or (args.phase in ("report", "all") and not gpu):  # the cost model is the CPU's
        tok = bench.loaded.tokenizer if args.phase else _tokenizer(settings, root)
        est = estimate(settings, token_stats(settings, tok))
        if args.estimate:
            print_estimate(est)
    if args.phase is None:
        return
    t0 = time.perf_counter()
    phases = (
        ["cards", "single", "select", "confirm", "policies", "trim", "report"]
        if args.phase == "all"
        else [args.phase]
    )
    try:
        for ph in phases:
            print(f"== {ph} ==", flush=True)
            if ph == "cards":
                bench.phase_cards()
            elif ph == "single":
                bench.phase_single()
            elif ph == "select":
                if args.phase == "all" and bench.frozen() is not None:
                    print(f"select: frozen default {bench.frozen()['variant']['name']} kept")  # type: ignore[index]
                else:
                    bench.phase_select(refreeze=args.refreeze, reason=args.reason)
            elif ph == "confirm":
                bench.phase_confirm()
            elif ph == "policies":
                bench.phase_policies()
            elif ph == "trim":
                bench.phase_trim()
            elif ph == "report":
                bench.task_names = tuple(names)  # the report always covers every task's cached results
                report(bench, est)
    except StopBench as e:
        print(
            f"stopped: {e}; {bench.new_runs} new runs this sitting. Re-run the same command to continue, "
            "then `report`."
        )
    print(
        f"done in {(time.perf_counter() - t0) / 60:.1f} min; {bench.new_runs} new runs; base-model checks "
        f"{bench.checks['cheap']} cheap + {bench.checks['full']} full, all equal"
    )


def _gpu_results() -> Path:
    """RESULTS/gpu-<device>, e.g. gpu-h100-80gb-hbm3: results are labelled by the GPU they ran on."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--profile gpu: no CUDA device here; pass --results DIR to name the results folder")
    name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return RESULTS / f"gpu-{name.removeprefix('nvidia-')}"


def _adopt_frozen(results: Path) -> None:
    """The GPU profile reports the score the CPU profile froze; it never selects one of its own."""
    from layercard.artifacts import read_json, write_json

    mine, cpu = results / FROZEN_FILE, RESULTS / FROZEN_FILE
    if mine.is_file():
        return
    if not cpu.is_file():
        raise SystemExit(f"--profile gpu: {cpu} is missing; run the CPU profile's `select` first")
    frozen = read_json(cpu)
    frozen["frozen_by"] = "the CPU profile's select (benchmarks/results/placement_default_score.json)"
    write_json(mine, frozen)
    print(f"adopted the CPU profile's frozen default score {frozen['variant']['name']} → {mine}")


def _tokenizer(settings: Settings, root: Path) -> Any:
    """The model's tokenizer without loading its weights (for --estimate)."""
    from transformers import AutoTokenizer

    if settings.dry_run:
        return AutoTokenizer.from_pretrained(build_tiny_model(root / "tiny-model", settings.n_layers))
    from layercard.models import builtin_path

    return AutoTokenizer.from_pretrained(builtin_path(settings.model))


if __name__ == "__main__":
    main()
