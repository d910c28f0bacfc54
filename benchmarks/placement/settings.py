"""What decides the placement benchmark's numbers: its profiles (CPU, GPU, the tiny dry run) and paths."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]  # benchmarks/
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
POLICY_ORDER = (*FULL_POLICIES, "all")
FROZEN_FILE = "placement_default_score.json"
MEASURED_FILE = "placement_measured_on.json"
CONFIRM_FILE = "placement_confirm.json"
REPORT_JSON = "placement.json"
REPORT_MD = "placement.md"
RUNS_LEDGER = "placement_runs"  # RESULTS/placement_runs/<run key>.json: every finished run (committed)
TRIMS_LEDGER = "placement_trims"  # RESULTS/placement_trims/<task>-<run key[:16]>.json: every trim
CARDS_SAVED = "placement_cards"  # RESULTS/placement_cards/<task>/{card,meta}.json


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
        """The named task's setting; an unknown name ends the script with the valid ones."""
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


# The reasons below are quoted in the committed reports (RESULTS/placement.md): a change of wording here
# is a change of those reports, to be regenerated (`placement.py report`) and committed with it.
def why(s: Settings) -> list[str]:
    """The reasons for the shared settings, in words (the per-task ones are in ``TaskSetting.why``)."""
    lora = f"LoRA r={s.rank}, α={s.alpha:g} on {s.roles} (the card's roles), AdamW lr {s.lr:g} constant, "
    if s.profile == "gpu":
        head = [
            lora + "no warm-up: the pilot's lr (at batch 8); batches are 8 (e2e_nlg, sst2) and 4 "
            "(gsm8k, samsum), twice the CPU profile's.",
            f"{s.steps} steps for every run (policies and single layers alike), 3.3× the CPU profile's, with "
            "4-8× its test examples and a 4× larger card. The default score is the one the CPU profile "
            "froze (selected on its e2e_nlg and sst2 single-layer runs), reported unchanged on all four "
            "tasks here. Each task ran in its own process, the four sharing the GPU, so s/step compares "
            "policies within a task only.",
        ]
    else:
        head = [
            lora + "no warm-up: the pilot placement runs used lr 1e-3 at batch 8 for 60 steps; the lr is "
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
