"""Information-bottleneck expert score (Eq. 10-14) and budgeted selection (Eq. 15).

Shapes: B samples, L MoE layers, S routed experts per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hfedmoe.core.importance import check_tensor, importance


def ib_kl(gates: Tensor) -> Tensor:
    """Per-expert KL term of the information bottleneck (Eq. 10, 11).

    p(z_e) = (1/B) sum_j G_e(x_j) (Eq. 10) and
    KL_e = (1/B) sum_i G_e(x_i) log(G_e(x_i) / p(z_e)) (Eq. 11).
    Terms with G_e(x_i) = 0 contribute 0 (the limit of g log g), so an expert no
    sample routes to has KL 0 rather than NaN.

    Parameters
    ----------
    gates : Tensor[B, L, S]
        Per-sample routing probabilities G_e(x_i), all >= 0.

    Returns
    -------
    Tensor[L, S]
        KL_e >= 0, in the dtype of ``gates``.

    Raises
    ------
    ValueError
        If ``gates`` is not a floating [B, L, S] tensor with B >= 1, or holds negative
        values.
    """
    check_tensor(gates, "gates", 3, "[B, L, S]")
    if gates.shape[0] == 0:
        raise ValueError("gates has no samples (B = 0); the KL term needs at least one sample")
    if (gates < 0).any():
        raise ValueError("gates must be probabilities (>= 0); pass softmax router outputs")
    prior = gates.mean(dim=0, keepdim=True)
    # prior > 0 wherever some gate > 0; the 1 only fills all-zero columns, where xlogy(0, .) = 0.
    ratio = gates / torch.where(prior > 0, prior, torch.ones_like(prior))
    return torch.xlogy(gates, ratio).mean(dim=0)


def ib_score(gates: Tensor, lam: float = 0.9, beta: float = 0.1) -> Tensor:
    """Information-bottleneck expert score I_b(e) = s_b(e) - beta * KL_e (Eq. 14).

    Parameters
    ----------
    gates : Tensor[B, L, S]
        Per-sample routing probabilities G_e(x_i), all >= 0.
    lam : float
        Importance weight of Eq. 5, in [0, 1]. The paper uses 0.9.
    beta : float
        Weight of the compression (KL) term, >= 0. The paper uses 0.1.

    Returns
    -------
    Tensor[L, S]
        I_b(e), in the dtype of ``gates``.

    Raises
    ------
    ValueError
        On invalid ``gates``, ``lam`` outside [0, 1], or ``beta`` < 0.
    """
    if not beta >= 0.0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return importance(gates, lam) - beta * ib_kl(gates)


def select_experts(scores: Tensor, candidates: Tensor, budget: int) -> Tensor:
    """Choose at most ``budget`` experts to train, covering every active layer (Eq. 15).

    Procedure (Sec. III-D): sort the candidates by score; take the best candidate of
    every layer that has one (layer coverage); then fill with the highest-scoring
    remaining candidates of any layer until ``budget`` experts are chosen or the
    candidates run out. Ties go to the lower flat index l * S + e, in both phases.
    Pass I_b (``ib_score``, Eq. 15, the default) or s_b (``importance``, the text's
    variant) as ``scores``.

    Parameters
    ----------
    scores : Tensor[L, S]
        Score of every expert.
    candidates : BoolTensor[L, S]
        E_union: experts the router sent at least one token of the batch to.
    budget : int
        C_budget, the maximum number of experts to select over all layers; >= 1.

    Returns
    -------
    BoolTensor[L, S]
        E_active: True for selected experts; a subset of ``candidates`` with
        min(budget, #candidates) True entries.

    Raises
    ------
    ValueError
        On a wrong shape/dtype, NaN scores, ``budget`` < 1, or a budget smaller than
        the number of layers that have candidates (coverage is then infeasible).
    """
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a tensor of shape [L, S], got {shape}")
    if not isinstance(candidates, Tensor) or candidates.dtype != torch.bool:
        raise ValueError("candidates must be a bool tensor of shape [L, S]")
    if candidates.shape != scores.shape:
        raise ValueError(
            f"candidates shape {tuple(candidates.shape)} does not match scores shape "
            f"{tuple(scores.shape)}"
        )
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"expert budget must be an int >= 1, got {budget!r}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; check the gates they were computed from")
    S = scores.shape[1]
    covered_layers = int(candidates.any(dim=1).sum())
    if budget < covered_layers:
        raise ValueError(
            f"expert budget {budget} cannot cover the {covered_layers} MoE layers that "
            f"received tokens: the minimum budget is {covered_layers}"
        )

    flat_idx = torch.nonzero(candidates.flatten()).flatten()  # ascending flat index
    # A stable sort on -score keeps ascending flat index among equal scores: the tie rule.
    order = flat_idx[torch.sort(-scores.flatten()[flat_idx], stable=True).indices]
    layer = order // S
    rank = torch.arange(order.numel(), device=order.device)
    first_rank = torch.full((scores.shape[0],), order.numel(), device=order.device)
    first_rank = first_rank.scatter_reduce(0, layer, rank, reduce="amin")
    is_cover = rank == first_rank[layer]
    fill = order[~is_cover][: budget - covered_layers]

    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    chosen[order[is_cover]] = True
    chosen[fill] = True
    return chosen.view_as(candidates)
