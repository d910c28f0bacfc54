"""The export command: a plan in the form PEFT, TRL, axolotl or LLaMA-Factory reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layercard.cli.app import app, console, emit_json, guard, note, result_console
from layercard.errors import LayercardError

# The formats a file name says it holds: an export written under another format's name is refused.
_FORMATS = {".json": "JSON", ".py": "a Python script", ".yaml": "YAML", ".yml": "YAML"}


@app.command("export")
@guard
def export_cmd(
    plan: Annotated[
        Path, typer.Argument(metavar="PLAN", help="plan.json from `layercard plan` (a LoRA plan).")
    ],
    to: Annotated[str, typer.Option("--to", help="peft | trl | axolotl | llamafactory.")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="File to write (default: stdout); for peft also FILE.py, the Python snippet."
        ),
    ] = None,
    json_out: Annotated[
        bool,
        typer.Option("--json", help="Print what was written as JSON (without --out, the export's text too)."),
    ] = False,
) -> None:
    """Write a plan for another training tool; say what it cannot express and how that was approximated."""
    from layercard.artifacts import check_out_file, same_file, write_text
    from layercard.export import FILENAMES, export_plan

    if out is not None:
        suffix = Path(FILENAMES.get(to, ".yaml")).suffix  # the export's own file name says its format
        check_out_file(out, example=f"{to}{suffix}")
        if to == "peft" and out.suffix.lower() == ".py":  # the snippet goes beside the JSON, as FILE.py
            raise LayercardError(
                f"--out {out}: the peft export writes JSON there and the snippet beside it "
                f"as {out.with_suffix('.py').name}; give a .json path such as {out.with_suffix('.json')}"
            )
        targets = [out, out.with_suffix(".py")] if to == "peft" else [out]
        if to == "peft":  # the snippet's path is checked with the JSON's, before either is written
            if targets[1].is_dir():
                raise LayercardError(
                    f"--out {out}: the Python snippet goes beside it as {targets[1]}, which is a folder; "
                    "give another --out"
                )
            check_out_file(targets[1], f"--out {out}: the Python snippet's path")
        for target in targets:
            if same_file(target, plan):
                whose = "" if target is out else f" (the Python snippet goes to {target})"
                raise LayercardError(
                    f"--out {out}{whose}: that is the plan file {plan}, which the export would overwrite; "
                    "give another path"
                )
        given = _FORMATS.get(out.suffix.lower())
        if to in FILENAMES and given is not None and given != _FORMATS[suffix]:
            # a file named for another format would be read as that format by whatever opens it
            raise LayercardError(
                f"--out {out}: the {to} export is {_FORMATS[suffix]}, not {out.suffix}; give a path such as "
                f"{out.with_suffix(suffix)}"
            )
    result = export_plan(plan, to)
    written: list[str] = []
    if out is not None:
        if result.snippet is not None:
            # an earlier snippet would load an earlier plan's JSON should this write be cut between the two
            out.with_suffix(".py").unlink(missing_ok=True)
        written.append(str(write_text(out, result.text)))
        if result.snippet is not None:
            written.append(str(write_text(out.with_suffix(".py"), result.snippet)))
    if json_out:
        summary = {"target": result.target, "exact": result.exact, "notes": list(result.notes)}
        # without --out the export itself is in the JSON, as nothing else holds it
        text = {} if out is not None else {"text": result.text, "snippet": result.snippet}
        emit_json({**summary, "files": written, **text})
        return
    if out is None:
        typer.echo(result.text, nl=False)
    for text in result.notes:
        note(text)
    # without --out stdout holds the export alone, so that `> FILE` is the file; with it, what was written
    said = result_console if out is not None else console
    if result.exact:
        said.print(f"{result.target}: exact (every planned module at its planned rank)", highlight=False)
    if written:
        said.print(f"wrote {', '.join(written)}", highlight=False, markup=False)
    elif result.snippet is not None:
        console.print("the Python snippet is written beside the JSON with --out FILE", highlight=False)
