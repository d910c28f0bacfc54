"""Built-in synthetic tasks, generated from a seed with no outside text (fully offline, deterministic).

``facts``  — new knowledge. Fictional people (names built from syllables) each have a home city, a job, a
            favourite colour and a pet. Every (person, attribute) fact is asked in both splits, but with
            different question wordings: ``train`` uses two templates per attribute, ``test`` two held-out
            paraphrases. A model can only pass ``test`` by having learned the facts from ``train``.
            Default 50 people x 4 attributes x 2 wordings = 400 examples per split.

``format`` — a new output layout. A short sentence mentioning a person's name, age, job and city (six
            sentence shapes, fields in varying order) must become the fixed record
            ``[name=Orlin | age=34 | city=Vashem]`` (the job is mentioned but left out: part of the layout
            is knowing which fields belong). ``test`` uses names and cities that never occur in ``train``,
            so the layout, not the values, has to be learned. 400 examples per split.

Targets are short (at most 5 SmolLM2 tokens for facts, about 20 for format) so training is cheap.
"""

from __future__ import annotations

import random

from layercard.errors import LayercardError, MissingSplit
from layercard.tasks.example import Example
from layercard.tasks.presets import PRESETS
from layercard.tasks.task import Task

__all__ = ["RECORD_FIELDS", "SPLITS", "format_record", "make_facts", "make_format", "make_synthetic"]

SPLITS = ("train", "test")

# Word lists written for this module (no outside corpus).
_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kl",
    "tr",
    "th",
    "sh",
)
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "m", "x")
_CITY_ENDINGS = ("em", "ar", "ost", "ine", "uth", "al", "eck", "ira")
_JOBS = (
    "baker", "sailor", "weaver", "potter", "miner", "glassblower", "beekeeper", "cartographer", "brewer",
    "tailor", "falconer", "clockmaker", "shepherd", "locksmith", "astronomer", "carpenter", "herbalist",
    "ferryman", "bookbinder", "candlemaker",
)  # fmt: skip
_COLOURS = (
    "red", "blue", "green", "amber", "violet", "teal", "crimson", "ochre", "silver", "indigo", "olive",
    "saffron", "maroon", "turquoise",
)  # fmt: skip
_PETS = (
    "owl", "ferret", "tortoise", "goat", "raven", "lizard", "hedgehog", "parrot", "rabbit", "toad", "fox",
    "otter", "beetle", "pony",
)  # fmt: skip

# Question wordings per attribute: the first two are the train split's, the last two the test split's.
_QUESTIONS: dict[str, tuple[str, str, str, str]] = {
    "city": (
        "Where does {e} live?",
        "In which city does {e} live?",
        "Which town is home to {e}?",
        "What is the name of the place where {e} lives?",
    ),
    "job": (
        "What is {e}'s job?",
        "What does {e} do for a living?",
        "What is the profession of {e}?",
        "What kind of work does {e} do?",
    ),
    "colour": (
        "What is {e}'s favourite colour?",
        "Which colour does {e} like best?",
        "What colour does {e} love most?",
        "Name the colour that {e} prefers above all others.",
    ),
    "pet": (
        "What pet does {e} keep?",
        "What animal does {e} have as a pet?",
        "Which animal lives with {e} as a pet?",
        "What kind of pet does {e} own?",
    ),
}

RECORD_FIELDS = ("name", "age", "city")

_SENTENCES = (
    "{name} is {a_job} from {city}, aged {age}.",
    "{name}, {age}, works as {a_job} in {city}.",
    "In {city} lives {name}, {a_job} who is {age} years old.",
    "The {job} {name} ({age}) lives in {city}.",
    "{name} lives in {city}, is {age} years old and works as {a_job}.",
    "Aged {age}, {name} earns a living as {a_job} in {city}.",
)


def _rng(kind: str, seed: int) -> random.Random:
    # a separate stream per task kind, stable across Python versions (int seeding is)
    salt = {"facts": 7_919, "format": 104_729}[kind]
    return random.Random(int(seed) * 1_000_003 + salt)


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)


def _unique_words(rng: random.Random, n: int, make) -> list[str]:
    """``n`` distinct words from ``make(rng)``, in generation order."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = make(rng)
        if w not in seen and 3 <= len(w) <= 12:
            seen.add(w)
            out.append(w)
    return out


def _person_name(rng: random.Random) -> str:
    return (_syllable(rng) + _syllable(rng)).capitalize()


def _city_name(rng: random.Random) -> str:
    return (_syllable(rng) + rng.choice(_CITY_ENDINGS)).capitalize()


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _check_split(kind: str, split: str) -> None:
    if split not in SPLITS:
        raise MissingSplit(f"synthetic:{kind}: unknown split {split!r}; valid: {', '.join(SPLITS)}")


def make_facts(seed: int = 0, split: str = "train", *, n_entities: int = 50) -> Task:
    """The ``facts`` task: the same fictional people in both splits, asked with different wordings."""
    _check_split("facts", split)
    if n_entities < 1:
        raise LayercardError(f"synthetic:facts: n_entities must be >= 1, got {n_entities}")
    rng = _rng("facts", seed)
    # Entities and their facts depend on the seed only, never the split, so both splits agree on them.
    first = _unique_words(rng, n_entities, _person_name)
    last = [_person_name(rng) for _ in range(n_entities)]
    cities = _unique_words(rng, max(8, n_entities // 4), _city_name)
    people = []
    for f, s in zip(first, last, strict=True):
        people.append(
            {
                "name": f"{f} {s}",
                "city": rng.choice(cities),
                "job": rng.choice(_JOBS),
                "colour": rng.choice(_COLOURS),
                "pet": rng.choice(_PETS),
            }
        )
    templates = (0, 1) if split == "train" else (2, 3)
    examples = []
    for i, person in enumerate(people):
        for attr, wordings in _QUESTIONS.items():
            for t in templates:
                examples.append(
                    Example(
                        id=f"facts-{split}-{i:03d}-{attr}-{t}",
                        input=wordings[t].replace("{e}", person["name"]),
                        target=person[attr],
                        meta={"entity": person["name"], "attribute": attr, "template": t},
                    )
                )
    return Task(
        "facts", f"synthetic:facts(seed={seed},n_entities={n_entities})", split, PRESETS["facts"], examples
    )


def format_record(fields: dict[str, str]) -> str:
    """The target layout of the ``format`` task: fixed field order, ``key=value`` joined by `` | ``."""
    return "[" + " | ".join(f"{k}={fields[k]}" for k in RECORD_FIELDS) + "]"


def make_format(seed: int = 0, split: str = "train", *, n: int = 400) -> Task:
    """The ``format`` task: sentence -> ``[name=.. | age=.. | city=..]``; test names and cities are unseen."""
    _check_split("format", split)
    if n < 1:
        raise LayercardError(f"synthetic:format: n must be >= 1, got {n}")
    rng = _rng("format", seed)
    # One pool per seed, cut in two: names and cities of the test split never appear in train.
    n_names = max(4, n // 2)
    names = _unique_words(rng, 2 * n_names, _person_name)
    cities = _unique_words(rng, 2 * max(4, n // 8), _city_name)
    half_names, half_cities = len(names) // 2, len(cities) // 2
    if split == "train":
        names, cities = names[:half_names], cities[:half_cities]
    else:
        names, cities = names[half_names:], cities[half_cities:]
    # the sentence draws use a stream that depends on the split, so the two splits differ in layout too
    draw = random.Random(rng.getrandbits(64) * 2 + (0 if split == "train" else 1))
    examples = []
    for i in range(n):
        fields = {
            "name": draw.choice(names),
            "age": str(draw.randint(18, 89)),
            "job": draw.choice(_JOBS),
            "city": draw.choice(cities),
        }
        t = draw.randrange(len(_SENTENCES))
        text = _SENTENCES[t].format(a_job=_with_article(fields["job"]), **fields)
        examples.append(
            Example(
                id=f"format-{split}-{i:04d}",
                input=text,
                target=format_record(fields),
                meta={"fields": fields, "template": t},
            )
        )
    return Task("format", f"synthetic:format(seed={seed},n={n})", split, PRESETS["format"], examples)


def make_synthetic(name: str, *, split: str = "train", seed: int = 0) -> Task:
    """Dispatch ``facts`` / ``format`` with their default sizes."""
    if name == "facts":
        return make_facts(seed, split)
    if name == "format":
        return make_format(seed, split)
    raise LayercardError(f"unknown synthetic task {name!r}; valid: facts, format")
