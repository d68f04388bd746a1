"""Pure-PyTorch algorithm core of HFedMoE: importance, IB selection, aggregation.

See docs/method.md for the equation -> function map.
"""

from hfedmoe.core.aggregation import (
    activation_weights,
    aggregate_experts,
    aggregate_experts_weighted,
    aggregate_gates,
    fedavg,
    gate_weights,
)
from hfedmoe.core.importance import expert_usage, importance, pool_token_scores
from hfedmoe.core.selection import ib_kl, ib_score, select_experts

__all__ = [
    "activation_weights",
    "aggregate_experts",
    "aggregate_experts_weighted",
    "aggregate_gates",
    "expert_usage",
    "fedavg",
    "gate_weights",
    "ib_kl",
    "ib_score",
    "importance",
    "pool_token_scores",
    "select_experts",
]
