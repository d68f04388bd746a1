"""HFedMoE (Fang et al., arXiv 2601.00583): the paper's method.

- Selection: per mini-batch, rank the experts that received tokens by I_b
  (Eq. 14-15; ``--select-by importance``: by s_b, Eq. 5), one per MoE layer first,
  then the best up to C_budget.
- Upload: the experts the client really used (trained and u_c >= tau, Eq. 18's S_c).
- Server: each expert averaged over its uploaders (Eq. 17); routers merged with
  weights from each client's expert preference (Eq. 18-21). ``--expert-agg`` /
  ``--gate-agg fedavg`` are the paper's ablations (Fig. 16).
"""

from __future__ import annotations

from hfedmoe.methods.base import ClientContext, Method, RoundPlan
from hfedmoe.training import score_policy


class HFedMoE(Method):
    """Per batch the best-scoring experts within C_budget (Eq. 15); the default merges."""

    def plan_round(self, ctx: ClientContext) -> RoundPlan:
        return RoundPlan(score_policy(ctx.select_by), ctx.expert_budget)
