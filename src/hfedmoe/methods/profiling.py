"""Routing statistics several methods collect before training, and router hooks.

- :func:`route_counts`: how a client's batches route through a model (forward only);
- :func:`initial_profile`: that profile on the run's *initial* model, once per
  client (FedMoE and SEER-MoE keep one expert subset for the whole run). Clients
  hold no state between rounds, so the profile is recomputed deterministically
  whenever a process lacks it;
- :class:`RouterHooks`: a routing mask (a pruned sub-model) and the live router
  logits for a gate-entropy loss.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hfedmoe.moe import MoEAccess, make_access

# Batches of a client's data the profiling passes look at (forward only, no grad).
PROFILE_BATCHES = 4


# --- routing statistics of a forward-only pass --------------------------------------------

@dataclass
class RouteCounts:
    """How a client's batches route through a model, over real (non-padding) tokens."""

    hits: torch.Tensor  # Tensor[L, S]: tokens dispatched to each expert (top-k)
    soft: torch.Tensor  # Tensor[L, S]: summed router probabilities
    tokens: int


@torch.no_grad()
def route_counts(access: MoEAccess, batches: Iterable[dict[str, torch.Tensor]]) -> RouteCounts:
    """Forward ``batches`` through ``access.model`` (eval mode) and count routing."""
    model = access.model
    was_training = model.training
    model.eval()
    hits = soft = None
    tokens = 0
    try:
        for batch in batches:
            mask = batch["attention_mask"]
            model(batch["input_ids"], mask)
            real = mask.bool()[:, :, None, None]  # [B, T, 1, 1]
            batch_hits = (access.dispatch() & real).sum(dim=(0, 1))
            batch_soft = (access.router_probs().double() * real).sum(dim=(0, 1))
            hits = batch_hits if hits is None else hits + batch_hits
            soft = batch_soft if soft is None else soft + batch_soft
            tokens += int(mask.sum())
    finally:
        model.train(was_training)
    if hits is None:
        raise ValueError("no batch to profile: the client's partition is empty")
    return RouteCounts(hits=hits.long(), soft=soft, tokens=tokens)


def profile_batches(data, num_batches: int = PROFILE_BATCHES) -> Iterator[dict[str, torch.Tensor]]:
    """The client's fixed profiling batches: the first batches of its epoch 0."""
    return itertools.islice(data.batches.iter_epoch(0), num_batches)


# Profiles of the initial model, per (run, partition): computed once per process.
_INITIAL_PROFILES: OrderedDict[tuple[str, int], RouteCounts] = OrderedDict()
_MAX_CACHED = 256


def initial_profile(access: MoEAccess, data, server_round: int, run_key: str,
                    build_initial: Callable[[], nn.Module]) -> RouteCounts:
    """Routing of the client's profiling batches through the run's *initial* model.

    The first round's global model is the initial model, so round 1 profiles the
    model the client just loaded. A process that meets the client later without
    the profile (a restarted worker, another node) rebuilds the initial model
    (``build_initial``, deterministic in the run's seed) and gets the same counts,
    so the client's subset stays fixed for the whole run without any client state.
    ``run_key`` identifies the run (cached profiles never cross runs).
    """
    key = (run_key, data.partition_id)
    if key in _INITIAL_PROFILES:
        _INITIAL_PROFILES.move_to_end(key)
        return _INITIAL_PROFILES[key]
    if server_round == 1:
        counts = route_counts(access, profile_batches(data))
    else:
        initial = build_initial()
        counts = route_counts(make_access(initial), profile_batches(data))
        del initial
    _INITIAL_PROFILES[key] = counts
    while len(_INITIAL_PROFILES) > _MAX_CACHED:
        _INITIAL_PROFILES.popitem(last=False)
    return counts


def clear_profile_cache() -> None:
    """Forget every cached initial profile (tests: force a rebuild from the initial model)."""
    _INITIAL_PROFILES.clear()


# --- router hooks: routing mask and live router logits ------------------------------------

class RouterHooks:
    """Forward hooks on every MoE layer's router, while the context is open.

    - ``mask`` (BoolTensor[L, S]): experts outside it get router logit -inf, so
      no token is routed to them (a pruned sub-model) and their probability is 0.
    - ``capture``: keep each layer's (masked) router logits *with* gradient, for a
      loss on the gate distribution (:meth:`entropy`). The MoE block itself only
      records detached probabilities.

    Works on layouts with separate ``MoEFeedForward`` blocks (the embedded model),
    whose router is a plain linear layer returning logits.
    """

    def __init__(self, access: MoEAccess, mask: torch.Tensor | None = None, capture: bool = False):
        routers = access.router_modules()
        if routers is None:
            raise NotImplementedError(
                f"{type(access).__name__}: routing masks and gate-entropy losses need separate-expert MoE blocks "
                "(the embedded model); fused Hugging Face layouts are not supported for fedmoe/seer-moe yet"
            )
        self.routers = list(routers)
        self.mask = mask
        self.capture = capture
        self.logits: list[torch.Tensor | None] = [None] * len(self.routers)
        self._handles: list = []

    def __enter__(self) -> "RouterHooks":
        for index, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.logits = [None] * len(self.routers)

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
            if self.mask is not None:
                keep = self.mask[index].to(output.device)
                output = output.masked_fill(~keep, float("-inf"))
            if self.capture:
                self.logits[index] = output
            return output if self.mask is not None else None

        return hook

    def entropy(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over layers and real tokens of H(p) = -sum_e p_e log p_e (with gradient).

        p is the softmax of the (masked) router logits, so with a mask the entropy
        is over the surviving experts only (pruned experts have p = 0).
        """
        if any(logits is None for logits in self.logits):
            raise RuntimeError("no router logits captured: open RouterHooks(capture=True) and run a forward pass")
        real = attention_mask.reshape(-1).bool()
        per_layer = []
        for logits in self.logits:
            # Removed experts have logit -inf; a finite floor gives them p = 0 with a
            # zero gradient (the derivative of p log p is infinite at p = 0: NaN otherwise).
            log_probs = torch.log_softmax(logits.float().clamp(min=-1e4), dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
            per_layer.append(entropy[real].mean())
        return torch.stack(per_layer).mean()
