"""Model access for Switch Transformers (transformers 5.x), separate expert modules.

``SwitchTransformersSparseMLP`` holds a ``router`` (``SwitchTransformersTop1Router``
with a ``classifier`` Linear of weight [E, H]) and ``experts``, a ModuleDict of E
separate ``expert_{i}`` FFNs. Sparse layers alternate with dense ones in both the
encoder and the decoder; L counts every sparse MLP in module order (encoder layers
first, then decoder layers). :class:`SwitchMoEAccess` implements the
:class:`~hfedmoe.moe.protocol.MoEAccess` protocol over that layout.

State keys are the model's own (one expert = its ``experts.expert_{i}.*`` tensors),
so no virtual keys are needed, and training only the selected experts is exact by
construction: unselected experts are not backward inputs and get no gradient.

G_e is ``softmax(router_logits)`` over all experts (the router computes it in
``router_dtype``, float32 by default); dispatch is the router's returned one-hot
``expert_index``, i.e. top-1 AFTER the expert-capacity cut: a token over its expert's
capacity is dispatched to no expert (an all-False row).

:meth:`SwitchMoEAccess.routing_override` re-runs the router's rule
(:func:`~hfedmoe.moe.routing.switch_routing`) with the routing mask (logit -inf) and a
top-k (each chosen expert weighted by its probability, capacity per expert);
:meth:`SwitchMoEAccess.routed_output_scale` scales the experts' combined output, before
the residual that ``SwitchTransformersLayerFF`` adds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hfedmoe.moe.protocol import (
    NoMoELayersError,
    ParamGroups,
    RouterCapture,
    check_routing_override,
    common_expert_count,
)
from hfedmoe.moe.routing import (
    RECORDS,
    LayerRecord,
    has_hook,
    masked_logits,
    routed_count,
    scale_output_hook,
    switch_routing,
)
from hfedmoe.moe.state_keys import check_selection, check_state_keys, is_head_parameter


@dataclass(frozen=True)
class SwitchBlock:
    """One sparse MLP: module paths of the block, its router and its experts."""

    name: str
    router_name: str
    expert_names: tuple[str, ...]  # module path of each expert, index = expert id

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def experts_name(self) -> str:
        """Module path of the experts container."""
        return self.expert_names[0].rsplit(".", 1)[0]


def _router_width(router: nn.Module) -> int | None:
    """E if the router scores experts with a ``classifier`` of weight [E, H] (the
    Switch/NLLB-MoE convention; hfedmoe's own MoEFeedForward router is a bare Linear
    and is driven by ModularMoEAccess instead), else None."""
    weight = getattr(getattr(router, "classifier", None), "weight", None)
    return weight.shape[0] if isinstance(weight, nn.Parameter) and weight.dim() == 2 else None


def _separate_experts(container: nn.Module) -> list[str] | None:
    """Child names of a ModuleDict/ModuleList of >= 2 experts with identical parameter shapes."""
    if not isinstance(container, (nn.ModuleDict, nn.ModuleList)):
        return None
    children = list(container.named_children())
    shapes = [tuple((n, tuple(p.shape)) for n, p in child.named_parameters()) for _, child in children]
    if len(children) < 2 or not shapes[0] or any(s != shapes[0] for s in shapes):
        return None
    return [name for name, _ in children]


def find_switch_blocks(model: nn.Module) -> list[SwitchBlock]:
    """Every separate-expert sparse MLP: a ``router`` child with an [E, H] weight next
    to an ``experts`` ModuleDict/ModuleList of E structurally identical experts."""
    blocks = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        router, experts = children.get("router"), children.get("experts")
        if router is None or experts is None:
            continue
        names = _separate_experts(experts)
        if names is not None and _router_width(router) == len(names):
            prefix = f"{name}." if name else ""
            blocks.append(SwitchBlock(name, f"{prefix}router", tuple(f"{prefix}experts.{n}" for n in names)))
    return blocks


def detect_switch(model: nn.Module) -> bool:
    """True when ``model`` has a Switch-style sparse MLP (separate experts + router)."""
    return bool(find_switch_blocks(model))


def decoder_layer_flags(model: nn.Module) -> list[bool]:
    """Per sparse layer, in :class:`SwitchMoEAccess`'s layer order: True for a layer of
    ``model.get_decoder()`` (what :class:`~hfedmoe.models.hf_wrappers.Seq2SeqAsLM` needs
    to mask each layer's routing to its real positions)."""
    decoder = model.get_decoder()
    in_decoder = {id(m) for m in decoder.modules()}
    modules = dict(model.named_modules())
    return [id(modules[block.name]) in in_decoder for block in find_switch_blocks(model)]


def _switch_router_hook(module: nn.Module, args: tuple, output) -> None:
    """Record G_e and the (capacity-cut) top-1 dispatch from the router's outputs."""
    record = RECORDS.get(module)
    if record is None:
        return
    if not (isinstance(output, tuple) and len(output) == 3 and output[0].shape == output[2].shape):
        raise RuntimeError(
            f"{type(module).__name__} did not return (expert_index [B, T, E], router_probs, router_logits)"
        )
    expert_index, _, logits = output
    with torch.no_grad():
        record.probs = torch.softmax(logits.detach().float(), dim=-1)
        record.dispatch = expert_index.detach().bool()


class SwitchRoutingOverride:
    """Router forward hook of :meth:`SwitchMoEAccess.routing_override`.

    Returns the router's ``(expert_index, router_probs, router_logits)`` recomputed by
    :func:`~hfedmoe.moe.routing.switch_routing` with the mask and top-k, logits masked
    (-inf at removed experts; with gradient into ``capture.logits[index]``). For
    top_k > 1, ``router_probs`` keeps its [B, T, 1] shape (the sparse MLP reshapes it to
    one weight per token) and :meth:`experts_pre_hook` hands the experts the per-slot
    dispatch [N, k, E] and weights [N, k] instead, which ``SwitchTransformersExperts``
    reads slot by slot. Without a mask and at top-1 the router's output passes untouched.
    """

    def __init__(self, keep: torch.Tensor | None, top_k: int | None, capture: RouterCapture, index: int,
                 num_experts: int):
        self.keep, self.capture, self.index, self.num_experts = keep, capture, index, num_experts
        self.top_k = routed_count(keep, top_k or 1, num_experts)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.checked = False

    def __call__(self, module: nn.Module, args: tuple, output):
        self.pending = None
        expert_index, router_probs, logits = output
        masked = masked_logits(logits, self.keep)
        self.capture.logits[self.index] = masked
        if self.keep is None and self.top_k == 1:
            return None
        rule = dict(expert_capacity=module.expert_capacity, router_dtype=module.dtype, input_dtype=router_probs.dtype)
        if not self.checked:
            with torch.no_grad():
                own_index, _, own_weights = switch_routing(logits.detach(), None, 1, **rule)
            same = torch.equal(own_index, expert_index) and own_weights.shape == router_probs.shape
            if not (same and torch.allclose(own_weights.float(), router_probs.float(), rtol=1e-5, atol=1e-7)):
                raise RuntimeError(f"{type(module).__name__}: hfedmoe's Switch routing rule does not reproduce "
                                   "this router's routing; routing masks and top-k are not supported for it")
            self.checked = True
        index, slots, weights = switch_routing(logits, self.keep, self.top_k, **rule)
        if self.top_k > 1:
            self.pending = (slots.reshape(-1, self.top_k, self.num_experts), weights.reshape(-1, self.top_k))
        return index.to(expert_index.dtype), weights[..., :1], masked

    def experts_pre_hook(self, module: nn.Module, args: tuple):
        """Forward pre-hook on the experts: the per-slot dispatch and weights (top_k > 1)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if len(args) != 3 or args[0].shape[0] != pending[0].shape[0]:
            raise RuntimeError(f"{type(module).__name__} was called with {len(args)} positional arguments over "
                               f"{args[0].shape[0] if args else 0} tokens; routing_override expects "
                               "(hidden_states [N, H], selected_experts, routing_weights) over its router's tokens")
        return (args[0], *pending)


class SwitchMoEAccess:
    """Access to a Switch Transformers model (encoder-decoder or encoder-only).

    Parameters
    ----------
    model : nn.Module
        The model; inspected once, not copied. A forward hook is registered on every
        router (once per module, however many access objects are built).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = find_switch_blocks(model)
        if not self.blocks:
            raise NoMoELayersError(f"{type(model).__name__} has no Switch-style sparse MLP (router + experts)")
        self.num_experts = common_expert_count([block.num_experts for block in self.blocks])
        self.layer_names = [block.name for block in self.blocks]

        self._params = dict(model.named_parameters())
        self._state_keys = list(model.state_dict().keys())
        self._expert_keys: dict[tuple[int, int], list[str]] = {}
        self._expert_params: dict[tuple[int, int], list[str]] = {}
        self._router_keys: list[str] = []
        for layer, block in enumerate(self.blocks):
            for e, expert in enumerate(block.expert_names):
                self._expert_keys[(layer, e)] = [k for k in self._state_keys if k.startswith(expert + ".")]
                self._expert_params[(layer, e)] = [n for n in self._params if n.startswith(expert + ".")]
            self._router_keys += [k for k in self._state_keys if k.startswith(block.router_name + ".")]
        grouped = set(self._router_keys).union(*self._expert_keys.values())
        self._dense_keys = [k for k in self._state_keys if k not in grouped]
        routers = set(self._router_keys)
        self._router_params = [n for n in self._params if n in routers]
        self._dense_params = [n for n in self._params if n not in grouped]
        self._records = [self._register(model.get_submodule(b.router_name)) for b in self.blocks]

    def _register(self, router: nn.Module) -> LayerRecord:
        record = RECORDS.get(router)
        if record is None:
            record = LayerRecord("softmax", self.num_experts)
            RECORDS[router] = record
        if not has_hook(router._forward_hooks, _switch_router_hook):
            router.register_forward_hook(_switch_router_hook)
        return record

    # --- structure -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Number of sparse (MoE) layers L, encoder and decoder together."""
        return len(self.blocks)

    @property
    def num_experts_total(self) -> int:
        return self.num_layers * self.num_experts

    def expert_param_names(self, layer: int, expert: int) -> list[str]:
        return list(self._expert_keys[(layer, expert)])

    def router_param_names(self) -> list[str]:
        """State keys of the routers (their ``classifier`` weights)."""
        return list(self._router_keys)

    def dense_param_names(self) -> list[str]:
        """State keys of everything else (attention, dense FFNs, norms, embeddings, heads)."""
        return list(self._dense_keys)

    def param_groups(self) -> ParamGroups:
        return ParamGroups(self._expert_keys, self._router_keys, self._dense_keys, self.num_layers, self.num_experts)

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached snapshot (contiguous copies; tied embeddings appear under each of
        their names, each its own copy)."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load in place. strict: every key present, none unknown (ValueError naming the
        key); otherwise load the known keys that are present."""
        if strict:
            check_state_keys(self._state_keys, state)
        current = self.model.state_dict()
        known = {k: v for k, v in state.items() if k in current}
        for key, value in known.items():
            if tuple(value.shape) != tuple(current[key].shape):
                expected = tuple(current[key].shape)
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not match the model's {expected}")
        self.model.load_state_dict(known, strict=False)

    def new_parameter_names(self) -> set[str]:
        """Nothing in a pretrained Switch checkpoint is new, except a top-level
        ``classifier``/``score`` head added for a task."""
        # Named like a head wherever the model sits: top level, or inside hfedmoe's
        # own wrappers ("model.score.weight"); Switch routers' "classifier" is not one.
        routers = set(self._router_keys)
        return {n for n in self._params if n not in routers and is_head_parameter(n)}

    # --- training ------------------------------------------------------------------------
    def _check_selection(self, selection: torch.Tensor) -> torch.Tensor:
        return check_selection(selection, self.num_layers, self.num_experts)

    def trainable_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]:
        """Dense + router parameters and the parameters of the selected experts only."""
        selection = self._check_selection(selection)
        names = self._dense_params + self._router_params
        for layer, expert in selection.nonzero().tolist():
            names = names + self._expert_params[(layer, expert)]
        return [self._params[n] for n in names if self._params[n].requires_grad]

    def set_selection(self, selection: torch.Tensor) -> None:
        """Nothing to arm: unselected experts are simply not backward inputs."""
        self._check_selection(selection)

    def unselected_expert_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]:
        """Parameters of the experts ``selection`` leaves out."""
        selection = self._check_selection(selection)
        return [self._params[n] for le in (~selection).nonzero().tolist() for n in self._expert_params[tuple(le)]]

    def enable_deferred_backward(self, enabled: bool, unselected: str = "detach") -> bool:
        """Deferred expert backward is not implemented for Switch: returns False."""
        return False

    # Separate expert modules: the optimizer sees one tensor per expert, never slices.
    optimizer_slices_experts = False

    @property
    def top_k(self) -> int:
        """Switch routes every token to one expert."""
        return 1

    def memory_estimate_top_k(self) -> int:
        """2, not :attr:`top_k` (1): the analytic memory estimate has always counted two
        expert activations per token for the Hugging Face layouts (kept so that budgets
        and calibrations do not change)."""
        return 2

    @property
    def renormalizes_top_k(self) -> bool:
        """False: a Switch token's expert output is weighted by its raw probability."""
        return False

    @contextlib.contextmanager
    def routing_override(self, mask: torch.Tensor | None = None,
                         top_k: int | None = None) -> Iterator[RouterCapture]:
        """Route to ``top_k`` experts (default 1) within ``mask`` while open (see the protocol).

        A forward hook on each router (:class:`SwitchRoutingOverride`, run before the
        routing record) re-runs the router's rule (:func:`~hfedmoe.moe.routing.switch_routing`)
        on its logits with the mask (logit -inf: probability 0) and ``top_k`` applied,
        expert capacity included. With top_k > 1 the sparse MLP's own call cannot carry a
        weight per expert, so a forward pre-hook on its experts passes them the per-slot
        dispatch and weights instead. A layer keeping fewer than ``top_k`` experts routes
        each token to all it keeps; :attr:`top_k` stays the model's own (1).
        """
        check_routing_override(mask, top_k, self.num_layers, self.num_experts)
        capture = RouterCapture(self.num_layers)
        handles = []
        try:
            for index, block in enumerate(self.blocks):
                router = self.model.get_submodule(block.router_name)
                keep = None if mask is None else mask[index].to(router.classifier.weight.device)
                hook = SwitchRoutingOverride(keep, top_k, capture, index, self.num_experts)
                handles.append(router.register_forward_hook(hook, prepend=True))
                experts = self.model.get_submodule(block.experts_name)
                handles.append(experts.register_forward_pre_hook(hook.experts_pre_hook, prepend=True))
            yield capture
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def routed_output_scale(self, scales: torch.Tensor) -> Iterator[None]:
        """Multiply each sparse MLP's routed-expert combination by ``scales[l]`` while open
        (a forward hook on its ``experts``; the residual added by the layer around the
        sparse MLP is not scaled; Switch has no shared experts)."""
        if tuple(scales.shape) != (self.num_layers,):
            raise ValueError(f"scales must be Tensor[{self.num_layers}], got {tuple(scales.shape)}")
        handles = [self.model.get_submodule(block.experts_name).register_forward_hook(scale_output_hook(scales, i))
                   for i, block in enumerate(self.blocks)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def freeze_unselected(
        self, selection: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
    ) -> Iterator[None]:
        """Guard around ``optimizer.step()``.

        Normally a no-op: unselected experts got no gradient, so the optimizer skips
        them. If one does hold a gradient (stale grads zeroed instead of set to None,
        or a backward over all parameters), its weights are restored after the step so
        the guarantee holds anyway. ``optimizer`` is accepted for protocol symmetry with
        the fused layout; whole tensors with a None gradient keep their state untouched.
        """
        selection = self._check_selection(selection)
        saved = []
        for (layer, expert), names in self._expert_params.items():
            if selection[layer, expert]:
                continue
            for name in names:
                param = self._params[name]
                if param.grad is not None:
                    saved.append((param, param.detach().clone()))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in saved:
                    param.copy_(value)

    # --- routing records of the last forward pass ----------------------------------------
    def router_probs(self) -> torch.Tensor:
        """Tensor[B, T, L, S]: softmax router probabilities of every token, every sparse layer."""
        return self._stack("probs")

    def dispatch(self) -> torch.Tensor:
        """BoolTensor[B, T, L, S]: each token's expert (top-1 after the capacity cut)."""
        return self._stack("dispatch")

    def aux_loss(self) -> None:
        """None: the HF model computes its own router losses (``output_router_logits``)."""
        return None

    def _stack(self, attr: str) -> torch.Tensor:
        values = [getattr(record, attr) for record in self._records]
        if any(v is None for v in values):
            raise RuntimeError("no routing recorded yet: run a forward pass first")
        shapes = {tuple(v.shape[:2]) for v in values}
        if len(shapes) != 1:
            raise RuntimeError(
                f"the sparse layers saw different [B, T] token shapes {sorted(shapes)} (encoder vs decoder "
                "lengths): router_probs()/dispatch() need one token axis; give the decoder inputs of the "
                "encoder's length, or score encoder and decoder layers separately"
            )
        return torch.stack(values, dim=2)
