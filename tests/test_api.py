"""The public API: the README's example runs as written on the real model, and the names resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_public_names_resolve():
    import layercard

    for name in layercard.__all__:
        assert getattr(layercard, name) is not None, name
    with pytest.raises(AttributeError):
        layercard.no_such_name  # noqa: B018


@pytest.mark.smollm2
def test_readme_api_example_runs(smollm2, capsys, monkeypatch):
    """Executes the README block as written (its load_model call gets the session's loaded model)."""
    import layercard

    text = README.read_text()
    block = re.search(r"<!-- api-example[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert block, "README: the api-example block is missing"
    monkeypatch.setattr(layercard.api, "load_model", lambda *a, **k: smollm2)
    flags = [(q, q.requires_grad) for q in smollm2.model.parameters()]
    namespace: dict = {"__name__": "readme_example"}
    try:
        exec(compile(block.group(1), "README.md", "exec"), namespace)
    finally:  # get_peft_model wrapped the shared model in place: give later tests the base model back
        if "model" in namespace:
            namespace["model"].unload()
        for q, flag in flags:
            q.requires_grad_(flag)
    printed = capsys.readouterr().out
    layers = [int(x) for x in re.findall(r"\d+", printed.split("]")[0])]
    assert len(layers) == 8 and all(0 <= x < 30 for x in layers)
    loss = float(printed.rsplit("loss", 1)[1])
    assert 0 < loss < 20


def test_measure_card_refuses_a_device_for_a_loaded_model():
    from tiny import tiny_model
    from tiny_tok import tiny_tokenizer

    from layercard import models
    from layercard.api import measure_card
    from layercard.errors import LayercardError

    model = tiny_model("llama")
    loaded = models.LoadedModel(model, tiny_tokenizer(), "tiny", models.weights_hash(model), "tiny")
    with pytest.raises(LayercardError, match="device='cuda' applies to a model spec"):
        measure_card(loaded, "synthetic:facts", device="cuda")
