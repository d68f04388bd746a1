"""A sparse Mixture-of-Experts feed-forward block with separate expert modules.

This is the block the embedded model is upcycled into (and any model built from
it): a linear router, softmax scores over all experts, top-k dispatch with the
top-k scores renormalised to sum to one (Mixtral's convention), and one small
two-layer FFN per expert.

The block records what the federated algorithm needs from every forward pass:
the router's per-token probabilities G_e(x) (Eq. 1 of the paper) and which
experts each token was dispatched to. Recording lives here, in the forward, so
that the scores the algorithm sees are exactly the scores the model routed with.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


ACTIVATIONS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class ExpertFFN(nn.Module):
    """One expert: Linear -> activation -> Linear (the shape of a BERT FFN)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unsupported expert activation {activation!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
            )
        self.activation = activation
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(ACTIVATIONS[self.activation](self.fc1(x)))


class MoEFeedForward(nn.Module):
    """Top-k routed experts replacing a dense feed-forward block.

    Parameters
    ----------
    hidden_size, intermediate_size : int
        Model width and expert FFN width.
    num_experts : int
        Routed experts S in this layer.
    top_k : int
        Experts each token is dispatched to.

    Attributes set by every forward pass
    ------------------------------------
    last_router_probs : Tensor[B, T, S]
        Softmax router probabilities, detached (what the algorithm scores).
    last_dispatch : BoolTensor[B, T, S]
        True where a token was sent to an expert (its top-k).
    last_aux_loss : Tensor[]
        Switch-Transformer load-balancing loss S * sum_e f_e * P_e, with gradient,
        so a trainer can add it to keep routing from collapsing.
    """

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int = 2, activation: str = "gelu"
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(
            ExpertFFN(hidden_size, intermediate_size, activation) for _ in range(num_experts)
        )
        self.last_router_probs: torch.Tensor | None = None
        self.last_dispatch: torch.Tensor | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq, width = hidden.shape
        tokens = hidden.reshape(-1, width)
        probs = F.softmax(self.router(tokens), dim=-1, dtype=torch.float32)  # G_e(x), Eq. 1
        top_p, top_idx = probs.topk(self.top_k, dim=-1)
        top_p = (top_p / top_p.sum(dim=-1, keepdim=True)).to(tokens.dtype)

        dispatch = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_idx, True)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (top_idx == e).nonzero(as_tuple=True)
            if token_idx.numel() == 0:
                continue
            y = expert(tokens[token_idx]) * top_p[token_idx, slot].unsqueeze(-1)
            out.index_add_(0, token_idx, y)

        # Load balancing (Switch Transformers, Fedus et al. 2022): fraction of
        # tokens dispatched to e times mean probability of e, scaled by S.
        fraction = dispatch.float().mean(dim=0) / self.top_k
        self.last_aux_loss = self.num_experts * (fraction * probs.mean(dim=0)).sum()
        self.last_router_probs = probs.detach().reshape(batch, seq, -1)
        self.last_dispatch = dispatch.reshape(batch, seq, -1)
        return out.reshape(batch, seq, width)
