"""PFL-MoE (after Guo et al. 2021), simplified to a per-client expert subset.

- Selection: the experts the client's *current* router sends most tokens to on
  this round's first batches (top-k dispatch counts), up to C_budget, at least one
  per layer; re-derived every round as the router changes.
- Upload: every expert it trained. Server: experts over their uploaders (Eq. 17),
  routers by plain FedAvg. docs/baselines.md says what is kept and simplified.
"""

from __future__ import annotations

import itertools

import torch

from hfedmoe import core
from hfedmoe.methods.base import ClientContext, Method, RoundPlan, fixed_subset_policy, upload_trained
from hfedmoe.methods.merging import data_size_weights
from hfedmoe.methods.profiling import PROFILE_BATCHES, route_counts
from hfedmoe.training import batches_from_round


def preferred_experts(hits: torch.Tensor, budget: int) -> torch.Tensor:
    """PFL-MoE's subset: the experts the client's router sends most tokens to.

    Parameters
    ----------
    hits : Tensor[L, S]
        Top-k dispatch counts over real tokens.
    budget : int
        C_budget; the subset holds min(budget, L * S) experts, at least one per layer
        (the most-hit expert of each layer), ties to the lower index.

    Returns
    -------
    BoolTensor[L, S]
    """
    return core.select_experts(hits.double(), torch.ones_like(hits, dtype=torch.bool), budget)


class PflMoE(Method):
    """The experts the current router prefers, re-derived every round."""

    router_weights = staticmethod(data_size_weights)
    upload_mask = staticmethod(upload_trained)

    def plan_round(self, ctx: ClientContext) -> RoundPlan:
        # The current router's preference on this round's first batches (what it is
        # about to train on).
        first = itertools.islice(batches_from_round(ctx.data, ctx.server_round, ctx.local_steps),
                                 min(PROFILE_BATCHES, ctx.local_steps))
        subset = preferred_experts(route_counts(ctx.access, first).hits, ctx.expert_budget)
        return RoundPlan(fixed_subset_policy(subset), ctx.expert_budget, subset=subset)
