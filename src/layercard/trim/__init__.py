"""Boundary layer and trimming (docs/design.md §8): logit lens, boundary candidates, sweep, trimmed export.

1. **Trace** (:mod:`layercard.trim.lens`): the logit lens of every decoder layer's output, teacher forced
   on validation examples, with the adapter on and off, and the boundary candidates of the 'on' curve.
2. **Sweep** (:mod:`layercard.trim.sweep`): for each boundary ``K`` the adapters of decoder layers
   ``> K`` are switched off (:mod:`layercard.trim.mask`) and the validation set is scored; the best K
   wins, ties going to fewer adapted layers; where the metric ties at every K, the held-out loss
   chooses. A sweep that selects by ``loss`` generates nothing.
3. **Export** (:mod:`layercard.trim.export`): the adapter without layers ``> K``, in its own format.
4. **Stage** (:mod:`layercard.trim.run`): :func:`run_trace` and :func:`trim`, which write trace.json,
   trim.json and their figures (:mod:`layercard.trim.figures`); settings in :mod:`layercard.trim.config`.

The trim stage sits before evaluation in the stage order and uses :mod:`layercard.inference` for
generation and loss, never :mod:`layercard.evaluate`.
"""

from __future__ import annotations

# The sweep import comes last (as isort orders it too), so that the name ``sweep`` is the function:
# loading the submodule layercard.trim.sweep binds the package attribute ``sweep`` to the module, and the
# import below rebinds it (the module stays reachable as sys.modules["layercard.trim.sweep"]).
from layercard.config import TraceConfig, TrimConfig
from layercard.trim.export import export_merged, export_trimmed
from layercard.trim.figures import draw_sweep, draw_trace, plot_sweep, plot_trace
from layercard.trim.lens import TRACE_FILE, TRACE_PNG, Trace, boundary_candidates, lens_logits, trace
from layercard.trim.mask import adapted_layers, adapted_modules, adapters_off, masked_layers
from layercard.trim.run import MERGED_DIR, TRIM_FILE, TRIMMED_DIR, latency_text, run_trace, trim
from layercard.trim.sweep import (
    boundary_choice,
    candidate_ks,
    capped_text,
    choose_boundary,
    flat_metric_text,
    loss_scorer,
    metric_is_flat,
    sweep,
    task_scorer,
)

__all__ = [
    "MERGED_DIR",
    "TRACE_FILE",
    "TRACE_PNG",
    "TRIMMED_DIR",
    "TRIM_FILE",
    "Trace",
    "TraceConfig",
    "TrimConfig",
    "adapted_layers",
    "adapted_modules",
    "adapters_off",
    "boundary_candidates",
    "boundary_choice",
    "candidate_ks",
    "capped_text",
    "choose_boundary",
    "flat_metric_text",
    "latency_text",
    "metric_is_flat",
    "draw_sweep",
    "draw_trace",
    "export_merged",
    "export_trimmed",
    "lens_logits",
    "loss_scorer",
    "masked_layers",
    "plot_sweep",
    "plot_trace",
    "run_trace",
    "sweep",
    "task_scorer",
    "trace",
    "trim",
]
