"""The `layercard` command: one thin command per pipeline stage over the library functions.

Each stage's commands live in their own module and register on the shared Typer ``app``.
"""

from layercard.cli import card as _card  # noqa: F401  (each import registers its commands)
from layercard.cli import evaluate as _evaluate  # noqa: F401
from layercard.cli import export as _export  # noqa: F401
from layercard.cli import plan as _plan  # noqa: F401
from layercard.cli import run as _run  # noqa: F401
from layercard.cli import train as _train  # noqa: F401
from layercard.cli import trim as _trim  # noqa: F401
from layercard.cli.app import app

__all__ = ["app"]


if __name__ == "__main__":
    app()
