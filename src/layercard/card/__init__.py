"""The Layer Card: per-unit diagnostics of a frozen model on a task (docs/design.md §3–§5)."""

from layercard.card.artifact import DEFAULT_SCORE, SCORES, Card, GroupRow, UnitRow
from layercard.card.compute import compute_card
from layercard.card.summary import write_card_folder
from layercard.config import CardConfig

__all__ = [
    "DEFAULT_SCORE",
    "SCORES",
    "Card",
    "CardConfig",
    "GroupRow",
    "UnitRow",
    "compute_card",
    "write_card_folder",
]
