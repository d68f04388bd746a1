"""Random expert selection: the control for HFedMoE's scoring.

Per mini-batch, random experts among those that received tokens, one per layer
first, up to C_budget (seeded by run, round and client). Upload and aggregation are
HFedMoE's, ablation switches included.
"""

from __future__ import annotations

import torch

from hfedmoe import core
from hfedmoe.methods.base import ClientContext, Method, RoundPlan
from hfedmoe.training import SelectionPolicy


def random_policy(generator: torch.Generator) -> SelectionPolicy:
    """Random experts among the batch's candidates, one per layer first, up to the budget."""

    def select(routing: BatchRouting) -> torch.Tensor:
        scores = torch.rand(routing.candidates.shape, generator=generator, dtype=torch.float64)
        return core.select_experts(scores, routing.candidates, routing.budget)

    return select


class RandomExperts(Method):
    """Seeded random experts per batch within C_budget."""

    def plan_round(self, ctx: ClientContext) -> RoundPlan:
        generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.server_round * 1_009
                                                  + ctx.data.partition_id)
        return RoundPlan(random_policy(generator), ctx.expert_budget)
