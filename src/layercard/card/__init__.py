"""The Layer Card: per-unit diagnostics of a frozen model on a task (DESIGN §3–§5)."""

from layercard.card.artifact import DEFAULT_SCORE, SCORES, Card, GroupRow, UnitRow
from layercard.card.compute import CardConfig, compute_card

__all__ = ["DEFAULT_SCORE", "SCORES", "Card", "CardConfig", "GroupRow", "UnitRow", "compute_card"]
