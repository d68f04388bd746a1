"""FedAvg under budgets: full fine-tuning or nothing.

A client whose budget holds every expert trains and uploads all of them; any other
client cannot run full fine-tuning and reports a "training failure" for the round
(the paper's FedAvg failure mode), which the server records and skips.
"""

from __future__ import annotations

from hfedmoe.methods.base import ClientContext, Method, RoundPlan, all_experts_policy, upload_all
from hfedmoe.methods.merging import data_size_weights, merge_over_all_clients


class FedAvg(Method):
    """Full fine-tuning when the budget holds every expert, else a training failure."""

    expert_merge = staticmethod(merge_over_all_clients)
    router_weights = staticmethod(data_size_weights)
    upload_mask = staticmethod(upload_all)

    def plan_round(self, ctx: ClientContext) -> RoundPlan:
        total = ctx.total_experts
        if ctx.expert_budget < total:
            return RoundPlan(None, train_budget=ctx.expert_budget, failure=(
                f"training failure: full fine-tuning trains all {total} experts, the budget allows "
                f"{ctx.expert_budget}"))
        return RoundPlan(all_experts_policy(), train_budget=total)
