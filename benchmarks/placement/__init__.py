"""The placement benchmark (entry point: benchmarks/placement.py), a thin layer over layercard's stages.

Modules: ``settings`` (profiles and paths), ``jobs`` (the job grid and score variants), ``measure``
(peak memory, load, base-model and card-code hashes), ``tiny`` (the dry run's model), ``ledger`` (the run
cache and the committed ledger), ``runner`` (model, cards, plans, runs), ``phases`` (the sub-commands
that measure), ``estimate``, ``summary`` / ``report`` / ``markdown`` / ``plots`` (the report) and ``cli``.
"""

import os as _os


def _pin_blas_kernel() -> None:
    # The planner's predictions (set gains, redundancy) go through LAPACK. OpenBLAS picks its kernels per
    # CPU, which moves their last digits from machine to machine, and the report prints them in full; one
    # kernel (AVX2, on every machine the benchmark has run on) keeps placement.json the same everywhere.
    # It must be set before numpy is first imported, and never overrides an explicit choice.
    if _os.environ.get("OPENBLAS_CORETYPE"):
        return
    try:
        with open("/proc/cpuinfo") as fh:
            has_avx2 = " avx2" in fh.read()
    except OSError:
        return
    if has_avx2:
        _os.environ["OPENBLAS_CORETYPE"] = "Haswell"


_pin_blas_kernel()

from .jobs import Job, Variant, grid_jobs, single_jobs, variants  # noqa: E402
from .ledger import has_texts, scrub_ledger, without_texts  # noqa: E402
from .settings import (  # noqa: E402
    FULL_POLICIES,
    SMALL_POLICIES,
    Settings,
    TaskSetting,
    gpu_settings,
    real_settings,
    tiny_settings,
    why,
)

__all__ = [
    "FULL_POLICIES",
    "SMALL_POLICIES",
    "Job",
    "Settings",
    "TaskSetting",
    "Variant",
    "gpu_settings",
    "grid_jobs",
    "has_texts",
    "real_settings",
    "scrub_ledger",
    "single_jobs",
    "tiny_settings",
    "variants",
    "why",
    "without_texts",
]
