"""Deferred expert backward for transformers 5.x fused experts.

The fused twin of :class:`hfedmoe.models.moe_block.DeferredExperts`. HFedMoE picks the experts
to train from the routing of the very batch it trains on, so the selection is known only
after the forward pass. Plain autograd through a fused experts module stores every routed
expert's activations and back-propagates through all of them, although only the selected
experts' slices are kept. :class:`DeferredFusedExperts` instead

- runs every expert's forward without recording a graph, keeping only the per-slot
  outputs ``[N, k, H]`` (the router's top-k weights multiply them outside, so the router
  keeps its full gradient);
- in the backward, re-runs the gate/up projection and activation of the *selected*
  experts only and back-propagates through them (the down projection's backward needs
  only its input, not its output, so it is not recomputed).

Unselected experts act as constants: no activation memory, no weight gradient, no input
gradient (what "run them detached" means; the same choice as for separate experts). With
``--unselected-experts freeze`` (:data:`INPUT_GRAD_ATTR`) the backward also recomputes the
routed but unselected experts, for the input gradient only.
What is not saved: the fused tensors' gradient is one full-size buffer per tensor (its
unselected slices are zeros), because a slice of a parameter cannot own a gradient.

The expert MLP computed here is the eager one of every fused family transformers 5.x
ships (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3)::

    gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)
    y = linear(act_fn(gate) * up, down_proj[e])

:func:`supports_deferred` checks a module has exactly that layout (the attributes
``transformers.integrations.moe.use_experts_implementation`` sets: concatenated
gate/up, not transposed, no bias, no post-expert norm) and refuses anything else.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

SELECTION_ATTR = "_hfedmoe_selected"  # BoolTensor[E] set by the access layer before backward
# True: routed but unselected experts pass the input gradient (--unselected-experts freeze)
INPUT_GRAD_ATTR = "_hfedmoe_unselected_input_grad"


def supports_deferred(module: nn.Module) -> bool:
    """Whether ``module`` is a fused experts module with the eager gated-MLP layout above."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)
        and gate_up.dim() == 3 and down.dim() == 3
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
        and callable(getattr(module, "act_fn", None))
        and getattr(module, "has_gate", True) and not getattr(module, "has_bias", False)
        and not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
        and not getattr(module, "has_post_expert_norm", False)
    )


def _gated_mlp(act_fn, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(act_fn(gate) * up, down)


def _routed(top_idx: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token rows, top-k slots) routed to ``expert``."""
    return (top_idx == expert).nonzero(as_tuple=True)


class DeferredFusedExperts(torch.autograd.Function):
    """Per-slot expert outputs ``[N, k, H]`` whose backward runs through the selected experts only."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, top_idx: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, module: nn.Module) -> torch.Tensor:
        out = tokens.new_zeros(tokens.shape[0], top_idx.shape[1], tokens.shape[1])
        # Indices >= E mark tokens dropped by expert parallelism: no expert computes them.
        for e in top_idx.unique().tolist():
            if e < gate_up.shape[0]:
                token_idx, slot = _routed(top_idx, e)
                out[token_idx, slot] = _gated_mlp(module.act_fn, tokens[token_idx], gate_up[e], down[e]).to(out.dtype)
        ctx.save_for_backward(tokens, top_idx, gate_up, down)
        ctx.module = module
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        tokens, top_idx, gate_up, down = ctx.saved_tensors
        selected = getattr(ctx.module, SELECTION_ATTR, None)
        if selected is None:
            raise RuntimeError("deferred expert backward needs the batch's selection: call set_selection first")
        need_x, _, need_gate_up, need_down, _ = ctx.needs_input_grad
        grad_x = torch.zeros_like(tokens) if need_x else None
        grad_gate_up = torch.zeros_like(gate_up) if need_gate_up else None
        grad_down = torch.zeros_like(down) if need_down else None
        through_unselected = need_x and getattr(ctx.module, INPUT_GRAD_ATTR, False)
        chosen = selected.tolist()
        for e in top_idx.unique().tolist():
            if e >= gate_up.shape[0] or not (chosen[e] or through_unselected):
                continue
            token_idx, slot = _routed(top_idx, e)
            grad_y = grad_out[token_idx, slot]
            train_e = chosen[e]  # a frozen expert: input gradient only, no weight gradient
            with torch.enable_grad():
                x = tokens[token_idx].detach().requires_grad_(need_x)
                w1 = gate_up[e].detach().requires_grad_(need_gate_up and train_e)
                gate, up = F.linear(x, w1).chunk(2, dim=-1)
                hidden = ctx.module.act_fn(gate) * up
            if need_down and train_e:  # dW2 = grad_y^T h: needs h, not the output
                grad_down[e] = grad_y.t() @ hidden.detach()
            inputs = [t for t, need in ((x, need_x), (w1, need_gate_up and train_e)) if need]
            if inputs:
                grads = torch.autograd.grad(hidden, inputs, grad_y @ down[e].detach())
                grads = list(grads)
                if need_x:
                    grad_x.index_add_(0, token_idx, grads.pop(0))
                if need_gate_up and train_e:
                    grad_gate_up[e] = grads.pop(0)
        return grad_x, None, grad_gate_up, grad_down, None


def deferred_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """Drop-in ``forward`` of a fused experts module (same signature and result as the
    eager one, up to float summation order), with the deferred backward."""
    per_slot = DeferredFusedExperts.apply(hidden_states, top_k_index, self.gate_up_proj, self.down_proj, self)
    weights = top_k_weights.to(per_slot.dtype)
    return (per_slot * weights[..., None]).sum(dim=1).to(hidden_states.dtype)


def installed(module: nn.Module) -> bool:
    """Whether :func:`install` routed ``module``'s forward through the deferred backward."""
    return "forward" in module.__dict__


def install(module: nn.Module, enabled: bool, unselected_input_grad: bool = False) -> None:
    """Route ``module``'s forward through :func:`deferred_forward` (or restore its own);
    ``unselected_input_grad``: see :data:`INPUT_GRAD_ATTR`."""
    if enabled:
        module.forward = types.MethodType(deferred_forward, module)
        setattr(module, INPUT_GRAD_ATTR, unselected_input_grad)
    elif installed(module):
        del module.forward
        for attr in (SELECTION_ATTR, INPUT_GRAD_ATTR):
            if hasattr(module, attr):
                delattr(module, attr)
