"""A model folder shaped like another, with random weights: for time and memory measurements only.

Copies the configuration and tokenizer files of a Hugging Face model folder (no weights needed) and
writes ``model.safetensors`` with the architecture's own random initialisation under a fixed seed.
Losses on such a model say nothing about quality; step time and memory are those of the real shapes.
``--shapes FILE`` replaces keys of the copied configuration with a JSON file's (``shapes/``: published
configurations' layer shapes over the like folder's tokenizer), for another architecture's shapes.

    .venv/bin/python benchmarks/random_weights.py LIKE_FOLDER OUT_FOLDER [--seed 0] [--shapes FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def build(like: Path, out: Path, seed: int = 0, shapes: Path | None = None) -> Path:
    """Write ``out`` with ``like``'s config and tokenizer files and random weights; returns ``out``.
    ``shapes``: a JSON file whose keys replace those of the copied config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (like / "config.json").is_file():
        raise SystemExit(f"{like}: no config.json; not a Hugging Face model folder")
    out.mkdir(parents=True, exist_ok=True)
    for f in like.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != "layercard_source.json":
            shutil.copy2(f, out / f.name)
    mark: dict[str, object] = {"like": str(like), "seed": seed}
    if shapes is not None:
        override = json.loads(shapes.read_text())
        if not isinstance(override, dict):
            raise SystemExit(f"{shapes}: expected a JSON object of config.json keys")
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(config | override, indent=2) + "\n")
        mark["shapes"] = shapes.name
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    model.save_pretrained(out, safe_serialization=True)
    # The mark benchmarks read to label their figures as time and memory only.
    (out / "random_weights.json").write_text(json.dumps(mark) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("like", type=Path, help="a model folder whose config.json and tokenizer files are copied")
    ap.add_argument("out", type=Path, help="the folder to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shapes", type=Path, help="a JSON file of config.json keys to replace (shapes/)")
    args = ap.parse_args(argv)
    print(f"wrote {build(args.like, args.out, args.seed, args.shapes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
