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
        # Deferred backward (see DeferredExperts): set by the trainer for clients
        # whose budget cannot train every expert; `selected` is filled in after the
        # forward pass, once the batch's selection is known, and read in backward.
        # The forward never clears it: with gradient checkpointing the forward runs
        # again INSIDE the backward, after the selection was set (the access layer
        # clears it when the deferred path is switched on or off).
        self.deferred_backward = False
        # With the deferred backward: pass the input gradient through routed experts that
        # are not selected (no weight gradient), instead of treating them as constants.
        self.unselected_input_grad = False
        self.selected: torch.Tensor | None = None  # BoolTensor[S]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq, width = hidden.shape
        tokens = hidden.reshape(-1, width)
        probs = F.softmax(self.router(tokens), dim=-1, dtype=torch.float32)  # G_e(x), Eq. 1
        top_p, top_idx = probs.topk(self.top_k, dim=-1)
        top_p = (top_p / top_p.sum(dim=-1, keepdim=True)).to(tokens.dtype)

        dispatch = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top_idx, True)
        if self.deferred_backward and torch.is_grad_enabled():
            expert_out = DeferredExperts.apply(tokens, top_idx, self)  # [N, k, H]
            out = (top_p.unsqueeze(-1) * expert_out).sum(dim=1)
        else:
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


class DeferredExperts(torch.autograd.Function):
    """Expert outputs whose backward runs only through the experts selected *later*.

    HFedMoE selects the experts to train from the routing of the very batch being
    trained, so the selection is known only after the forward pass. Plain autograd
    would store every expert's activations and back-propagate through all of them.
    Here the forward runs every expert without recording a graph (only the small
    per-slot outputs [N, k, H] are kept for the router's gradient); the backward
    re-runs the forward of the selected experts with gradients (as activation
    checkpointing does, minus the output layer, whose backward does not need its
    own output: see :func:`expert_backward`) and back-propagates through them alone. Unselected experts
    act as constants: no activation memory, no weight or input gradient, which is
    what "run them detached" means. With ``layer.unselected_input_grad`` (``--unselected-experts
    freeze``) the routed but unselected experts are recomputed too, for the input gradient
    only (:func:`expert_input_grad`): no weight gradient, but the layers below get the
    gradient plain autograd would give them. The routing weights keep their full gradient.
    """

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, top_idx: torch.Tensor, layer: "MoEFeedForward") -> torch.Tensor:
        out = tokens.new_zeros(tokens.shape[0], top_idx.shape[1], tokens.shape[1])
        for e, expert in enumerate(layer.experts):
            token_idx, slot = (top_idx == e).nonzero(as_tuple=True)
            if token_idx.numel():
                out[token_idx, slot] = expert(tokens[token_idx])
        ctx.save_for_backward(tokens, top_idx)
        ctx.layer = layer
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        tokens, top_idx = ctx.saved_tensors
        layer = ctx.layer
        if layer.selected is None:
            raise RuntimeError("deferred expert backward needs the batch's selection: set it before backward")
        grad_tokens = torch.zeros_like(tokens)
        selected = layer.selected.tolist()
        for e in top_idx.unique().tolist():
            if not (selected[e] or layer.unselected_input_grad):
                continue
            token_idx, slot = (top_idx == e).nonzero(as_tuple=True)
            backward = expert_backward if selected[e] else expert_input_grad
            grad_x = backward(layer.experts[e], tokens[token_idx], grad_out[token_idx, slot])
            grad_tokens.index_add_(0, token_idx, grad_x)
        return grad_tokens, None, None


def _accumulate(param: nn.Parameter, grad: torch.Tensor) -> None:
    """Add ``grad`` to ``param.grad`` as autograd's own accumulation would."""
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


def expert_input_grad(expert: ExpertFFN, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """The input gradient of ``expert`` at ``x`` for output gradient ``grad_y``, without
    touching its weight gradients (a frozen expert that the gradient still passes through)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        act = ACTIVATIONS[expert.activation](expert.fc1(x))
    return torch.autograd.grad(act, x, grad_y @ expert.fc2.weight.detach())[0]


def expert_backward(expert: ExpertFFN, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """Back-propagate ``grad_y`` through ``expert`` at input ``x``; return the input gradient.

    Accumulates the expert's weight gradients, exactly as ``autograd.backward`` on a
    recomputed ``expert(x)`` would, but re-runs only what the backward needs: fc1 and
    the activation. The output layer's forward (fc2 applied to the activations) is not
    needed by its own backward (dW2 = grad_y^T a, db2 = sum grad_y, grad_a = grad_y W2),
    so it is not recomputed: one of the two recomputed matrix products is saved.
    """
    fc2 = expert.fc2
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        act = ACTIVATIONS[expert.activation](expert.fc1(x))
    a = act.detach()
    if fc2.weight.requires_grad:
        _accumulate(fc2.weight, grad_y.t() @ a)
    if fc2.bias is not None and fc2.bias.requires_grad:
        _accumulate(fc2.bias, grad_y.sum(dim=0))
    # Accumulates fc1's weight gradients and gives x.grad.
    torch.autograd.backward(act, grad_y @ fc2.weight.detach())
    return x.grad
