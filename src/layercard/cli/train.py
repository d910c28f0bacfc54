"""Commands of the train stage."""

from __future__ import annotations
