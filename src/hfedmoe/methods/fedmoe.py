"""FedMoE (Mei et al. 2024), with an expert count standing in for memory.

- Selection: once per client, profile how its fixed profiling batches route
  through the run's *initial* model; search the largest activation-coverage
  threshold whose sub-model fits FEDMOE_BUDGET_SHARE of C_budget (binary search,
  as the paper does). The client trains that sub-model for the whole run, and its
  routing is masked to it (a pruned sub-model).
- Upload: every expert it trained. Server: modular aggregation (each expert over
  its uploaders, Eq. 17), routers by plain FedAvg. docs/baselines.md says what is
  kept and simplified.
"""

from __future__ import annotations

import math

import torch

from hfedmoe.methods.base import ClientContext, Method, RoundPlan, fixed_subset_policy, upload_trained
from hfedmoe.methods.merging import data_size_weights
from hfedmoe.methods.profiling import initial_profile

# Share of the budget the sub-model search may fill (Mei et al. keep memory headroom
# with alpha <= 1 and give no value; 0.8 is our choice, baselines.md).
FEDMOE_BUDGET_SHARE = 0.8


def fedmoe_submodel(frequency: torch.Tensor, max_experts: int, iterations: int = 40) -> torch.Tensor:
    """FedMoE's sub-model search (Mei et al. 2024), with an expert count for memory.

    Finds the largest coverage threshold theta such that the smallest sub-model
    holding, in every layer, experts whose activation frequencies add up to at
    least theta has at most ``max_experts`` experts (binary search on theta, as the
    paper does); returns that sub-model. Every layer keeps at least one expert.

    Parameters
    ----------
    frequency : Tensor[L, S]
        Activation counts or frequencies p_ij >= 0 (normalised per layer here; a
        layer with no activations counts as uniform).
    max_experts : int
        The most experts the sub-model may hold, >= L.
    iterations : int
        Bisection steps on theta.

    Returns
    -------
    BoolTensor[L, S]
    """
    num_layers, num_experts = frequency.shape
    if max_experts < num_layers:
        raise ValueError(f"a sub-model of {max_experts} experts cannot cover {num_layers} layers")
    p = frequency.double()
    totals = p.sum(dim=1, keepdim=True)
    p = torch.where(totals > 0, p / totals.clamp_min(1e-300), torch.full_like(p, 1.0 / num_experts))
    sorted_p, order = torch.sort(p, dim=1, descending=True, stable=True)
    cumulative = sorted_p.cumsum(dim=1)

    def needed(theta: float) -> torch.Tensor:
        # experts per layer until the cumulative frequency reaches theta (>= 1 each)
        return ((cumulative < theta - 1e-12).sum(dim=1) + 1).clamp(max=num_experts)

    if int(needed(1.0).sum()) <= max_experts:
        theta = 1.0
    else:
        low, high = 0.0, 1.0  # needed(0) = one per layer always fits
        for _ in range(iterations):
            mid = (low + high) / 2
            low, high = (mid, high) if int(needed(mid).sum()) <= max_experts else (low, mid)
        theta = low
    keep = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    for layer, count in enumerate(needed(theta).tolist()):
        keep[layer, order[layer, :count]] = True
    return keep


def fedmoe_max_experts(budget: int, num_layers: int, share: float = FEDMOE_BUDGET_SHARE) -> int:
    """floor(share * C_budget), never below one expert per layer."""
    return max(num_layers, math.floor(share * budget))


class FedMoE(Method):
    """One sub-model per client for the whole run, routing masked to it."""

    router_weights = staticmethod(data_size_weights)
    upload_mask = staticmethod(upload_trained)

    def plan_round(self, ctx: ClientContext) -> RoundPlan:
        profile = initial_profile(ctx.access, ctx.data, ctx.server_round, ctx.run_key, ctx.build_initial_model)
        subset = fedmoe_submodel(profile.hits, fedmoe_max_experts(ctx.expert_budget, ctx.access.num_layers))
        return RoundPlan(fixed_subset_policy(subset), ctx.expert_budget, subset=subset, routing_mask=subset)
