"""Commands of the plan stage."""

from __future__ import annotations
