"""A task: a named, split-specific list of examples and the prompt format that scores them."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from layercard.artifacts import JsonListHash, sha256_json_list
from layercard.errors import LayercardError
from layercard.progress import track
from layercard.tasks.example import Example
from layercard.tasks.formats import lone_shard_text
from layercard.tasks.lazy import LazyExamples
from layercard.tasks.presets import PRESETS, TaskFormat

__all__ = ["Task"]


def _learned(ex: Example) -> tuple[Any, ...]:
    """What a model reads and learns of ``ex``: its texts, its conversation and the turns' tool calls
    and weights."""
    fields = json.dumps(ex.turn_fields, sort_keys=True) if ex.turn_fields else None
    return ex.input, ex.target, ex.messages, fields


@dataclass(frozen=True)
class Task:
    """A named, split-specific list of examples plus the format that prompts and scores them."""

    name: str
    source: str
    split: str
    format: TaskFormat
    examples: Sequence[Example]  # a tuple, or large data's examples read when used (LazyExamples)
    # the schema of the records it was read from (chat, alpaca, input_target, text); None for a preset or
    # synthetic task, whose format holds its prompt
    schema: str | None = None
    # a preset asked for that is not the one the data names (its folder, schema or task name): the hash
    # then covers the preset's name, whose prompt and cut limits differ from those of the data's own
    preset_chosen: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.examples, LazyExamples):  # large data's stay in their source until read
            object.__setattr__(self, "examples", tuple(self.examples))

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def custom_prompt(self) -> bool:
        """Whether the prompt differs from its preset's (own template, system prompt or chat switch)."""
        preset = PRESETS.get(self.format.name)
        return preset is None or preset.prompt() != self.format.prompt()

    @cached_property
    def data_hash(self) -> str:
        """sha256 of what the model is shown: the examples (ids, texts, references, meta, messages; order
        matters), the prompt when it is not its preset's, else the preset's name when it is not the one
        the data names (:attr:`preset_chosen`), whose prompt it then stands for. Key-order free.

        The data's own preset and prompt are left out, so a task loaded without preset or prompt settings
        keeps the hash it had before they could be set, and cards and run folders made then stay valid;
        a prompt of one's own is hashed as it was before a chosen preset counted.
        """
        if isinstance(self.examples, LazyExamples):
            for _ in self._read_all("hashing"):  # a whole read of large data hashes it on the way
                pass
            return self.__dict__["data_hash"]
        return sha256_json_list((ex.to_dict() for ex in self.examples), **self._hash_layout())

    def _hash_layout(self) -> dict[str, Any]:
        """What :attr:`data_hash` hashes beside the examples (:class:`~layercard.artifacts.JsonListHash`)."""
        if self.custom_prompt:
            return {"into": "examples", "beside": {"prompt": self.format.prompt()}}
        if self.preset_chosen:
            return {"into": "examples", "beside": {"preset": self.format.name}}
        return {}

    def _read_all(self, doing: str) -> Iterable[Example]:
        """Every example; large data's with a progress bar, as each is read from its source."""
        if isinstance(self.examples, LazyExamples):
            return self._read_file(doing)
        return self.examples

    def _read_file(self, doing: str) -> Iterator[Example]:
        """Large data's examples, hashed as they are read: a read to its end leaves :attr:`data_hash`
        known, so that comparing the data with another set and recording its hash read it once."""
        assert isinstance(self.examples, LazyExamples)
        h = None if "data_hash" in self.__dict__ else JsonListHash(**self._hash_layout())
        for ex in track(self.examples, f"{doing} {self.examples.label}", total=len(self.examples)):
            if h is not None:
                h.add(ex.to_dict())
            yield ex
        if h is not None:
            self.__dict__["data_hash"] = h.hexdigest()  # the cached_property's own slot

    def shared_with(self, other: Task) -> int:
        """How many of these examples ``other`` holds too, judged by what a model reads and learns (input,
        target, conversation), not by ids or file names: a renamed copy shares them all."""
        if len(other) < len(self):
            theirs = {_learned(e) for e in other._read_all("reading")}
            return sum(_learned(e) in theirs for e in self._read_all("comparing"))
        # the larger task is read once and not held: a large file's training set may not fit in memory
        mine = Counter(_learned(e) for e in self._read_all("reading"))
        found = {k for e in other._read_all("comparing") if (k := _learned(e)) in mine}
        return sum(mine[k] for k in found)

    def subset(self, n: int | None, *, seed: int = 0, offset: int = 0) -> Task:
        """Examples ``offset .. offset+n`` of a seeded shuffle, returned in source order.

        Deterministic for a seed; subsets with the same seed are nested in ``n``, and different
        offsets give disjoint parts (``subset(k)`` and ``subset(None, offset=k)`` split the task).
        ``subset(None)`` is the whole task unchanged.
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise LayercardError(f"subset: n must be a non-negative integer or None, got {n!r}")
        if offset < 0:
            raise LayercardError(f"subset: offset must be >= 0, got {offset!r}")
        order = list(range(len(self.examples)))
        random.Random(seed).shuffle(order)
        stop = None if n is None else offset + n
        return self.at(sorted(order[offset:stop]))

    def at(self, indices: Sequence[int]) -> Task:
        """The task of the examples at ``indices``, in that order (large data's read in one go)."""
        if isinstance(self.examples, LazyExamples):
            return dataclasses.replace(self, examples=self.examples.take(indices))
        return dataclasses.replace(self, examples=tuple(self.examples[i] for i in indices))

    def with_format(self, fmt: TaskFormat) -> Task:
        """The same examples under another prompt format."""
        return dataclasses.replace(self, format=fmt)

    @property
    def bare_inputs(self) -> bool:
        """Whether each prompt is an input/target record's input as it is, with no instruction: read from
        a file that no preset's folder names, with no prompt given."""
        return self.schema == "input_target" and self.format.name == "jsonl" and not self.custom_prompt

    def prompt_note(self) -> str | None:
        """A line for a task whose prompts give no instruction (:attr:`bare_inputs`), else None."""
        if not self.bare_inputs:
            return None
        return (
            f"task {self.name}: each prompt is the record's input as it is, with no instruction (no preset "
            "names this file's folder); give --prompt 'Your instruction:\\n{input}' (task.prompt in a "
            "run config) to say what the target is"
        )

    def shard_note(self) -> str | None:
        """A line for a task read from one file of a split in shards, else None."""
        text = lone_shard_text(self.source)
        return None if text is None else f"task {self.name}: {text}"

    def describe(self) -> dict[str, Any]:
        """What an artifact records about the task."""
        return {
            "name": self.name,
            "source": self.source,
            "split": self.split,
            "n_examples": len(self.examples),
            "data_hash": self.data_hash,
            "format": self.format.to_dict(),
            "prompt": {**self.format.prompt(), "custom": self.custom_prompt},
        }
