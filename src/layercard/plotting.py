"""Figures without pyplot: every PNG layercard draws is made and written here.

A figure is a ``matplotlib.figure.Figure`` on its own Agg canvas, so drawing one neither switches the
process's matplotlib backend (a notebook's inline plots keep theirs) nor registers the figure with pyplot,
where one whose drawing raised would stay open. matplotlib is imported on first use: importing layercard
must not pull it in.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from layercard.artifacts import atomic_path

__all__ = ["new_figure", "plain_text", "save_png"]


def new_figure(nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Any, Any]:
    """A figure and its axes, as ``pyplot.subplots(nrows, ncols, **kw)`` gives them (``figsize`` and the
    figure's other settings go to the figure, the rest to its subplots)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure_keys = ("figsize", "dpi", "layout")
    fig = Figure(**{k: kw.pop(k) for k in figure_keys if k in kw})
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)


def plain_text(fig: Any) -> None:
    """Have every text of ``fig`` drawn as written: a task, file or model name holding two ``$`` would
    otherwise be read as a formula, and drawing it fail (layercard's own labels use no formulas). Nor is
    text sent to LaTeX where the process's settings ask for it (``text.usetex``, a notebook's choice): a
    machine without LaTeX could then draw no figure. Called before anything lays the figure out or draws
    it.

    A log axis names its ticks by formulas of its own (``10^{7}``); read as text they would show the
    formula's source, so such an axis is given the same ticks written as plain numbers."""
    from matplotlib.text import Text
    from matplotlib.ticker import LogFormatterMathtext

    plain_log = _signed_log_formatter()

    for text in fig.findobj(Text):
        text.set_parse_math(False)
        text.set_usetex(False)
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for get, put in (
                (axis.get_major_formatter, axis.set_major_formatter),
                (axis.get_minor_formatter, axis.set_minor_formatter),
            ):
                f = get()
                if isinstance(f, LogFormatterMathtext):
                    # the same settings; matplotlib keeps the base and threshold unexposed
                    base, linthresh = getattr(f, "_base", 10.0), getattr(f, "_linthresh", None)
                    put(plain_log(base, f.labelOnlyBase, f.minor_thresholds, linthresh))


@functools.cache
def _signed_log_formatter() -> type:
    """matplotlib's plain ``LogFormatter``, writing a negative tick with its sign: a symmetric log axis
    has them, and the plain formatter names -10 as 10."""
    from matplotlib.ticker import LogFormatter

    class SignedLogFormatter(LogFormatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            text = super().__call__(x, pos)
            return self.fix_minus("-" + text) if x < 0 and text else text

    return SignedLogFormatter


def save_png(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> bytes:
    """Write ``fig`` to ``path`` as PNG, atomically (tight bounding box); returns the bytes written."""
    import matplotlib

    plain_text(fig)
    # texts made while drawing (tick labels) take the setting then
    with atomic_path(path) as tmp, matplotlib.rc_context({"text.usetex": False}):
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
        return Path(tmp).read_bytes()
