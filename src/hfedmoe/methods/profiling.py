"""Routing statistics several methods collect before training.

- :func:`route_counts`: how a client's batches route through a model (forward only);
- :func:`initial_profile`: that profile on the run's *initial* model, once per
  client (FedMoE and SEER-MoE keep one expert subset for the whole run). Clients
  hold no state between rounds, so the profile is recomputed deterministically
  whenever a process lacks it.

Routing masks and the live router logits of a gate-entropy loss are the access
layer's :meth:`~hfedmoe.moe.protocol.MoEAccess.routing_override`.
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
