"""SEER-MoE (Muzio et al. 2024): heavy-hitter pruning, then fine-tuning with a
gate-entropy penalty.

- Selection: once per client, the soft counts (summed router probabilities) of its
  profiling batches on the run's *initial* model; the heaviest experts over all
  layers survive (1 - SEER_PRUNE_RATIO of all, capped by C_budget, at least one per
  layer). The client trains them for the whole run with its routing masked to them.
- Loss: + SEER_ENTROPY_COEF x the gate entropy (sharper routing).
- Upload: every expert it trained. Server: experts over their uploaders (Eq. 17),
  routers by plain FedAvg. docs/baselines.md says what is kept and simplified.
"""

from __future__ import annotations

import math

import torch

from hfedmoe import core
from hfedmoe.methods.base import ClientContext, Method, RoundPlan, fixed_subset_policy, upload_trained
from hfedmoe.methods.merging import data_size_weights
from hfedmoe.methods.profiling import initial_profile

# Share of all experts pruned by heavy-hitter counting, and weight of the gate-entropy
# penalty (neither value is in the abstract; baselines.md).
SEER_PRUNE_RATIO = 0.25
SEER_ENTROPY_COEF = 0.01


def heavy_hitters(soft_counts: torch.Tensor, keep: int) -> torch.Tensor:
    """SEER-MoE's surviving experts: the ``keep`` largest soft counts over all layers.

    Soft count S_{l,e} = sum over tokens of the router probability of e. The
    ranking is global across (layer, expert), which SEER-MoE reports works better
    than a uniform per-layer cut; every layer keeps at least its heaviest expert.
    """
    return core.select_experts(soft_counts.double(), torch.ones_like(soft_counts, dtype=torch.bool), keep)


def seer_keep_count(budget: int, num_layers: int, num_experts: int, prune_ratio: float = SEER_PRUNE_RATIO) -> int:
    """Experts a SEER-MoE client keeps: (1 - prune_ratio) of all, capped by its budget."""
    return max(num_layers, min(budget, math.ceil((1.0 - prune_ratio) * num_layers * num_experts)))


class SeerMoE(Method):
    """The heavy hitters of the initial model, routing masked to them, + gate entropy."""

    router_weights = staticmethod(data_size_weights)
    upload_mask = staticmethod(upload_trained)

    def plan_round(self, ctx: ClientContext) -> RoundPlan:
        profile = initial_profile(ctx.access, ctx.data, ctx.server_round, ctx.run_key, ctx.build_initial_model)
        num_layers, num_experts = ctx.access.num_layers, ctx.access.num_experts
        subset = heavy_hitters(profile.soft, seer_keep_count(ctx.expert_budget, num_layers, num_experts))
        return RoundPlan(fixed_subset_policy(subset), ctx.expert_budget, subset=subset, routing_mask=subset,
                         entropy_coef=SEER_ENTROPY_COEF)
