"""How the server merges what clients upload: expert merges and router weights.

Shared arithmetic of the methods (like Flower's ``strategy_utils``), each a thin
callable over :mod:`hfedmoe.core`. A method names the two it uses
(:attr:`~hfedmoe.methods.base.Method.expert_merge`, ``router_weights``); HFedMoE's
ablation flags ``--expert-agg`` / ``--gate-agg`` pick them by name from
:data:`hfedmoe.methods.registry.EXPERT_MERGES` and ``ROUTER_WEIGHTS``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hfedmoe import core

# merge(previous experts, each client's uploaded experts, num_examples) -> new experts
ExpertMerge = Callable[[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[int]], dict[str, torch.Tensor]]
# weights(usage [C, L, S], importance [C, L, S], num_examples, tau, normalize) -> alpha [C]
RouterWeights = Callable[[torch.Tensor, torch.Tensor, list[int], float, bool], torch.Tensor]


def merge_over_uploaders(previous: dict[str, torch.Tensor], uploads: list[dict[str, torch.Tensor]],
                         num_examples: list[int]) -> dict[str, torch.Tensor]:
    """Eq. 17: each expert averaged over the clients that uploaded it (weights |D_c|);
    an expert nobody uploaded keeps its previous value."""
    return core.aggregate_experts(previous, uploads, num_examples)


def merge_over_all_clients(previous: dict[str, torch.Tensor], uploads: list[dict[str, torch.Tensor]],
                           num_examples: list[int]) -> dict[str, torch.Tensor]:
    """FedAvg over every client: a client that did not upload an expert counts with the
    unchanged global copy (FedAvg; HFedMoE's Fig. 16 ablation)."""
    return core.fedavg([{**previous, **upload} for upload in uploads], num_examples)


def preference_weights(usage: torch.Tensor, importance: torch.Tensor, num_examples: list[int], tau: float,
                       normalize: bool) -> torch.Tensor:
    """Eq. 18-20: alpha_c from each client's usage and importance of its experts."""
    return core.gate_weights(usage, importance, tau=tau, normalize=normalize)


def data_size_weights(usage: torch.Tensor, importance: torch.Tensor, num_examples: list[int], tau: float,
                      normalize: bool) -> torch.Tensor:
    """Plain FedAvg of routers: alpha_c = |D_c| / sum |D|."""
    return torch.tensor(num_examples, dtype=torch.float64) / sum(num_examples)

