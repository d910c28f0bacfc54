"""Planning: turn a Layer Card into an adapter placement under a budget (docs/design.md §4–§6).

A *layer* is the planning unit: choosing layer ℓ adapts every unit of the chosen roles in ℓ. Each
policy picks a layer set S; the plan then records the predicted set gain (§4), the costs (§5), the
rank of every adapted module and a ready PEFT ``LoraConfig`` whose keys are full module paths.

Predicted gains are in the units of the card's score (e.g. loss decrease of a first Adam step for
``rate``); they rank placements, they are not a promise of the measured gain (docs/design.md §3).

Settings (Budget, PlanConfig) live in ``layercard.config``. Modules: ``artifact`` (Plan, PlannedUnit),
``space`` (gains, coupling and costs of candidate layers), ``policies``, ``ranks``, ``make`` (make_plan,
restricted plans) and ``check`` (the plan against a model).
"""

from layercard.config import ADAPTER_KINDS, BUDGET_KINDS, POLICIES, Budget, PlanConfig
from layercard.plan.artifact import KIND, Plan, PlannedUnit
from layercard.plan.check import check_lora_model, check_model_matches, check_plan
from layercard.plan.make import make_plan
from layercard.plan.space import ADAPTERS_PER_LAYER, AUTO_REFERENCE_RANK

__all__ = [
    "ADAPTERS_PER_LAYER",
    "ADAPTER_KINDS",
    "AUTO_REFERENCE_RANK",
    "BUDGET_KINDS",
    "KIND",
    "POLICIES",
    "Budget",
    "Plan",
    "PlanConfig",
    "PlannedUnit",
    "check_lora_model",
    "check_model_matches",
    "check_plan",
    "make_plan",
]
