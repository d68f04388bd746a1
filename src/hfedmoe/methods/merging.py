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
from hfedmoe.core.robust import robust_experts, robust_merge

# merge(previous experts, each client's uploaded experts, num_examples, activation frequency
# Tensor[C, L, S] (None where the clients did not report it), expert tensor key -> (layer, expert))
# -> new experts
ExpertMerge = Callable[
    [dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[int], "torch.Tensor | None",
     "dict[str, tuple[int, int]] | None"],
    dict[str, torch.Tensor],
]
# weights(usage [C, L, S], importance [C, L, S], num_examples, tau, normalize) -> alpha [C]
RouterWeights = Callable[[torch.Tensor, torch.Tensor, list[int], float, bool], torch.Tensor]


# FLAME's t in gamma = f^t |D| (Le et al. advise 2-4; baselines.md)
FLAME_TEMPERATURE = 2.0


def merge_over_uploaders(previous: dict[str, torch.Tensor], uploads: list[dict[str, torch.Tensor]],
                         num_examples: list[int], frequency: torch.Tensor | None = None,
                         expert_of: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Eq. 17: each expert averaged over the clients that uploaded it (weights |D_c|);
    an expert nobody uploaded keeps its previous value."""
    return core.aggregate_experts(previous, uploads, num_examples)


def merge_over_all_clients(previous: dict[str, torch.Tensor], uploads: list[dict[str, torch.Tensor]],
                           num_examples: list[int], frequency: torch.Tensor | None = None,
                           expert_of: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """FedAvg over every client: a client that did not upload an expert counts with the
    unchanged global copy (FedAvg; HFedMoE's Fig. 16 ablation)."""
    return core.fedavg([{**previous, **upload} for upload in uploads], num_examples)


def merge_by_activation(previous: dict[str, torch.Tensor], uploads: list[dict[str, torch.Tensor]],
                        num_examples: list[int], frequency: torch.Tensor | None = None,
                        expert_of: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """FLAME's activation-aware aggregation: each expert over its uploaders, weighted by
    gamma_c = f_c^t |D_c| (t = FLAME_TEMPERATURE); unchanged where the weights sum to 0."""
    if frequency is None or expert_of is None:
        raise ValueError("activation-aware aggregation needs each client's activation frequency and expert_of")
    weights = core.activation_weights(frequency, num_examples, FLAME_TEMPERATURE)
    return core.aggregate_experts_weighted(previous, uploads, weights, expert_of)


def preference_weights(usage: torch.Tensor, importance: torch.Tensor, num_examples: list[int], tau: float,
                       normalize: bool) -> torch.Tensor:
    """Eq. 18-20: alpha_c from each client's usage and importance of its experts."""
    return core.gate_weights(usage, importance, tau=tau, normalize=normalize)


def data_size_weights(usage: torch.Tensor, importance: torch.Tensor, num_examples: list[int], tau: float,
                      normalize: bool) -> torch.Tensor:
    """Plain FedAvg of routers: alpha_c = |D_c| / sum |D|."""
    return torch.tensor(num_examples, dtype=torch.float64) / sum(num_examples)



def merge_round(
    previous_experts: dict[str, torch.Tensor],
    experts: list[dict[str, torch.Tensor]],
    routers: list[dict[str, torch.Tensor]],
    dense: list[dict[str, torch.Tensor]],
    usage: torch.Tensor,
    importance: torch.Tensor,
    num_examples: list[int],
    expert_merge: ExpertMerge = merge_over_uploaders,
    router_weights: RouterWeights = preference_weights,
    tau: float = 0.05,
    normalize: bool = True,
    robust: str = "none",
    expert_of: dict[str, tuple[int, int]] | None = None,
    trim_fraction: float = 0.25,
    frequency: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One round's new global state from the clients' uploads, and the router weights alpha.

    Experts by ``expert_merge`` (Eq. 17 for HFedMoE), routers weighted by
    ``router_weights`` (Eq. 18-21), dense parameters by FedAvg. Pure tensors in and
    out, no Flower: the strategy (:class:`hfedmoe.fl.strategy.HFedMoE`) and loops
    without Flower (benchmarks, scripts/gpu_check.py) call the same function.

    Parameters
    ----------
    previous_experts : dict
        The global expert tensors of the round (what an expert nobody uploaded keeps).
    experts, routers, dense : list of dict
        Per client: its uploaded expert tensors, its router tensors, its dense tensors.
    usage, importance : Tensor[C, L, S]
        Per client u_c (Eq. 16) and mean s^c.
    num_examples : list of int
        |D_c| per client.
    robust : str
        ``"none"``, or ``"trimmed-mean"`` / ``"median"`` (:mod:`hfedmoe.core.robust`):
        then each expert is merged coordinate-wise over its uploaders, and routers and
        dense parameters over every client, in place of the method's weighted merges
        (alpha is still computed and returned, for the record).
    expert_of : dict
        Expert tensor key -> (layer, expert); needed with ``robust`` and by merges that
        weight each expert on its own (FLAME's).
    frequency : Tensor[C, L, S], optional
        Each client's activation frequency f_c (share of its routed tokens each expert
        processed), for activation-aware merges.
    """
    alpha = router_weights(usage, importance, num_examples, tau, normalize)
    if robust != "none":
        if expert_of is None:
            raise ValueError("a robust merge needs expert_of (expert tensor key -> (layer, expert))")
        merged_experts = robust_experts(previous_experts, experts, expert_of, robust, trim_fraction)
        merged_routers = robust_merge(routers, robust, trim_fraction)
        merged_dense = robust_merge(dense, robust, trim_fraction)
        return {**merged_dense, **merged_routers, **merged_experts}, alpha
    merged_experts = expert_merge(previous_experts, experts, num_examples, frequency, expert_of)
    merged_routers = core.aggregate_gates(routers, alpha)
    merged_dense = core.fedavg(dense, num_examples)
    return {**merged_dense, **merged_routers, **merged_experts}, alpha
