"""Routing records shared by the Hugging Face access families (fused, LoRA, Switch).

Each MoE block's routing in the last forward pass is a :class:`LayerRecord`, filled by
forward hooks on the block and its router. Hooks are module-level functions and their
state lives in the weak registry :data:`RECORDS` keyed by module, not in closures over
an access object: ``make_access()`` is called every round on the same long-lived model,
and per-access closures would pile up one hook set per call. Registration is idempotent
(checked by function identity with :func:`has_hook`), and a deep copy of the model
carries hooks that look up the COPY's modules, never the original's records.

G_e (what ``router_probs()`` returns) is the router's own score function applied to the
logits the router returned, over ALL experts (see :func:`score_function` and the
docstring of :mod:`hfedmoe.moe.fused`); dispatch is built from the router's returned
top-k indices, never recomputed.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn


class LayerRecord:
    """Routing of one MoE block in its last forward pass."""

    def __init__(self, score_fn: str, num_experts: int):
        self.score_fn = score_fn
        self.num_experts = num_experts
        self.tokens_shape: tuple[int, ...] | None = None  # [B, T] from the block's input
        self.probs: torch.Tensor | None = None  # Tensor[B, T, S], float32, detached
        self.dispatch: torch.Tensor | None = None  # BoolTensor[B, T, S]


RECORDS: "weakref.WeakKeyDictionary[nn.Module, LayerRecord]" = weakref.WeakKeyDictionary()


def has_hook(hooks: dict, fn) -> bool:
    """True when ``fn`` itself is among a module's (or tensor's) registered ``hooks``."""
    return any(h is fn for h in hooks.values())


def block_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Record the block input's token shape: routers see flattened [B*T, H] states."""
    record = RECORDS.get(module)
    hidden = args[0] if args else kwargs.get("hidden_states")
    if record is not None and isinstance(hidden, torch.Tensor):
        record.tokens_shape = tuple(hidden.shape[:-1])


def router_hook(module: nn.Module, args: tuple, output) -> None:
    """Record G_e and the top-k dispatch from a fused-layout router's own outputs."""
    record = RECORDS.get(module)
    if record is None:
        return
    logits, indices = parse_router_output(module, output, record.num_experts)
    num_tokens = logits.numel() // record.num_experts
    shape = record.tokens_shape
    if shape is None or math.prod(shape) != num_tokens:
        shape = (num_tokens,)  # router called outside its block: router_probs() will refuse
    with torch.no_grad():
        logits = logits.detach().reshape(num_tokens, record.num_experts).float()
        probs = torch.softmax(logits, dim=-1) if record.score_fn == "softmax" else torch.sigmoid(logits)
        record.probs = probs.reshape(*shape, record.num_experts)
        record.dispatch = dispatch_mask(indices.reshape(num_tokens, -1), record.num_experts).reshape(
            *shape, record.num_experts
        )


def parse_router_output(router: nn.Module, output, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [.., E], top-k indices [.., k]) out of the router's returned tuple."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    logits = next((t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()
                   and t.dim() >= 1 and t.shape[-1] == num_experts), None)
    indices = next((t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point()
                    and t.dtype != torch.bool), None)
    if logits is None or indices is None:
        raise RuntimeError(
            f"{type(router).__name__} returned {type(output).__name__} without router logits [.., {num_experts}] "
            "and integer top-k indices; hfedmoe expects (router_logits, top_k_weights, top_k_index)"
        )
    return logits, indices


def dispatch_mask(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """BoolTensor[N, E] from top-k indices [N, k]; out-of-range indices (the sentinel
    E used for dropped or remote tokens under expert parallelism) dispatch nowhere."""
    indices = indices.long()
    indices = torch.where((indices < 0) | (indices >= num_experts), num_experts, indices)
    mask = torch.zeros(indices.shape[0], num_experts + 1, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)[:, :num_experts]


def score_function(router: nn.Module, config) -> str:
    """The router's score function: "softmax" or "sigmoid" (see :mod:`hfedmoe.moe.fused`)."""
    declared = None
    for cfg in (config, getattr(config, "text_config", None)):
        declared = declared or getattr(cfg, "scoring_func", None)
    if declared is not None:
        if declared not in ("softmax", "sigmoid"):
            raise NotImplementedError(f"router scoring function {declared!r} is not supported (softmax, sigmoid)")
        return declared
    if getattr(router, "e_score_correction_bias", None) is not None:
        return "sigmoid"
    return "softmax"


def register_block_routing(block: nn.Module, router: nn.Module, config, num_experts: int) -> LayerRecord:
    """The block's shared routing record; hooks (:func:`block_pre_hook` on the block,
    :func:`router_hook` on its router) registered on first use only."""
    record = RECORDS.get(router)
    if record is None:
        record = LayerRecord(score_function(router, config), num_experts)
        RECORDS[router] = record
        RECORDS[block] = record
    if not has_hook(block._forward_pre_hooks, block_pre_hook):
        block.register_forward_pre_hook(block_pre_hook, with_kwargs=True)
    if not has_hook(router._forward_hooks, router_hook):
        router.register_forward_hook(router_hook)
    return record
