"""Stage settings: one frozen dataclass per stage, from which CLI options, YAML checks and defaults derive.

This package imports nothing heavy, so the command line can build its options without loading torch.
"""

from layercard.config.budget import BUDGET_KINDS, Budget, Budgets
from layercard.config.card import CardConfig
from layercard.config.evaluate import EvalConfig
from layercard.config.plan import ADAPTER_KINDS, POLICIES, SEARCH_POLICIES, PlanConfig
from layercard.config.schema import ConfigError, Schema, setting
from layercard.config.train import DTYPES, SCHEDULERS, TrainConfig
from layercard.config.trim import TraceConfig, TrimConfig

__all__ = [
    "ADAPTER_KINDS",
    "BUDGET_KINDS",
    "DTYPES",
    "POLICIES",
    "SEARCH_POLICIES",
    "SCHEDULERS",
    "Budget",
    "Budgets",
    "CardConfig",
    "ConfigError",
    "EvalConfig",
    "PlanConfig",
    "Schema",
    "TraceConfig",
    "TrainConfig",
    "TrimConfig",
    "setting",
]
