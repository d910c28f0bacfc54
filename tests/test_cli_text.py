"""What the commands print: help screens that open and wrap, and messages printed as written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from layercard.cli import app

COMMANDS = [c.name or c.callback.__name__ for c in app.registered_commands]


def test_every_command_is_registered_with_a_name() -> None:
    assert {"card", "plan", "train", "eval", "run", "demo", "report"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_opens_and_paragraphs_are_reflowed(name: str) -> None:
    command = next(c for c in app.registered_commands if (c.name or c.callback.__name__) == name)
    # guarded: known failures print one line and exit non-zero (cli.app.guard)
    assert hasattr(command.callback, "__wrapped__"), f"{name}: not wrapped by guard"
    doc = command.callback.__doc__ or ""
    assert doc.strip(), f"{name}: no help text"
    for paragraph in doc.split("\n\n"):
        assert "\n" not in paragraph.strip(), f"{name}: a help paragraph keeps its line breaks"
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_an_error_naming_a_split_prints_it_as_written(tmp_path, monkeypatch) -> None:
    """``sst2:train`` holds ``:train:``, which a console reading emoji codes would print as a picture."""
    monkeypatch.setenv("LAYERCARD_DATA", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    args = ["card", "-t", "sst2:train", "--examples", "4", "-o", str(tmp_path / "c")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "task sst2:train: data file not found" in " ".join(result.output.split())
    assert not (tmp_path / "c").exists()


def test_layer_lists_read_as_ranges():
    """A layer list names every layer once, in order, with runs of three or more as ranges: a large
    model's layers read as one range, not as a hundred indices."""
    from layercard.progress import layers_text

    assert layers_text(range(126)) == "0–125"
    assert layers_text([10, 0, 1, 2, 3, 12, 13]) == "0–3, 10, 12, 13"
    assert layers_text([5, 5, 6, 7]) == "5–7"
    assert layers_text([3, 19]) == "3, 19" and layers_text([]) == ""
