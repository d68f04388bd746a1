"""The model-access protocol: one small interface over a model's MoE structure.

Every layout implements :class:`MoEAccess` (see :mod:`hfedmoe.moe.families` for the
table of layouts); the trainer, the policies, the resource model and the Flower layer
use nothing else, so none of them probes an access object with ``getattr``/``hasattr``.
The wire/state format is always one key per expert tensor ("virtual" keys for fused
layouts, see :mod:`hfedmoe.moe.state_keys`), so aggregation never sees the layout.

Everything above this layer (the local trainer, the Flower strategy) talks about
"expert e of MoE layer l", "the routers" and "the dense parameters"; an access object
maps those onto a concrete model's parameters and its routing records. Layers are
found by module structure, never by a list of model names.

Parameter groups partition the model's trainable state:
- experts: ``expert_param_names(l, e)``: the parameters of one routed expert;
- routers: the gating networks G_l;
- dense: everything else (attention, embeddings, norms, the task head).
"""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

import torch
from torch import nn


class NoMoELayersError(ValueError):
    """The model has no Mixture-of-Experts layer this project knows how to drive."""


def common_expert_count(counts: list[int]) -> int:
    """S, the routed experts per MoE layer; every layer must have the same number
    (C_budget, the [L, S] statistics and the wire format assume it)."""
    distinct = sorted(set(counts))
    if len(distinct) != 1:
        raise NoMoELayersError(f"MoE layers have different expert counts {distinct}; not supported")
    return distinct[0]


class ParamGroups:
    """Which state-dict keys are experts, routers and dense parameters.

    A plain, model-free description the server-side strategy works with, so the
    Flower layer never touches the model object. Built by
    :meth:`MoEAccess.param_groups`.
    """

    def __init__(
        self,
        experts: dict[tuple[int, int], list[str]],
        routers: list[str],
        dense: list[str],
        num_layers: int,
        num_experts: int,
    ):
        self.experts = {k: tuple(v) for k, v in experts.items()}
        self.routers = tuple(routers)
        self.dense = tuple(dense)
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.expert_of = {name: le for le, names in self.experts.items() for name in names}

    @property
    def all_expert_keys(self) -> list[str]:
        return [name for names in self.experts.values() for name in names]


class RouterCapture:
    """Per MoE layer, the router logits of the last forward pass under
    :meth:`MoEAccess.routing_override`, masked (-inf outside the mask) and with gradient."""

    def __init__(self, num_layers: int):
        self.logits: list[torch.Tensor | None] = [None] * num_layers

    def entropy(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over layers and real tokens of H(p) = -sum_e p_e log p_e (with gradient).

        p is the softmax of the captured (masked) logits, so with a mask the entropy is
        over the surviving experts only (masked experts have p = 0).
        """
        if any(logits is None for logits in self.logits):
            raise RuntimeError("no router logits captured: run a forward pass inside routing_override()")
        real = attention_mask.reshape(-1).bool()
        per_layer = []
        for logits in self.logits:
            # Masked experts have logit -inf; a finite floor gives them p = 0 with a
            # zero gradient (the derivative of p log p is infinite at p = 0: NaN otherwise).
            log_probs = torch.log_softmax(logits.reshape(real.numel(), -1).float().clamp(min=-1e4), dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
            per_layer.append(entropy[real].mean())
        return torch.stack(per_layer).mean()


def check_routing_override(mask: torch.Tensor | None, top_k: int | None, num_layers: int,
                           num_experts: int) -> None:
    """ValueError unless ``mask`` is BoolTensor[L, S] keeping >= 1 expert per layer and
    1 <= ``top_k`` <= S."""
    if mask is not None:
        if tuple(mask.shape) != (num_layers, num_experts) or mask.dtype != torch.bool:
            raise ValueError(f"routing mask must be BoolTensor[{num_layers}, {num_experts}], "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("routing mask removes every expert of some layer: keep at least one per layer")
    if top_k is not None and not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and the {num_experts} experts per layer")


@runtime_checkable
class MoEAccess(Protocol):
    """What the trainer, the policies, the resource model and the Flower layer need
    from a MoE model. Every member is implemented by every layout."""

    # --- structure -------------------------------------------------------------------
    model: nn.Module
    """The driven model (inspected once, never copied)."""
    num_experts: int
    """S: routed experts per MoE layer (the same in every layer)."""
    layer_names: list[str]
    """Module path of each MoE layer, in layer order."""
    optimizer_slices_experts: bool
    """True when every expert tensor is fused with the expert index first (``[E, ...]``),
    so an optimizer can update it slice by slice (:class:`~hfedmoe.moe.slice_adamw.ExpertSliceAdamW`)."""

    @property
    def num_layers(self) -> int:
        """L: MoE layers (dense layers do not count)."""
        ...

    @property
    def num_experts_total(self) -> int:
        """L * S: the budget that trains every expert."""
        ...

    @property
    def top_k(self) -> int | None:
        """Experts each token is routed to, as the model declares it (None: the layout's
        router does not say)."""
        ...

    @property
    def renormalizes_top_k(self) -> bool:
        """Whether each token's top-k routing weights are renormalised to sum to one (then
        routing fewer experts does not shrink the combined output's magnitude)."""
        ...

    def memory_estimate_top_k(self) -> int:
        """Experts per token assumed by the analytic activation-memory estimate
        (:func:`hfedmoe.budgets.analytic_model_for`)."""
        ...

    def expert_param_names(self, layer: int, expert: int) -> list[str]:
        """State keys of expert ``expert`` of MoE layer ``layer``."""
        ...

    def router_param_names(self) -> list[str]:
        """State keys of the routers."""
        ...

    def dense_param_names(self) -> list[str]:
        """State keys of everything else."""
        ...

    def param_groups(self) -> ParamGroups:
        """Partition of the keys of :meth:`state_dict`."""
        ...

    # --- state -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None: ...

    def new_parameter_names(self) -> set[str]:
        """Parameters that start untrained (they get the larger learning rate)."""
        ...

    # --- training --------------------------------------------------------------------
    def trainable_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]: ...

    def freeze_unselected(
        self, selection: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
    ) -> contextlib.AbstractContextManager: ...

    def enable_deferred_backward(self, enabled: bool, unselected: str = "detach") -> bool:
        """Back-propagate only through the experts selected after the forward pass (no
        activation memory for the others); returns whether the layout supports it.

        ``unselected`` says what the backward does with an expert a token was routed to
        but that is not selected: ``"detach"`` treats its output as a constant (no weight
        gradient, no input gradient: the layers below miss that path), ``"freeze"`` gives
        it no weight gradient but passes the input gradient through it (the paper's "mask
        the unselected experts' gradients"; the backward recomputes its activations).
        Without the deferred backward (plain autograd) every layout behaves as ``"freeze"``.
        """
        ...

    def unselected_expert_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]: ...

    def set_selection(self, selection: torch.Tensor) -> None: ...

    # --- routing control (FedMoE, SEER-MoE, FLAME) -----------------------------------
    def routing_override(
        self, mask: torch.Tensor | None = None, top_k: int | None = None
    ) -> contextlib.AbstractContextManager["RouterCapture"]:
        """While open, every MoE layer routes each token to its ``top_k`` best experts
        (None: the model's own k) among those where ``mask[l]`` (BoolTensor[L, S]; None:
        all) is True, with the layer's own score function, normalisation and scaling.
        Masked experts get probability 0 in :meth:`router_probs`. Yields a
        :class:`RouterCapture` holding each layer's (masked) router logits of the last
        forward pass, with gradient, for losses on the gate distribution."""
        ...

    def routed_output_scale(self, scales: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """While open, the combined output of each layer's routed experts is multiplied by
        ``scales[l]`` (Tensor[L]; gradients reach it when it requires grad). Shared
        experts and the residual path are not scaled (FLAME's rescaler)."""
        ...

    # --- routing records of the last forward pass ------------------------------------
    def router_probs(self) -> torch.Tensor: ...

    def dispatch(self) -> torch.Tensor: ...

    def aux_loss(self) -> torch.Tensor | None: ...
