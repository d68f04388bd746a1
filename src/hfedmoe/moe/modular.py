"""Model access for separate-expert ``MoEFeedForward`` blocks (the embedded model).

:class:`ModularMoEAccess` implements the :class:`~hfedmoe.moe.protocol.MoEAccess`
protocol over every :class:`~hfedmoe.models.moe_block.MoEFeedForward` of a model (the
upcycled encoder of :mod:`hfedmoe.models.upcycled`, or any model built from that
block). State keys are the model's own; one expert = its ``experts.<e>.*`` tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hfedmoe.models.moe_block import MoEFeedForward
from hfedmoe.moe.protocol import (
    NoMoELayersError,
    ParamGroups,
    RouterCapture,
    check_routing_override,
    common_expert_count,
)


UNSELECTED_MODES = ("detach", "freeze")


def _capture_logits(capture: RouterCapture, index: int, keep: torch.Tensor | None):
    """Router forward hook: mask the logits (-inf outside ``keep``) and keep them."""
    def hook(module: nn.Module, inputs, logits: torch.Tensor) -> torch.Tensor:
        if keep is not None:
            logits = logits.masked_fill(~keep.to(logits.device), float("-inf"))
        capture.logits[index] = logits
        return logits

    return hook


def _scale_output(scales: torch.Tensor, index: int):
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output * scales[index].to(output.dtype)

    return hook


def detect_modular(model: nn.Module) -> bool:
    """True when ``model`` holds at least one separate-expert ``MoEFeedForward`` block."""
    return any(isinstance(m, MoEFeedForward) for m in model.modules())


class ModularMoEAccess:
    """Access to a model whose MoE layers are separate-expert ``MoEFeedForward`` blocks.

    Parameters
    ----------
    model : nn.Module
        The model; it is inspected once, not copied.
    block_types : tuple of types
        The module classes that are MoE layers. Default hfedmoe's ``MoEFeedForward``;
        a block of your own qualifies when it keeps the same contract (``router``: a
        Linear returning logits, ``experts``: a ModuleList, ``num_experts``,
        ``top_k``, the ``last_router_probs`` / ``last_dispatch`` / ``last_aux_loss``
        records of its last forward, and it reads ``selected`` and
        ``deferred_backward``); docs/extending.md shows one.
    """

    def __init__(self, model: nn.Module, block_types: tuple[type[nn.Module], ...] = (MoEFeedForward,)):
        self.model = model
        self.layer_names: list[str] = []
        self.layers: list[nn.Module] = []
        for name, module in model.named_modules():
            if isinstance(module, block_types):
                self.layer_names.append(name)
                self.layers.append(module)
        if not self.layers:
            raise NoMoELayersError(
                f"{type(model).__name__} has no Mixture-of-Experts layer: pass a MoE model "
                "(or let hfedmoe upcycle a dense encoder with --num-experts)"
            )
        self.num_experts = common_expert_count([layer.num_experts for layer in self.layers])

        names = [n for n, _ in model.named_parameters()]
        self._expert_names: dict[tuple[int, int], list[str]] = {}
        self._router_names: list[str] = []
        for l, prefix in enumerate(self.layer_names):
            self._router_names += [n for n in names if n.startswith(f"{prefix}.router.")]
            for e in range(self.num_experts):
                self._expert_names[(l, e)] = [n for n in names if n.startswith(f"{prefix}.experts.{e}.")]
        grouped = set(self._router_names).union(*self._expert_names.values())
        self._dense_names = [n for n in names if n not in grouped]
        self._params = dict(model.named_parameters())

    # --- structure -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Number of MoE layers L."""
        return len(self.layers)

    @property
    def num_experts_total(self) -> int:
        """L * S: the budget that trains every expert."""
        return self.num_layers * self.num_experts

    # Separate expert modules: the optimizer sees one tensor per expert, never slices.
    optimizer_slices_experts = False

    @property
    def top_k(self) -> int:
        """Experts per token of the first MoE layer (upcycled models use one top-k)."""
        return self.layers[0].top_k

    @property
    def renormalizes_top_k(self) -> bool:
        """True: MoEFeedForward renormalises the top-k probabilities (Mixtral's convention)."""
        return True

    def memory_estimate_top_k(self) -> int:
        """The analytic memory estimate counts each token's ``top_k`` expert activations."""
        return self.top_k

    def expert_param_names(self, layer: int, expert: int) -> list[str]:
        """State-dict names of expert ``expert`` of MoE layer ``layer``."""
        return self._expert_names[(layer, expert)]

    def router_param_names(self) -> list[str]:
        return list(self._router_names)

    def dense_param_names(self) -> list[str]:
        return list(self._dense_names)

    def param_groups(self) -> ParamGroups:
        """Partition of the full ``state_dict`` (buffers count as dense)."""
        grouped = set(self._router_names).union(*self._expert_names.values())
        dense = [k for k in self.model.state_dict() if k not in grouped]
        return ParamGroups(self._expert_names, self._router_names, dense, self.num_layers, self.num_experts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached parameters and persistent buffers: what crosses the wire."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        self.model.load_state_dict(state, strict=strict)

    def new_parameter_names(self) -> set[str]:
        """Parameters that start untrained (routers, task head): larger learning rate."""
        names = set(self._router_names)
        return names | {n for n in self._params if n.startswith("classifier.")}

    def unselected_expert_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]:
        """Parameters of the experts ``selection`` leaves out."""
        return [self._params[n] for l, e in (~selection).nonzero().tolist() for n in self._expert_names[(l, e)]]

    def enable_deferred_backward(self, enabled: bool, unselected: str = "detach") -> bool:
        """Back-propagate only through the experts selected after the forward pass.

        Saves the activation memory of unselected experts and, with ``unselected=
        "detach"``, their whole backward (see :class:`~hfedmoe.models.moe_block.DeferredExperts`;
        ``"freeze"`` recomputes them for the input gradient only); worth it only when
        the budget leaves experts out. Returns whether the layout supports it (it does).
        """
        if unselected not in UNSELECTED_MODES:
            raise ValueError(f"unselected={unselected!r}: choose one of {', '.join(UNSELECTED_MODES)}")
        for layer in self.layers:
            layer.deferred_backward = enabled
            layer.unselected_input_grad = enabled and unselected == "freeze"
            layer.selected = None  # no selection of an earlier round (or step) carries over
        return True

    @contextlib.contextmanager
    def routing_override(self, mask: torch.Tensor | None = None,
                         top_k: int | None = None) -> Iterator[RouterCapture]:
        """Route to ``top_k`` experts within ``mask`` while open (see the protocol).

        The router is a bare Linear: masked experts get logit -inf, so their softmax
        probability is exactly 0 and top-k never prefers them; ``top_k`` replaces each
        block's own while open.
        """
        check_routing_override(mask, top_k, self.num_layers, self.num_experts)
        capture = RouterCapture(self.num_layers)
        saved = [layer.top_k for layer in self.layers]
        handles = []
        try:
            for index, layer in enumerate(self.layers):
                if top_k is not None:
                    layer.top_k = top_k
                keep = None if mask is None else mask[index]
                handles.append(layer.router.register_forward_hook(_capture_logits(capture, index, keep)))
            yield capture
        finally:
            for handle in handles:
                handle.remove()
            for layer, k in zip(self.layers, saved):
                layer.top_k = k

    @contextlib.contextmanager
    def routed_output_scale(self, scales: torch.Tensor) -> Iterator[None]:
        """Multiply each block's output (its routed experts' combination) by ``scales[l]``."""
        if tuple(scales.shape) != (self.num_layers,):
            raise ValueError(f"scales must be Tensor[{self.num_layers}], got {tuple(scales.shape)}")
        handles = [layer.register_forward_hook(_scale_output(scales, index))
                   for index, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def set_selection(self, selection: torch.Tensor) -> None:
        """Tell every MoE layer which of its experts to train in this backward pass."""
        for l, layer in enumerate(self.layers):
            layer.selected = selection[l]

    @contextlib.contextmanager
    def freeze_unselected(
        self, selection: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
    ) -> Iterator[None]:
        """Guard around ``optimizer.step()``; nothing to do for separate experts.

        Unselected experts got no gradient (see :meth:`trainable_parameters`), so the
        optimizer skips them entirely. Fused layouts restore their slices here.
        """
        yield

    def trainable_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]:
        """Dense + router parameters and the parameters of the selected experts.

        ``selection`` is a BoolTensor[L, S]. Passing exactly these tensors to
        ``loss.backward(inputs=...)`` makes autograd skip the weight gradients of
        every other expert: they are never computed, never allocated, and the
        optimizer (which skips parameters whose ``grad`` is None) leaves those
        experts bit-for-bit unchanged, weight decay included.
        """
        names = self._dense_names + self._router_names
        for l, e in selection.nonzero().tolist():
            names = names + self._expert_names[(l, e)]
        return [self._params[n] for n in names]

    # --- routing records of the last forward pass ---------------------------------
    def router_probs(self) -> torch.Tensor:
        """Tensor[B, T, L, S]: each token's router probabilities in every MoE layer."""
        return torch.stack([self._record(layer, "last_router_probs") for layer in self.layers], dim=2)

    def dispatch(self) -> torch.Tensor:
        """BoolTensor[B, T, L, S]: which experts each token was sent to."""
        return torch.stack([self._record(layer, "last_dispatch") for layer in self.layers], dim=2)

    def aux_loss(self) -> torch.Tensor:
        """Mean load-balancing loss over the MoE layers (with gradient)."""
        return torch.stack([self._record(layer, "last_aux_loss") for layer in self.layers]).mean()

    @staticmethod
    def _record(layer: MoEFeedForward, attr: str) -> torch.Tensor:
        value = getattr(layer, attr)
        if value is None:
            raise RuntimeError("no routing recorded yet: run a forward pass first")
        return value
