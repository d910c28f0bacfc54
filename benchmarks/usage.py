"""Command-line handling shared by the benchmark scripts that take no options."""

from __future__ import annotations

import argparse


def no_options(doc: str | None) -> None:
    """``-h``/``--help`` prints ``doc`` and exits; any other argument is refused. A script that rewrites
    committed results must not run when it was only asked what it does."""
    argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
