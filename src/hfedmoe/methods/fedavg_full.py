"""FedAvg without constraints: the unconstrained reference.

Every client trains and uploads every expert whatever its budget (expert, memory
or time budgets are ignored); the server averages everything by |D_c|.
"""

from __future__ import annotations

from hfedmoe.methods.base import ClientContext, Method, RoundPlan, all_experts_policy, upload_all
from hfedmoe.methods.merging import data_size_weights, merge_over_all_clients


class FedAvgFull(Method):
    """Every expert, every client, whatever its budget."""

    expert_merge = staticmethod(merge_over_all_clients)
    router_weights = staticmethod(data_size_weights)
    upload_mask = staticmethod(upload_all)

    def plan_round(self, ctx: ClientContext) -> RoundPlan:
        return RoundPlan(all_experts_policy(), train_budget=ctx.total_experts, honours_time_budget=False)
