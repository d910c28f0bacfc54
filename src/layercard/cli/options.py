"""Command-line options derived from a stage's settings (``layercard.config``), never written by hand.

:func:`config_options` gives a command one ``--option`` per setting of a config schema, with the
setting's default and help, and hands the command the validated config. A bad value fails with the
option's name: ``--examples: must be a positive integer, got 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypeVar

import typer

from layercard.cli.app import given
from layercard.config.schema import ConfigError, Schema, Spec, spec_of

F = TypeVar("F", bound=Callable[..., Any])

_TYPES: dict[str, type] = {"int": int, "seed": int, "pos_float": float, "nonneg_float": float}
_TYPES |= {"fraction": float, "unit": float, "bool": bool}


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _help(spec: Spec) -> str:
    choices = spec.choice_list()
    if choices and spec.kind == "choice":
        return f"{spec.help} ({' | '.join(choices)})."
    return f"{spec.help}."


def _cli_default(value: Any) -> Any:
    """The option's default as the command line shows it (text for budgets, windows and lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value and isinstance(value[0], str) else ":".join(map(str, value))
    return str(value)


def _parameter(f: dataclasses.Field, default: Any, as_name: str) -> inspect.Parameter:
    spec = spec_of(f)
    assert spec is not None
    base = _TYPES.get(spec.kind, str)
    annotation: Any = base | None if spec.optional else base
    name = option_name(as_name)
    if spec.kind == "bool":
        name = f"{name}/--no-{name[2:]}"
    # an optional setting takes `null` as in YAML (`--steps null` with --epochs, `--examples null`: all)
    parser = functools.partial(_optional, base) if spec.optional and base is not bool else None
    option = typer.Option(name, help=_help(spec), parser=parser)
    required = default is dataclasses.MISSING
    return inspect.Parameter(
        as_name,
        inspect.Parameter.KEYWORD_ONLY,
        default=inspect.Parameter.empty if required else _cli_default(default),
        annotation=Annotated[annotation, option],
    )


NULLS = ("null", "none")


def _optional(base: type, text: Any) -> Any:
    """``text`` as ``base``, or None where it says null (a default arrives already converted)."""
    if not isinstance(text, str):
        return text
    if text.strip().lower() in NULLS:
        return None
    try:
        return base(text)
    except ValueError:
        kind = "an integer" if base is int else "a number"
        raise typer.BadParameter(f"{text!r} is not {kind} or null") from None


def config_options(
    schema: type[Schema],
    *,
    param: str = "cfg",
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    rename: dict[str, str] | None = None,
) -> Callable[[F], F]:
    """Decorate a command so it takes every setting of ``schema`` as an option and receives ``param``.

    ``exclude`` leaves settings out (they keep their schema default); ``defaults`` changes a default for
    this command only (shown in its help); ``rename`` gives a setting another option name where the
    command's own option takes its name (``{"dtype": "precision"}``: ``--precision``).
    """
    skip = set(exclude)
    defaults = defaults or {}
    names_of = {f.name: (rename or {}).get(f.name, f.name) for f in schema.settings(cli_only=True)}
    fields = [f for f in schema.settings(cli_only=True) if f.name not in skip]

    def decorate(fn: F) -> F:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != param]
        names = {p.name for p in own}
        derived = [f for f in fields if names_of[f.name] not in names]
        shared = [f.name for f in fields if names_of[f.name] in names]  # the command's own option feeds it
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        params += [_parameter(f, defaults.get(f.name, f.default), names_of[f.name]) for f in derived]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(names_of[f.name]) for f in derived}
            values |= {n: kwargs[names_of[n]] for n in shared}
            # Only what the user gave goes through the schema's own defaulting (e.g. --epochs alone
            # replaces the default step count), exactly as a YAML section that omits a key. An option given
            # at its default value is given all the same (--steps 100 --epochs 1 is as contradictory as
            # --steps 50 --epochs 1); a default of this command's own differs from the schema's.
            explicit = {
                k: v
                for k, v in values.items()
                if given(names_of[k]) or v != _cli_default(_field_default(schema, k))
            }
            try:
                cfg = schema(**schema.prepare(explicit))
            except ConfigError as e:
                field = e.where.rpartition(".")[2]
                raise ConfigError(option_name(names_of.get(field, field)), e.problem) from None
            return fn(**kwargs, **{param: cfg})

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate


def _field_default(schema: type[Schema], name: str) -> Any:
    f = next(f for f in dataclasses.fields(schema) if f.name == name)
    return None if f.default is dataclasses.MISSING else f.default
