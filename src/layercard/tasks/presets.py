"""Prompt formats per task: wording, metrics and length limits.

A :class:`TaskFormat` is everything about a task except its examples. Limits come from SmolLM2 token
counts on the shipped data (prompt = rendered chat template incl. SmolLM2's default system prompt;
target = text + turn-end token), median / 95th pct / max:

=================  ===============  ===============  =======================================
task (split)       prompt           target           limits in / target / new
=================  ===============  ===============  =======================================
e2e_nlg (val)      81 / 90 / 90     31 / 44 / 67     128 / 80 / 64
gsm8k (train)      116 / 161 / 283  114 / 233 / 455  256 / 320 / 256 (0.5% of targets cut)
samsum (val)       162 / 406 / 771  24 / 56 / 77     640 / 96 / 80 (0.6% of prompts cut)
sst2 (val)         76 / 95 / 112    2 / 2 / 2        160 / 4 / 4
facts (test)       59 / 63 / 64     3 / 4 / 5        96 / 24 / 16
format (test)      58 / 62 / 63     19 / 20 / 21     96 / 32 / 24
=================  ===============  ===============  =======================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layercard.errors import LayercardError
from layercard.tasks.metrics import METRICS

__all__ = [
    "DATASET_PRESETS",
    "PRESETS",
    "TRAIN_TURNS",
    "TaskFormat",
    "detect_preset",
    "get_preset",
    "shipped_splits",
]

# which assistant turns of a conversation carry loss: every one, or the final reply alone
TRAIN_TURNS = ("all", "last")


@dataclass(frozen=True)
class TaskFormat:
    """How a task is prompted and scored.

    ``instruction`` is the user message, with ``{input}`` where the example's input goes.
    ``metrics[0]`` is the task's primary metric. ``max_input_tokens`` bounds the rendered prompt
    (cut from the left of the input), ``max_target_tokens`` the target (cut from the right),
    ``max_new_tokens`` generation at evaluation. ``chat_template``: render the prompt with the
    tokenizer's chat template (off, or a tokenizer without one: ``"{system}\n\n{instruction}\n"``).
    ``completion``: plain-text data, no prompt at all; the loss covers the whole text (the target).
    ``train_turns``: which assistant turns of chat data carry loss, ``all`` or ``last`` (the final
    reply alone; the earlier ones are context).
    """

    name: str
    instruction: str
    metrics: tuple[str, ...]
    max_input_tokens: int
    max_target_tokens: int
    max_new_tokens: int
    system: str | None = None
    chat_template: bool = True
    completion: bool = False
    train_turns: str = "all"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise LayercardError(f"TaskFormat.name: must be a non-empty string, got {self.name!r}")
        if not isinstance(self.instruction, str) or "{input}" not in self.instruction:
            raise LayercardError(
                f"TaskFormat.instruction: must contain the placeholder '{{input}}', got {self.instruction!r}"
            )
        metrics = tuple(self.metrics) if not isinstance(self.metrics, str) else (self.metrics,)
        object.__setattr__(self, "metrics", metrics)
        if not metrics:
            raise LayercardError("TaskFormat.metrics: needs at least one metric (the first is primary)")
        for m in metrics:
            if m not in METRICS:
                raise LayercardError(f"TaskFormat.metrics: unknown metric {m!r}; valid: {', '.join(METRICS)}")
        for field in ("max_input_tokens", "max_target_tokens", "max_new_tokens"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise LayercardError(f"TaskFormat.{field}: must be a positive integer, got {value!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise LayercardError(f"TaskFormat.system: must be a string or None, got {self.system!r}")
        for field in ("chat_template", "completion"):
            if not isinstance(getattr(self, field), bool):
                value = getattr(self, field)
                raise LayercardError(f"TaskFormat.{field}: must be true or false, got {value!r}")
        if self.completion and self.chat_template:
            raise LayercardError(f"TaskFormat {self.name!r}: plain-text completion uses no chat template")
        if self.train_turns not in TRAIN_TURNS:
            raise LayercardError(
                f"TaskFormat.train_turns: must be one of {', '.join(TRAIN_TURNS)}, got {self.train_turns!r}"
            )

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def render_instruction(self, text: str) -> str:
        """The user message for one input (``str.replace``, so braces in the input are safe)."""
        return self.instruction.replace("{input}", text)

    def prompt(self) -> dict[str, object]:
        """The settings that decide the prompt text and what carries loss: template, system prompt, chat
        template on/off, and the trained turns where not all of them."""
        d: dict[str, object] = {"template": self.instruction, "system": self.system}
        d["chat_template"] = self.chat_template
        if self.train_turns != "all":  # only then: prompts recorded before it existed read the same
            d["train_turns"] = self.train_turns
        return d

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "name": self.name,
            "instruction": self.instruction,
            "metrics": list(self.metrics),
            "max_input_tokens": self.max_input_tokens,
            "max_target_tokens": self.max_target_tokens,
            "max_new_tokens": self.max_new_tokens,
            "system": self.system,
        }
        # Written only when not at their defaults, so a format recorded before they existed (and the
        # identities hashed from it) reads back the same.
        if not self.chat_template:
            d["chat_template"] = False
        if self.completion:
            d["completion"] = True
        if self.train_turns != "all":
            d["train_turns"] = self.train_turns
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> TaskFormat:
        try:
            return cls(
                name=d["name"],  # type: ignore[arg-type]
                instruction=d["instruction"],  # type: ignore[arg-type]
                metrics=tuple(d["metrics"]),  # type: ignore[arg-type]
                max_input_tokens=d["max_input_tokens"],  # type: ignore[arg-type]
                max_target_tokens=d["max_target_tokens"],  # type: ignore[arg-type]
                max_new_tokens=d["max_new_tokens"],  # type: ignore[arg-type]
                system=d.get("system"),  # type: ignore[arg-type]
                chat_template=d.get("chat_template", True),  # type: ignore[arg-type]
                completion=d.get("completion", False),  # type: ignore[arg-type]
                train_turns=d.get("train_turns", "all"),  # type: ignore[arg-type]
            )
        except KeyError as e:
            raise LayercardError(f"TaskFormat: field {e.args[0]!r} missing") from None


PRESETS: dict[str, TaskFormat] = {
    f.name: f
    for f in (
        TaskFormat(
            name="e2e_nlg",
            instruction=(
                "Write one sentence describing the restaurant from this meaning representation:\n{input}"
            ),
            metrics=("bleu", "rouge_l", "exact_match", "token_f1"),
            max_input_tokens=128,
            max_target_tokens=80,
            max_new_tokens=64,
        ),
        TaskFormat(
            name="gsm8k",
            instruction=(
                "Solve this math word problem. Reason step by step, then give the final answer on the "
                "last line as '#### <number>'.\n\n{input}"
            ),
            metrics=("gsm8k_accuracy", "exact_match"),
            max_input_tokens=256,
            max_target_tokens=320,
            max_new_tokens=256,
        ),
        TaskFormat(
            name="samsum",
            instruction="Summarize this conversation in one or two sentences.\n\n{input}",
            metrics=("rouge_l", "bleu", "token_f1"),
            max_input_tokens=640,
            max_target_tokens=96,
            max_new_tokens=80,
        ),
        TaskFormat(
            name="sst2",
            instruction=(
                "Is the sentiment of this movie review sentence positive or negative? "
                "Answer with one word: positive or negative.\n\n{input}"
            ),
            metrics=("label_accuracy", "exact_match"),
            max_input_tokens=160,
            max_target_tokens=4,
            max_new_tokens=4,
        ),
        TaskFormat(
            name="facts",
            instruction="Answer the question with only the name or word asked for.\n\nQuestion: {input}",
            metrics=("exact_match", "token_f1"),
            max_input_tokens=96,
            max_target_tokens=24,
            max_new_tokens=16,
        ),
        TaskFormat(
            # The instruction deliberately does not spell out the record layout: learning it is the task.
            name="format",
            instruction="Convert this sentence into a record.\n\n{input}",
            metrics=("strict_match", "exact_match", "token_f1"),
            max_input_tokens=96,
            max_target_tokens=32,
            max_new_tokens=24,
        ),
        TaskFormat(
            # the generic format of any file with input/target or Alpaca fields
            name="jsonl",
            instruction="{input}",
            metrics=("exact_match", "token_f1", "rouge_l"),
            max_input_tokens=512,
            max_target_tokens=256,
            max_new_tokens=128,
        ),
        TaskFormat(
            # chat data: the input bound is on the conversation before the final assistant turn
            name="chat",
            instruction="{input}",
            metrics=("token_f1", "rouge_l", "exact_match"),
            max_input_tokens=1024,
            max_target_tokens=256,
            max_new_tokens=128,
        ),
        TaskFormat(
            # plain text: no prompt; generation from the first token is scored only for completeness,
            # the teacher-forced loss is the measure
            name="text",
            instruction="{input}",
            metrics=("token_f1", "rouge_l"),
            max_input_tokens=8,
            max_target_tokens=1024,
            max_new_tokens=128,
            chat_template=False,
            completion=True,
        ),
    )
}

# Presets whose data comes as DATA_ROOT/NAME/SPLIT.jsonl (the rest are synthetic or generic).
DATASET_PRESETS: tuple[str, ...] = ("e2e_nlg", "gsm8k", "samsum", "sst2")


# the usual order of splits, before any others (alphabetical)
_SPLIT_ORDER = ("train", "validation", "test")


def shipped_splits(folder: str | Path) -> list[str]:
    """The splits a preset's data folder holds (its ``SPLIT.jsonl`` files): train, validation and test
    first, in that order, then any others."""
    try:
        names = {f.stem for f in Path(folder).glob("*.jsonl") if f.is_file()}
    except OSError:
        return []
    rank = {s: i for i, s in enumerate(_SPLIT_ORDER)}
    return sorted(names, key=lambda s: (rank.get(s, len(rank)), s))


def get_preset(name: str) -> TaskFormat:
    """The :class:`TaskFormat` called ``name``; unknown names give an error listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise LayercardError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None


def detect_preset(path: str | Path) -> TaskFormat:
    """The preset named by a JSONL file's parent folder (``.../gsm8k/test.jsonl``), else ``jsonl``."""
    parent = Path(path).resolve().parent.name
    return PRESETS[parent] if parent in DATASET_PRESETS else PRESETS["jsonl"]
