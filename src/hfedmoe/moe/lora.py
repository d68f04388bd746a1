"""LoRA on experts: PEFT adapters on fused expert tensors, driven per expert.

:func:`apply_lora` injects PEFT LoRA into a transformers 5.x model with fused experts
(see :mod:`hfedmoe.moe.fused`): ``target_parameters`` on every fused expert tensor
(one rank-R adapter per expert, packed by PEFT into one ``lora_A``/``lora_B`` pair per
tensor) and ``target_modules`` on dense ``nn.Linear`` projections (by default the
attention projections, discovered from module structure). Base weights are frozen;
routers and the task head stay fully trainable (routers are merged with the method's
gate aggregation, the head with the dense parameters).

:class:`LoraMoEAccess` implements :class:`~hfedmoe.moe.protocol.MoEAccess` on such a
model. Its state (what crosses the wire) holds ONLY the trainable tensors:

- experts: each packed adapter tensor split into per-expert virtual keys
  ``<real key>.__expert__.<e>`` (same convention as :mod:`hfedmoe.moe.fused`, see :mod:`hfedmoe.moe.state_keys`);
- routers: the router weights;
- dense: the dense LoRA factors and the task head.

PEFT's packing (peft 0.21.2, ``peft/tuners/lora/layer.py``, class ``ParamWrapper``)
----------------------------------------------------------------------------------
``update_layer`` (lines 2455-2456) creates, for a fused parameter of E experts::

    lora_A = nn.Linear(in_features, r * E)   # weight [r*E, in]
    lora_B = nn.Linear(r * E, out_features)  # weight [out, r*E]

and ``get_delta_weight`` (lines 2552-2557; ``get_delta_factors`` 2534-2535 likewise)
unpacks them as::

    weight_A.reshape(E, r, in)        # row    e*r + j  of lora_A is expert e, rank j
    weight_B.reshape(out, r, E)       # column j*E + e  of lora_B is expert e, rank j

so the expert index varies SLOWEST along lora_A's rows (a contiguous block of r rows
per expert) and FASTEST along lora_B's columns (a stride-E comb). Expert e's slices
are ``lora_A[e*r:(e+1)*r, :]`` and ``lora_B[:, e::E]``. ``tests/moe/test_lora.py`` checks
this against PEFT's own ``get_delta_weight`` and against the forward pass (experts
that receive no token get exactly zero adapter gradient).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from hfedmoe.moe.fused import FusedBlock, FusedMoEAccess, find_fused_blocks, fused_expert_count, router_child
from hfedmoe.moe.protocol import NoMoELayersError, common_expert_count
from hfedmoe.moe.routing import has_hook, register_block_routing
from hfedmoe.moe.state_keys import (
    HEAD_NAMES,
    check_selection,
    check_state_keys,
    check_unique_keys,
    expert_key,
    split_expert_key,
)

ATTENTION_HINTS = ("attn", "attention")  # a dense projection's parent module name contains one of these
ADAPTER = "default"


class LoraTargetError(ValueError):
    """``--lora-targets`` names no LoRA-able module of the model."""


# --- applying LoRA --------------------------------------------------------------------------------

def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _excluded_modules(model: nn.Module) -> set[str]:
    """Module paths dense LoRA must not wrap: routers, heads, fused experts."""
    out = set()
    for block in find_fused_blocks(model):
        out.add(block.router_name)
        out.update(key.rpartition(".")[0] for key in block.expert_keys)
    for name, _ in model.named_modules():
        if name.rpartition(".")[2] in HEAD_NAMES:
            out.add(name)
    return out


def dense_lora_candidates(model: nn.Module) -> list[str]:
    """Leaf names of the ``nn.Linear`` modules dense LoRA may target (routers and heads excluded)."""
    excluded = _excluded_modules(model)
    names: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if _is_linear(module) and name not in excluded and leaf not in names:
            names.append(leaf)
    return names


def attention_projections(model: nn.Module) -> list[str]:
    """Leaf names of the ``nn.Linear`` children of attention modules (module order).

    Discovered from structure: a Linear whose parent's own name contains "attn" or
    "attention" (``self_attn.q_proj``, DeepSeek's ``q_a_proj``/``kv_b_proj``, ...).
    """
    names: list[str] = []
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        parent_leaf = parent.rpartition(".")[2].lower()
        if _is_linear(module) and any(h in parent_leaf for h in ATTENTION_HINTS) and leaf not in names:
            names.append(leaf)
    return names


def resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The dense LoRA targets: ``targets`` checked against the model, or its attention projections."""
    candidates = dense_lora_candidates(model)
    if not targets:
        found = attention_projections(model)
        if not found:
            raise LoraTargetError(f"{type(model).__name__} has no attention projection (nn.Linear under a module "
                                  f"named *attn*/*attention*): pass --lora-targets, one of {', '.join(candidates)}")
        return found
    unknown = [t for t in targets if t not in candidates]
    if unknown:
        raise LoraTargetError(f"--lora-targets {unknown[0]!r} is no nn.Linear module of this model (routers and "
                              f"the head are trained fully anyway); choose from {', '.join(candidates)}")
    return list(dict.fromkeys(targets))


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | None = None,
               seed: int = 0) -> nn.Module:
    """Inject PEFT LoRA in place; freeze the base; keep routers and heads trainable.

    Parameters
    ----------
    model : nn.Module
        A model with fused MoE blocks (see :func:`hfedmoe.moe.fused.find_fused_blocks`).
    rank, alpha : LoRA rank R and alpha (scaling alpha / R).
    targets : list of str, optional
        Leaf names of dense ``nn.Linear`` modules to adapt; None/empty: the attention
        projections (:func:`attention_projections`).
    seed : int
        Seeds the adapter initialisation (clients and server build the same model).

    Raises
    ------
    NoMoELayersError
        The model has no fused MoE block (LoRA on experts needs the fused layout).
    LoraTargetError
        A target names no LoRA-able module.
    """
    from peft import LoraConfig, inject_adapter_in_model  # optional, heavy: only runs with --lora-rank pay for it

    blocks = find_fused_blocks(model)
    if not blocks:
        raise NoMoELayersError(f"{type(model).__name__} has no fused Mixture-of-Experts layer: LoRA on experts "
                               "needs a transformers 5.x MoE checkpoint with fused experts (Mixtral, Qwen-MoE, ...)")
    dense = resolve_targets(model, targets)
    # Full paths of the fused tensors, so the match is exact (no other parameter shares a path).
    expert_params = [key for block in blocks for key in block.expert_keys]
    heads = [name for name, _ in model.named_modules() if name.rpartition(".")[2] in HEAD_NAMES]
    routers = [block.router_name for block in blocks]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=dense,
                        target_parameters=expert_params)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, model)
    # Adapters in float32 over a half-precision base (what PEFT's PeftModel does with
    # autocast_adapter_dtype; inject_adapter_in_model leaves them in the base's dtype):
    # an AdamW step of ~lr on a bfloat16 weight mostly rounds away, on a float32 one it
    # does not, and the adapters are small. PEFT casts inputs to the adapter's dtype.
    for name, param in model.named_parameters():
        if ".lora_" in name and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    modules = dict(model.named_modules())
    for name in heads + routers:
        for param in modules[name].parameters():
            param.requires_grad_(True)
    return model


def is_lora_model(model: nn.Module) -> bool:
    """True when PEFT LoRA ``ParamWrapper`` layers wrap fused expert tensors of ``model``."""
    layer = sys.modules.get("peft.tuners.lora.layer")  # never imported: no PEFT layer can exist (and the
    if layer is None:                                   # default, non-LoRA path does not pay peft's import)
        return False
    ParamWrapper = layer.ParamWrapper
    return any(isinstance(m, ParamWrapper) for m in model.modules())


# --- structure ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedAdapter:
    """One packed LoRA factor of a fused expert tensor: which slices belong to which expert."""

    key: str  # real parameter name, e.g. "...mlp.experts.lora_B.default.weight"
    layer: int  # MoE layer index
    dim: int  # 0 for lora_A (rows), 1 for lora_B (columns)
    rank: int
    num_experts: int

    def index(self, experts: list[int] | torch.Tensor) -> torch.Tensor:
        """Positions along ``dim`` of the given experts' slices (see the module docstring)."""
        experts = torch.as_tensor(experts, dtype=torch.long).reshape(-1, 1)
        j = torch.arange(self.rank).reshape(1, -1)
        if self.dim == 0:  # lora_A [r*E, in]: row e*r + j
            return (experts * self.rank + j).flatten()
        return (j * self.num_experts + experts).flatten()  # lora_B [out, r*E]: column j*E + e


def find_lora_blocks(model: nn.Module) -> tuple[list[FusedBlock], list[PackedAdapter]]:
    """MoE blocks whose fused experts are wrapped by PEFT ``ParamWrapper`` layers.

    A block is a module with a ``ParamWrapper`` child (possibly nested, one level per
    targeted tensor) around a fused expert module, next to a ``gate``/``router`` child
    with an ``[E, H]`` weight. The block's expert keys are the packed adapter factors.
    """
    from peft.tuners.lora.layer import ParamWrapper  # heavy: loaded only once a LoRA model exists

    blocks: list[FusedBlock] = []
    packed: list[PackedAdapter] = []
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            continue
        for child_name, child in module.named_children():
            if not isinstance(child, ParamWrapper):
                continue
            count = fused_expert_count(child.get_base_layer())
            router = router_child(module, count) if count else None
            if router is None:
                continue
            keys = []
            layer = len(blocks)
            path, wrapper = f"{name}.{child_name}" if name else child_name, child
            while isinstance(wrapper, ParamWrapper):
                if ADAPTER in wrapper.lora_A:
                    rank = wrapper.r[ADAPTER]
                    for factor, dim in (("lora_A", 0), ("lora_B", 1)):
                        key = f"{path}.{factor}.{ADAPTER}.weight"
                        keys.append(key)
                        packed.append(PackedAdapter(key, layer, dim, rank, wrapper.num_experts))
                path, wrapper = f"{path}.base_layer", wrapper.base_layer
            blocks.append(FusedBlock(name, f"{name}.{router}" if name else router, tuple(keys), count))
    return blocks, packed


_GRAD_KEEP: WeakIdKeyDictionary = WeakIdKeyDictionary()  # packed Parameter -> (dim, LongTensor of dropped positions)


def _mask_packed_gradient(param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: zero the gradient of unselected experts' adapter slices."""
    entry = _GRAD_KEEP.get(param)
    if entry is not None and param.grad is not None:
        dim, dropped = entry
        with torch.no_grad():
            param.grad.index_fill_(dim, dropped.to(param.grad.device), 0)


# --- the access object ----------------------------------------------------------------------------

class LoraMoEAccess(FusedMoEAccess):
    """:class:`~hfedmoe.moe.protocol.MoEAccess` over a LoRA-wrapped fused MoE model.

    Routing records, selection checks and the structure properties are those of
    :class:`~hfedmoe.moe.fused.FusedMoEAccess`; state and training act on the
    per-expert slices of the packed adapter factors (see the module docstring).
    """

    # PEFT packs lora_B with the expert index varying fastest: dim 0 is not the expert.
    optimizer_slices_experts = False

    def enable_deferred_backward(self, enabled: bool, unselected: str = "detach") -> bool:
        """Not for LoRA: the adapters live in PEFT's wrapper around the experts module,
        whose forward :mod:`hfedmoe.moe.fused_deferred` does not reproduce. Plain autograd."""
        return False

    def __init__(self, model: nn.Module):  # noqa: super().__init__ would look for bare fused tensors
        self.model = model
        self.blocks, packed = find_lora_blocks(model)
        if not self.blocks:
            raise NoMoELayersError(f"{type(model).__name__} has no LoRA-wrapped fused MoE layer")
        self.num_experts = common_expert_count([block.num_experts for block in self.blocks])
        self.layer_names = [block.name for block in self.blocks]
        params = dict(model.named_parameters())
        self._params = params
        self._packed = {p.key: p for p in packed}
        self._fused = {p.key: params[p.key] for p in packed}  # kept for code that lists expert tensors
        self._fused_layer = {p.key: p.layer for p in packed}
        self._expert_keys = {(b, e): [expert_key(k, e) for k in block.expert_keys]
                             for b, block in enumerate(self.blocks) for e in range(self.num_experts)}
        self._router_keys = [n for block in self.blocks for n in params if n.startswith(block.router_name + ".")]
        self._router_params = list(self._router_keys)
        heads = [n for n in params if any(part in HEAD_NAMES for part in n.split(".")[:-1])
                 and not any(n.startswith(b.name + ".") for b in self.blocks)]
        dense_lora = [n for n in params if (".lora_A." in n or ".lora_B." in n) and n not in self._packed]
        self._heads = heads
        self._dense_keys = [n for n in params if n in set(dense_lora) | set(heads)]  # model order
        self._dense_params = list(self._dense_keys)
        wire = set(self._dense_keys) | set(self._router_keys) | set(self._packed)
        stray = [n for n, p in params.items() if p.requires_grad and n not in wire]
        if stray:
            raise ValueError(f"{stray[0]} is trainable but not part of the LoRA state; apply_lora freezes the base")
        self._wire = [n for n in params if n in wire]
        self._virtual_keys = self._build_virtual_keys()
        check_unique_keys(self._virtual_keys, type(self.model).__name__)
        modules = dict(model.named_modules())
        config = getattr(model, "config", None)
        self._records = [register_block_routing(modules[b.name], modules[b.router_name], config, self.num_experts)
                         for b in self.blocks]
        for key in self._packed:
            param = params[key]
            hooks = getattr(param, "_post_accumulate_grad_hooks", None) or {}
            if not has_hook(hooks, _mask_packed_gradient):
                param.register_post_accumulate_grad_hook(_mask_packed_gradient)

    def _build_virtual_keys(self) -> list[str]:
        """The wire tensors in model order, each packed factor replaced by its E virtual keys."""
        keys = []
        for name in self._wire:
            keys += [expert_key(name, e) for e in range(self.num_experts)] if name in self._packed else [name]
        return keys

    @property
    def packed_adapters(self) -> Mapping[str, PackedAdapter]:
        """Read-only view: real key of each packed adapter factor -> its expert layout."""
        return types.MappingProxyType(self._packed)

    # --- state ------------------------------------------------------------------------------------
    def base_parameter_names(self) -> list[str]:
        """Frozen base weights: never on the wire (every party loads them from the checkpoint)."""
        wire = set(self._wire)
        return [n for n in self._params if n not in wire]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the trainable tensors, adapter factors split per expert."""
        out = {}
        with torch.no_grad():
            for name in self._wire:
                value = self._params[name].detach()
                packed = self._packed.get(name)
                if packed is None:
                    out[name] = value.clone()
                    continue
                for e in range(self.num_experts):
                    out[expert_key(name, e)] = value.index_select(packed.dim, packed.index([e])).contiguous()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load a (virtual-key) LoRA state in place: the inverse of :meth:`state_dict`.

        ``strict``: every key present and none unknown; otherwise unknown keys are
        ignored and any subset (single expert slices included) is written.
        """
        if strict:
            check_state_keys(self._virtual_keys, state)
        known = set(self._virtual_keys)
        writes = []
        for key, value in state.items():
            if key not in known:
                continue
            split = split_expert_key(key)
            if split and split[0] in self._packed:
                packed = self._packed[split[0]]
                param = self._params[split[0]]
                index = packed.index([split[1]]).to(param.device)
                shape = list(param.shape)
                shape[packed.dim] = packed.rank
            else:
                param, packed, index, shape = self._params[key], None, None, list(self._params[key].shape)
            if list(value.shape) != shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not match the model's {tuple(shape)}")
            writes.append((param, packed, index, value))
        with torch.no_grad():
            for param, packed, index, value in writes:
                value = value.to(param.device, param.dtype)
                if packed is None:
                    param.copy_(value)
                else:
                    param.index_copy_(packed.dim, index, value)

    def new_parameter_names(self) -> set[str]:
        """The task head starts untrained (larger learning rate); routers are pretrained."""
        return set(self._heads)

    # --- training ---------------------------------------------------------------------------------
    def _dropped(self, packed: PackedAdapter, selection: torch.Tensor) -> torch.Tensor:
        return packed.index((~selection[packed.layer]).nonzero().squeeze(1))

    def trainable_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]:
        """Dense LoRA + head + routers, and the packed factors of every layer with a selected
        expert (a slice cannot be a backward input on its own). Arms the gradient mask."""
        selection = check_selection(selection, self.num_layers, self.num_experts)
        self.set_selection(selection)
        names = self._dense_params + self._router_params
        names += [k for k, p in self._packed.items() if selection[p.layer].any()]
        return [self._params[n] for n in names if self._params[n].requires_grad]

    def set_selection(self, selection: torch.Tensor) -> None:
        """Arm the gradient mask: unselected experts' slices get a zero gradient on accumulation."""
        selection = check_selection(selection, self.num_layers, self.num_experts)
        for key, packed in self._packed.items():
            _GRAD_KEEP[self._params[key]] = (packed.dim, self._dropped(packed, selection))

    def unselected_expert_parameters(self, selection: torch.Tensor) -> list[nn.Parameter]:
        """Packed factors none of whose experts is selected (their optimizer state can go)."""
        selection = check_selection(selection, self.num_layers, self.num_experts)
        return [self._params[k] for k, p in self._packed.items() if not selection[p.layer].any()]

    @contextlib.contextmanager
    def freeze_unselected(
        self, selection: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
    ) -> Iterator[None]:
        """Guard around ``optimizer.step()``: unselected experts' slices stay bit-for-bit.

        Same contract as :meth:`FusedMoEAccess.freeze_unselected`, along each packed
        factor's expert dimension (rows of lora_A, strided columns of lora_B).
        """
        selection = check_selection(selection, self.num_layers, self.num_experts)
        saved = []
        with torch.no_grad():
            for key, packed in self._packed.items():
                param = self._params[key]
                index = self._dropped(packed, selection).to(param.device)
                if param.grad is None or index.numel() == 0:
                    continue
                param.grad.index_fill_(packed.dim, index, 0)
                state = optimizer.state.get(param, {}) if optimizer is not None else {}
                moments = {k: v.index_select(packed.dim, index) for k, v in state.items()
                           if isinstance(v, torch.Tensor) and v.shape == param.shape}
                saved.append((param, packed.dim, index, param.detach().index_select(packed.dim, index), moments))
        try:
            yield
        finally:
            with torch.no_grad():
                for param, dim, index, weights, moments in saved:
                    param.index_copy_(dim, index, weights)
                    if optimizer is None:
                        continue
                    for name, value in optimizer.state.get(param, {}).items():
                        if not (isinstance(value, torch.Tensor) and value.shape == param.shape):
                            continue
                        if name in moments:
                            value.index_copy_(dim, index, moments[name])
                        else:  # state created by this very step: unselected slices start at zero
                            value.index_fill_(dim, index, 0)
            for key in self._packed:
                _GRAD_KEEP.pop(self._params[key], None)
