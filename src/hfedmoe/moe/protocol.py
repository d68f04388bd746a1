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

    def router_modules(self) -> list[nn.Module] | None:
        """Per MoE layer, the router module whose forward returns the router logits
        (for routing masks and gate-entropy losses); None where the layout's routers
        return something else."""
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

    def enable_deferred_backward(self, enabled: bool) -> bool: ...

    def unselected_expert_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]: ...

    def set_selection(self, selection: torch.Tensor) -> None: ...

    # --- routing records of the last forward pass ------------------------------------
    def router_probs(self) -> torch.Tensor: ...

    def dispatch(self) -> torch.Tensor: ...

    def aux_loss(self) -> torch.Tensor | None: ...
