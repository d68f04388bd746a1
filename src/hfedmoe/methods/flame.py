"""FLAME (Le, Tran, Hua, Chawla 2025, arXiv 2506.16600): each client routes fewer experts
per token, a private learned rescaler, and activation-aware aggregation.

- Compute budget -> top-k: client c routes every token to k_c = max(1, round(k x
  C_budget / (L x S))) experts (k: the model's top-k), so a constrained client runs fewer
  expert FLOPs; it keeps every expert resident (FLAME cuts compute, not memory).
- Rescaler: a learnable scalar s_c per MoE layer multiplies the combined output of the
  routed experts, h = s_c * sum_{j in Top-k_c} R_j(x) E_j(x), so that fewer experts do
  not change the output's magnitude. It is the client's own: initialised to k / k_c
  (to 1 where the router renormalises its top-k weights to sum to one: the output's
  magnitude does not shrink there), trained with the experts, kept on the client
  between rounds (Flower's per-node context state) and never uploaded.
- Training: every expert a token of the batch was routed to (no per-batch selection).
- Upload: the experts it trained, routers and dense parameters, and f_c^j, the share
  of its routed tokens expert j processed.
- Server: each expert over its uploaders weighted by gamma_c^j = (f_c^j)^t |D_c| with
  t = 2 (:func:`hfedmoe.core.activation_weights`), unchanged where the weights sum
  to 0; routers and dense parameters by FedAvg.
docs/baselines.md says what is kept, simplified and inferred.
"""

from __future__ import annotations

import math

import torch

from hfedmoe.methods.base import ClientContext, Method, RoundPlan, upload_trained
from hfedmoe.methods.merging import data_size_weights, merge_by_activation
from hfedmoe.training import SelectionPolicy
from hfedmoe.training.device import model_device

RESCALER_KEY = "flame-rescaler"  # the client's s_c in its private state


def client_top_k(top_k: int, budget: int, total_experts: int) -> int:
    """k_c = max(1, round(k x C_budget / (L x S))), at most k (half-way rounds up)."""
    if total_experts < 1 or top_k < 1:
        raise ValueError(f"need top_k >= 1 and total_experts >= 1, got {top_k}, {total_experts}")
    return min(top_k, max(1, math.floor(top_k * budget / total_experts + 0.5)))


def routed_experts_policy() -> SelectionPolicy:
    """Train every expert a token of the batch was routed to."""

    def select(routing) -> torch.Tensor:
        return routing.candidates.clone()

    return select


def initial_rescale(top_k: int, client_k: int, renormalized: bool) -> float:
    """s_c before training: k / k_c, or 1 where the top-k weights are renormalised."""
    return 1.0 if renormalized else top_k / client_k


class Flame(Method):
    """Per-client top-k, a private rescaler, activation-aware expert aggregation."""

    expert_merge = staticmethod(merge_by_activation)
    router_weights = staticmethod(data_size_weights)
    upload_mask = staticmethod(upload_trained)

    def plan_round(self, ctx: ClientContext) -> RoundPlan:
        access = ctx.access
        model_k = access.top_k
        if model_k is None:
            raise ValueError(f"{type(access).__name__}: FLAME needs the model's top-k, which its routers do not state")
        client_k = client_top_k(model_k, ctx.expert_budget, ctx.total_experts)
        saved = ctx.private_state.get(RESCALER_KEY)
        if saved is None or len(saved) != access.num_layers:
            saved = [initial_rescale(model_k, client_k, access.renormalizes_top_k)] * access.num_layers
        scales = torch.tensor([float(x) for x in saved], dtype=torch.float32,
                              device=model_device(access.model), requires_grad=True)
        return RoundPlan(routed_experts_policy(), ctx.total_experts, routing_top_k=client_k, output_scales=scales)

    def end_round(self, ctx: ClientContext, plan: RoundPlan) -> None:
        """Keep the trained rescaler for the client's next round."""
        ctx.private_state[RESCALER_KEY] = [float(x) for x in plan.output_scales.detach().cpu().tolist()]
