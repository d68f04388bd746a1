"""Model access for transformers 5.x MoE families whose routed experts are fused.

In transformers 5.x the routed experts of a MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE, DeepSeek-V2/V3 and most newer families) are ONE module holding 3-D
parameters, one slice per expert, e.g. ``experts.gate_up_proj [E, 2I, H]`` and
``experts.down_proj [E, H, I]``, next to a router module (``gate`` or ``router``)
with a ``[E, H]`` weight that returns ``(router_logits, top_k_weights, top_k_index)``.
:class:`FusedMoEAccess` implements the :class:`~hfedmoe.moe.protocol.MoEAccess`
protocol over that layout, with the same semantics as
:class:`~hfedmoe.moe.modular.ModularMoEAccess`.

Layers are found by module structure (see :func:`find_fused_blocks`), never by model
class names, so dense layers (DeepSeek ``first_k_dense_replace``, Qwen
``mlp_only_layers`` / ``decoder_sparse_step``) are simply not MoE layers: L counts
the MoE blocks only, in module order.

Virtual keys (the wire format)
------------------------------
Aggregation works per expert, so :meth:`FusedMoEAccess.state_dict` splits every
fused tensor into one key per expert, ``<real key>.__expert__.<e>`` (see
:mod:`hfedmoe.moe.state_keys`); the constructor checks that no real key collides with
a virtual one. All other keys are unchanged.

G_e per family (what :meth:`FusedMoEAccess.router_probs` returns)
-----------------------------------------------------------------
The router's forward output is recorded by a forward hook (:mod:`hfedmoe.moe.routing`). G_e is the router's own
score function applied to the logits the router returned, over ALL experts, i.e. the
scores the model gathers its top-k expert weights from:

- Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2: ``softmax(router_logits)``
  (float32). Rows sum to one. The top-k weights are these scores at the chosen
  experts (renormalised where ``norm_topk_prob``; times ``routed_scaling_factor`` for
  DeepSeek-V2).
- DeepSeek-V3 (and every router with an ``e_score_correction_bias``, e.g. GLM-4-MoE,
  dots1): ``sigmoid(router_logits)``, the affinity scores s_i WITHOUT the correction
  bias. The bias (and the group limit) only decide WHICH experts are chosen; the
  expert weights are gathered from the unbiased sigmoid scores. Rows do not sum to
  one. Selection with the bias is captured exactly in :meth:`FusedMoEAccess.dispatch`,
  which is built from the router's returned top-k indices, never recomputed.
- A config attribute ``scoring_func`` ("softmax" | "sigmoid"), when present, overrides
  the structural rule; any other scoring function is rejected at construction.

Routing override (FedMoE, SEER-MoE, FLAME)
------------------------------------------
The routers compute their logits and top-k in one forward, so a routing mask cannot be
applied to their output. :meth:`FusedMoEAccess.routing_override` hooks each router and
re-runs its own rule on the logits it returned, with the mask and top-k applied inside
the rule (:mod:`hfedmoe.moe.routing`, one pure function per family): removed experts get
logit -inf, i.e. softmax probability 0 (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V2:
the softmax runs over the kept experts; renormalisation and ``routed_scaling_factor``
as the router does them) or sigmoid score 0 and no say in DeepSeek-V3's group scores
(a group without kept experts is never chosen; more groups are taken, in order of
score, when the chosen ones hold fewer than top-k kept experts). The rule is checked
once against the router's own output and a router it does not reproduce is refused.
:meth:`FusedMoEAccess.routed_output_scale` hooks the experts module, whose output is the
routed combination (shared experts and the residual are added after it).

``e_score_correction_bias`` is a persistent buffer in the state dict. It belongs to
the ROUTER group: it is part of the routing function G_l and only makes sense
together with the router weight it corrects, so both are merged with the same gate
weights (Eq. 21). It is not trained by gradient (HF fine-tuning leaves it constant),
so as long as all clients hold the global value, the normalised gate merge returns
that value unchanged. (With the literal, un-normalised Eq. 21 it would be rescaled,
exactly like the router weights.)
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

import hfedmoe.moe.fused_deferred as fused_deferred
from hfedmoe.moe.protocol import (
    NoMoELayersError,
    ParamGroups,
    RouterCapture,
    check_routing_override,
    common_expert_count,
)
from hfedmoe.moe.routing import (
    LayerRecord,
    RoutingOverrideHook,
    fused_routing_rule,
    has_hook,
    register_block_routing,
    scale_output_hook,
)
from hfedmoe.moe.slice_adamw import ExpertSliceAdamW
from hfedmoe.moe.state_keys import (
    check_selection,
    check_state_keys,
    check_unique_keys,
    expert_key,
    is_head_parameter,
    split_expert_key,
)

ROUTER_NAMES = ("gate", "router")  # sibling names of the experts module, in order of preference


# --- structure ------------------------------------------------------------------------

@dataclass(frozen=True)
class FusedBlock:
    """One MoE block: its fused expert tensors and its router.

    Attributes
    ----------
    name : str
        Module path of the block (the parent of experts and router).
    router_name : str
        Module path of the router (``<name>.gate`` or ``<name>.router``).
    expert_keys : tuple of str
        Real state-dict keys of the fused per-expert tensors (first dim E).
    num_experts : int
        E, routed experts of this block.
    """

    name: str
    router_name: str
    expert_keys: tuple[str, ...]
    num_experts: int


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def fused_expert_count(module: nn.Module) -> int | None:
    """E if ``module`` stores experts fused, else None: it holds direct parameters
    only, at least one of them 3-D ([E, out, in]), and all share the first dim E >= 2."""
    direct = list(module.parameters(recurse=False))
    if not direct or len(direct) != len(list(module.parameters())):
        return None  # no parameters, or nested ones: not a plain fused layout
    if not any(p.dim() == 3 for p in direct) or any(p.dim() == 0 for p in direct):
        return None
    counts = {p.shape[0] for p in direct}
    return counts.pop() if len(counts) == 1 and min(counts) >= 2 else None


def router_child(block: nn.Module, num_experts: int) -> str | None:
    """Name of the block's router: a ``gate``/``router`` child with a direct [E, H] weight."""
    children = dict(block.named_children())
    for name in ROUTER_NAMES:
        router = children.get(name)
        weight = getattr(router, "weight", None) if router is not None else None
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] == num_experts:
            return name
    return None


def find_fused_blocks(model: nn.Module) -> list[FusedBlock]:
    """Every fused MoE block of ``model``, in module order.

    A block is a module with (a) one or more children whose parameters are all fused
    per-expert tensors of first dim E (see ``fused_expert_count``) and (b) a sibling
    router child named ``gate`` or ``router`` with an ``[E, H]`` weight.
    """
    blocks = []
    for name, module in model.named_modules():
        experts: dict[int, list[str]] = {}
        for child_name, child in module.named_children():
            count = fused_expert_count(child)
            if count is not None and child_name not in ROUTER_NAMES:
                prefix = _join(name, child_name)
                experts.setdefault(count, []).extend(
                    _join(prefix, p) for p, _ in child.named_parameters(recurse=False)
                )
        for count, keys in experts.items():
            router = router_child(module, count)
            if router is not None:
                blocks.append(FusedBlock(name, _join(name, router), tuple(keys), count))
                break
    return blocks


def detect_fused(model: nn.Module) -> bool:
    """True when ``model`` has at least one fused-expert MoE block."""
    return bool(find_fused_blocks(model))


# --- gradient mask ----------------------------------------------------------------------

_GRAD_KEEP: WeakIdKeyDictionary = WeakIdKeyDictionary()  # fused Parameter -> BoolTensor[E]


def _mask_gradient(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: zero the gradient of unselected expert slices."""
    keep = _GRAD_KEEP.get(param)
    if keep is not None and param.grad is not None:
        with torch.no_grad():
            param.grad[~keep.to(param.grad.device)] = 0


# --- the access object --------------------------------------------------------------------

class FusedMoEAccess:
    """Access to a transformers 5.x model whose MoE experts are fused 3-D tensors.

    Parameters
    ----------
    model : nn.Module
        The model; inspected once, not copied. Forward hooks are registered on its MoE
        blocks and routers (once per module, however many access objects are built).

    Raises
    ------
    NoMoELayersError
        The model has no fused MoE block, or its MoE layers differ in expert count.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = find_fused_blocks(model)
        if not self.blocks:
            raise NoMoELayersError(
                f"{type(model).__name__} has no fused Mixture-of-Experts layer (a module with 3-D expert "
                "tensors [E, ...] next to a gate/router with an [E, H] weight)"
            )
        self.num_experts = common_expert_count([block.num_experts for block in self.blocks])
        self.layer_names = [block.name for block in self.blocks]

        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        self._params = params
        self._state_keys = list(model.state_dict().keys())
        self._fused: dict[str, nn.Parameter] = {}
        self._fused_layer: dict[str, int] = {}
        self._expert_keys: dict[tuple[int, int], list[str]] = {}
        self._router_keys: list[str] = []
        self._router_params: list[str] = []
        for layer, block in enumerate(self.blocks):
            for key in block.expert_keys:
                self._fused[key] = params[key]
                self._fused_layer[key] = layer
            for e in range(self.num_experts):
                self._expert_keys[(layer, e)] = [expert_key(key, e) for key in block.expert_keys]
            prefix = block.router_name + "."
            self._router_keys += [k for k in self._state_keys if k.startswith(prefix)]
            self._router_params += [n for n in params if n.startswith(prefix)]
        routers = set(self._router_keys)
        self._dense_keys = [k for k in self._state_keys if k not in routers and k not in self._fused]
        self._dense_params = [n for n in params if n not in routers and n not in self._fused]
        self._virtual_keys = self._build_virtual_keys()
        check_unique_keys(self._virtual_keys, type(self.model).__name__)
        self._records = [self._register(modules[b.name], modules[b.router_name]) for b in self.blocks]
        for param in self._fused.values():
            hooks = getattr(param, "_post_accumulate_grad_hooks", None) or {}
            if not has_hook(hooks, _mask_gradient):
                param.register_post_accumulate_grad_hook(_mask_gradient)

    def _build_virtual_keys(self) -> list[str]:
        """The state keys in model order, each fused key replaced by its E virtual keys."""
        keys = []
        for key in self._state_keys:
            keys += [expert_key(key, e) for e in range(self.num_experts)] if key in self._fused else [key]
        return keys

    def _register(self, block: nn.Module, router: nn.Module) -> LayerRecord:
        """The block's shared routing record (see :func:`~hfedmoe.moe.routing.register_block_routing`)."""
        return register_block_routing(block, router, getattr(self.model, "config", None), self.num_experts)

    # --- structure -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Number of MoE layers L (dense layers do not count)."""
        return len(self.blocks)

    @property
    def num_experts_total(self) -> int:
        """L * S: the budget that trains every expert."""
        return self.num_layers * self.num_experts

    def expert_param_names(self, layer: int, expert: int) -> list[str]:
        """Virtual state-dict keys of expert ``expert`` of MoE layer ``layer``."""
        return list(self._expert_keys[(layer, expert)])

    def router_param_names(self) -> list[str]:
        """State keys of the routers (weights and persistent buffers such as
        ``e_score_correction_bias``)."""
        return list(self._router_keys)

    def dense_param_names(self) -> list[str]:
        """State keys of everything else (attention, norms, embeddings, shared experts)."""
        return list(self._dense_keys)

    def param_groups(self) -> ParamGroups:
        """Partition of the keys of :meth:`state_dict` (virtual expert keys)."""
        return ParamGroups(self._expert_keys, self._router_keys, self._dense_keys, self.num_layers, self.num_experts)

    # --- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """A detached snapshot, every fused tensor split into per-expert virtual keys.

        All values are contiguous copies that own their storage. Expert slices must be
        copies anyway (a view would drag the whole fused tensor into ``torch.save`` and
        safetensors refuses tensors sharing memory), and routed experts are most of a
        MoE model's parameters, so copying the rest too costs little and gives one
        consistent meaning: later training does not change a state already taken.
        """
        out = {}
        for key, value in self.model.state_dict().items():
            value = value.detach()
            if key in self._fused:
                for e in range(self.num_experts):
                    out[expert_key(key, e)] = value[e].clone()
            else:
                out[key] = value.clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a (virtual-key) state in place: the inverse of :meth:`state_dict`.

        Parameters
        ----------
        state : dict
            Virtual-key state, as produced by :meth:`state_dict`.
        strict : bool
            True: every key must be present and none unknown. False: load the keys that
            are present (single expert slices included) and ignore unknown ones.

        Raises
        ------
        ValueError
            Naming the first missing/unknown key (strict) or a key of the wrong shape.
        """
        known = set(self._virtual_keys)
        if strict:
            check_state_keys(self._virtual_keys, state)
        current = self.model.state_dict()
        slices: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        plain: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key not in known:
                continue
            split = split_expert_key(key)
            target = current[split[0]][split[1]] if split and split[0] in self._fused else current[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not match the model's {tuple(target.shape)}")
            if split and split[0] in self._fused:
                slices.append((self._fused[split[0]], split[1], value))
            else:
                plain[key] = value
        with torch.no_grad():
            for param, e, value in slices:
                param[e].copy_(value)
        if plain:
            self.model.load_state_dict(plain, strict=False)

    def new_parameter_names(self) -> set[str]:
        """Parameters that start untrained (they get the larger learning rate).

        Pretrained LM checkpoints have trained routers and LM heads: nothing is new for
        ``*ForCausalLM``. A top-level ``score``/``classifier`` head (what HF's
        ``*ForSequenceClassification`` adds on top of an LM checkpoint) is new.
        """
        # Named like a head wherever the model sits: top level, or inside hfedmoe's
        # own wrappers ("model.score.weight"); Switch routers' "classifier" is not one.
        routers = set(self._router_keys)
        return {n for n in self._params if n not in routers and is_head_parameter(n)}

    # --- training ------------------------------------------------------------------------
    def _check_selection(self, selection: torch.Tensor) -> torch.Tensor:
        return check_selection(selection, self.num_layers, self.num_experts)

    def trainable_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]:
        """Dense + router parameters and the fused expert tensors of every layer with at
        least one selected expert (a slice cannot be a backward input on its own).

        Layers without a selected expert get no gradient at all, and the optimizer
        skips their tensors. Also arms the gradient mask (see :meth:`set_selection`).
        """
        selection = self._check_selection(selection)
        self.set_selection(selection)
        names = self._dense_params + self._router_params
        names += [key for key in self._fused if selection[self._fused_layer[key]].any()]
        seen: set[int] = set()
        out = []
        for name in names:
            param = self._params[name]
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                out.append(param)
        return out

    def set_selection(self, selection: torch.Tensor) -> None:
        """Arm the gradient mask for the next backward pass.

        Once armed, the gradient of each fused tensor is zeroed at the unselected
        experts' slices as soon as it is accumulated, so gradient clipping and norms
        computed before ``optimizer.step()`` see only the selected experts (the
        unselected experts that received tokens would otherwise contribute). The mask
        is removed when :meth:`freeze_unselected` exits.
        """
        selection = self._check_selection(selection)
        for key, param in self._fused.items():
            _GRAD_KEEP[param] = selection[self._fused_layer[key]].clone()
        for layer, module in enumerate(self.experts_modules()):
            if fused_deferred.installed(module):
                setattr(module, fused_deferred.SELECTION_ATTR, selection[layer].clone())

    def unselected_expert_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]:
        """Fused expert tensors none of whose experts is selected.

        The trainer drops these tensors' optimizer state. A fused tensor with at least
        one selected expert is not listed: its state holds the selected slices'
        moments too, and a slice's state cannot be dropped on its own (see
        :meth:`freeze_unselected` for what happens to the unselected slices).
        """
        selection = self._check_selection(selection)
        return [p for key, p in self._fused.items() if not selection[self._fused_layer[key]].any()]

    # Expert index first in every fused tensor: an optimizer can work slice by slice.
    optimizer_slices_experts = True

    def experts_modules(self) -> list[nn.Module]:
        """The fused experts module of each MoE layer (the owner of its 3-D tensors)."""
        return [self.model.get_submodule(block.expert_keys[0].rsplit(".", 1)[0]) for block in self.blocks]

    def enable_deferred_backward(self, enabled: bool, unselected: str = "detach") -> bool:
        """Back-propagate only through the experts selected after the forward pass.

        Saves the unselected experts' activation memory and their whole backward (see
        :mod:`hfedmoe.moe.fused_deferred`). Returns whether the layout supports it: the
        eager gated MLP of the transformers 5.x families; any other experts module
        (biases, transposed weights, a PEFT wrapper) keeps plain autograd.
        """
        modules = self.experts_modules()
        supported = all(fused_deferred.supports_deferred(m) for m in modules)
        for module in modules:
            fused_deferred.install(module, enabled and supported, unselected_input_grad=unselected == "freeze")
        return supported

    @property
    def top_k(self) -> int | None:
        """Experts per token, read from the first router (None if it does not say)."""
        router = self.model.get_submodule(self.blocks[0].router_name)
        return getattr(router, "top_k", None)

    def memory_estimate_top_k(self) -> int:
        """2, whatever :attr:`top_k` says: the analytic memory estimate has always counted
        two expert activations per token for the Hugging Face layouts (kept so that
        budgets and calibrations do not change)."""
        return 2

    @property
    def renormalizes_top_k(self) -> bool:
        """Whether the first router renormalises its top-k weights to sum to one: Mixtral
        always, Qwen2/Qwen3-MoE, OLMoE and DeepSeek-V3 when ``norm_topk_prob``, DeepSeek-V2
        never (see :func:`~hfedmoe.moe.routing.fused_routing_rule`)."""
        return fused_routing_rule(self.model.get_submodule(self.blocks[0].router_name)).renormalizes

    @contextlib.contextmanager
    def routing_override(self, mask: torch.Tensor | None = None,
                         top_k: int | None = None) -> Iterator[RouterCapture]:
        """Route to ``top_k`` experts within ``mask`` while open (see the protocol).

        A forward hook on each router (:class:`~hfedmoe.moe.routing.RoutingOverrideHook`,
        run before the routing records) re-runs the router's own rule
        (:func:`~hfedmoe.moe.routing.fused_routing_rule`) on the logits it returned, with
        the mask and ``top_k`` applied inside the rule: removed experts get logit -inf
        (probability 0 in :meth:`router_probs`, never in :meth:`dispatch`; DeepSeek's
        group limit skips them when it scores groups). A layer keeping fewer than
        ``top_k`` experts routes each token to all it keeps. The expert modules take any
        number of slots per token (the deferred backward included); :attr:`top_k` stays
        the model's own.
        """
        check_routing_override(mask, top_k, self.num_layers, self.num_experts)
        capture = RouterCapture(self.num_layers)
        handles = []
        try:
            for index, block in enumerate(self.blocks):
                router = self.model.get_submodule(block.router_name)
                keep = None if mask is None else mask[index].to(router.weight.device)
                hook = RoutingOverrideHook(fused_routing_rule(router), keep, top_k, capture, index, self.num_experts)
                handles.append(router.register_forward_hook(hook, prepend=True))
            yield capture
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def routed_output_scale(self, scales: torch.Tensor) -> Iterator[None]:
        """Multiply each layer's routed-expert combination by ``scales[l]`` while open.

        A forward hook on each block's experts module (:meth:`routed_experts_modules`),
        whose output is the top-k weighted sum of the routed experts; the shared experts
        (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``), added by the block
        after it, and the residual are not scaled.
        """
        if tuple(scales.shape) != (self.num_layers,):
            raise ValueError(f"scales must be Tensor[{self.num_layers}], got {tuple(scales.shape)}")
        handles = [module.register_forward_hook(scale_output_hook(scales, index))
                   for index, module in enumerate(self.routed_experts_modules())]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def routed_experts_modules(self) -> list[nn.Module]:
        """Per MoE layer, the block's child that computes the routed experts' combination
        (the fused experts module, or the PEFT wrapper around it)."""
        out = []
        for block in self.blocks:
            key = block.expert_keys[0]
            child = (key[len(block.name) + 1:] if block.name else key).split(".", 1)[0]
            out.append(self.model.get_submodule(_join(block.name, child)))
        return out

    @property
    def fused_parameters(self) -> Mapping[str, nn.Parameter]:
        """Read-only view: real state key -> fused expert tensor (first dim E), model order."""
        return types.MappingProxyType(self._fused)

    @property
    def fused_layers(self) -> Mapping[str, int]:
        """Read-only view: real state key of each fused expert tensor -> its MoE layer."""
        return types.MappingProxyType(self._fused_layer)

    @contextlib.contextmanager
    def freeze_unselected(
        self, selection: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
    ) -> Iterator[None]:
        """Guard around ``optimizer.step()``: unselected expert slices stay bit-for-bit.

        With an :class:`~hfedmoe.moe.slice_adamw.ExpertSliceAdamW` (what the trainer
        builds for this layout) the optimizer is told the selected slices and updates
        only those. With any other optimizer:

        A fused tensor gets a gradient as soon as one of its experts is selected, and
        AdamW then moves EVERY slice of it (weight decay, and momentum from earlier
        steps even where the gradient is zero). On entry this zeroes the gradient of
        the unselected slices and snapshots their weights (and, given ``optimizer``,
        their optimizer-state slices, e.g. ``exp_avg``/``exp_avg_sq``); on exit it
        copies the snapshots back. Tensors whose gradient is None are skipped by the
        optimizer and need nothing. Adam's per-tensor ``step`` counter cannot be
        restored per slice: it counts steps of the fused tensor.

        Parameters
        ----------
        selection : BoolTensor[L, S]
            The experts trained in this step.
        optimizer : torch.optim.Optimizer, optional
            Pass it to also keep the unselected slices' optimizer state unchanged.
        """
        selection = self._check_selection(selection)
        if isinstance(optimizer, ExpertSliceAdamW) and self.optimizer_slices_experts:
            # The optimizer itself updates (and keeps moments for) the selected slices
            # only: nothing to snapshot, no moments held for unselected experts.
            optimizer.slice_masks = {param: selection[self._fused_layer[key]] for key, param in self._fused.items()}
            try:
                yield
            finally:
                optimizer.slice_masks = {}
                for param in self._fused.values():
                    _GRAD_KEEP.pop(param, None)
            return
        saved = []
        with torch.no_grad():
            for key, param in self._fused.items():
                drop = ~selection[self._fused_layer[key]]
                if param.grad is None or not drop.any():
                    continue
                index = drop.nonzero().squeeze(1).to(param.device)
                param.grad.index_fill_(0, index, 0)
                state = optimizer.state.get(param, {}) if optimizer is not None else {}
                moments = {k: v.index_select(0, index) for k, v in state.items() if _same_shape(v, param)}
                saved.append((param, index, param.detach().index_select(0, index), moments))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, index, weights, moments in saved:
                    param.index_copy_(0, index, weights)
                    if optimizer is None:
                        continue
                    for name, value in optimizer.state.get(param, {}).items():
                        if not _same_shape(value, param):
                            continue
                        if name in moments:
                            value.index_copy_(0, index, moments[name])
                        else:  # state created by this very step: unselected slices start at zero
                            value.index_fill_(0, index, 0)
            for param in self._fused.values():
                _GRAD_KEEP.pop(param, None)

    # --- routing records of the last forward pass ----------------------------------------
    def router_probs(self) -> torch.Tensor:
        """Tensor[B, T, L, S]: G_e of every token in every MoE layer (float32, detached)."""
        return torch.stack([self._record(layer, "probs") for layer in range(self.num_layers)], dim=2)

    def dispatch(self) -> torch.Tensor:
        """BoolTensor[B, T, L, S]: the experts each token was routed to (the router's top-k)."""
        return torch.stack([self._record(layer, "dispatch") for layer in range(self.num_layers)], dim=2)

    def aux_loss(self) -> None:
        """None: HF models compute their own load-balancing loss (``output_router_logits``)."""
        return None

    def _record(self, layer: int, attr: str) -> torch.Tensor:
        value = getattr(self._records[layer], attr)
        if value is None:
            raise RuntimeError("no routing recorded yet: run a forward pass first")
        if value.dim() != 3:
            raise RuntimeError(
                f"MoE layer {layer} ({self.layer_names[layer]}) recorded routing without a [B, T] token shape; "
                "its router must run inside its block on [B, T, H] hidden states"
            )
        return value


def _same_shape(value, param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == param.shape
