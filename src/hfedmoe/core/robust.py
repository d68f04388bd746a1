"""Defences against finite but destructive updates: a median-based update-norm screen and
robust merges (coordinate-wise trimmed mean and median).

Flower's robust strategies (Krum, trimmed mean, ...) assume every client sends every
parameter. Here each expert is uploaded by a subset of the clients, so both the screen
and the merges work per *group* over the clients that hold it: per expert (its tensors
together), the routers, and the dense parameters.

Shapes: C clients; a group is a dict key -> Tensor, the same keys for every holder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

ROBUST_MERGES = ("none", "trimmed-mean", "median")
MIN_HOLDERS_TO_SCREEN = 3  # with two holders the median is their mean: it cannot single one out


def update_norm(update: Mapping[str, Tensor], previous: Mapping[str, Tensor]) -> float:
    """||theta_c - theta||_2 over a group's floating tensors.

    Each tensor's delta and norm in float32 (a screen by a factor of 10 needs no more,
    and float64 copies of a 300 MB model would double the server's time), summed over
    the tensors in Python floats.
    """
    total = 0.0
    for key, value in update.items():
        if value.is_floating_point():
            delta = value.float() - previous[key].to(device=value.device, dtype=torch.float32)
            total += float(torch.linalg.vector_norm(delta)) ** 2
    return math.sqrt(total)


def screen_by_norm(norms: Mapping[str, Mapping[int, float]], threshold: float,
                   min_holders: int = MIN_HOLDERS_TO_SCREEN) -> dict[int, str]:
    """Clients whose update is out of proportion with the round's other holders.

    A client is rejected when, in some group changed by at least ``min_holders`` clients,
    its update norm exceeds ``threshold`` times the median norm of the clients that
    changed it (a non-finite norm is always rejected; an unchanged group, norm 0, is
    never judged nor counted). The median is robust to a minority of attackers: a client scaling its
    update by 1e3, or replacing it by noise of the weights' scale, lands far above it,
    while honest clients' norms stay within a small factor of each other.

    Parameters
    ----------
    norms : Mapping[str, Mapping[int, float]]
        Per group name, client index -> its update norm in that group.
    threshold : float
        Allowed multiple of the median (> 1); ``0`` or less disables the screen.
    min_holders : int
        Groups with fewer holders are not judged.

    Returns
    -------
    dict[int, str]
        Client index -> the reason it is rejected (the first group that fails).
    """
    rejected: dict[int, str] = {}
    if threshold <= 0:
        return rejected
    for group, by_client in norms.items():
        for client, norm in sorted(by_client.items()):
            if not math.isfinite(norm) and client not in rejected:
                rejected[client] = f"update norm of {group} is not finite"
        # A client that sent the group back unchanged (norm 0: e.g. an expert no token of
        # its data was routed to) holds no update of it: it neither sets the median nor
        # could exceed it. Otherwise a group most clients leave untouched has median 0,
        # and every client that did train it would read as infinitely far above it.
        moved = {c: n for c, n in by_client.items() if math.isfinite(n) and n > 0}
        if len(moved) < min_holders:
            continue
        median = float(torch.tensor(sorted(moved.values()), dtype=torch.float64).median())
        for client, norm in sorted(moved.items()):
            if client not in rejected and norm > threshold * median:
                rejected[client] = (f"update norm of {group} is {norm / median:.3g}x the median of the round's "
                                    f"{len(moved)} clients that changed it (limit {threshold:g}x)")
    return rejected


def trimmed_mean(tensors: Sequence[Tensor], trim_fraction: float = 0.25) -> Tensor:
    """Coordinate-wise trimmed mean: per element, drop the ``floor(trim_fraction x C)``
    largest and smallest values and average the rest (unweighted; Yin et al. 2018).

    With C = 4 and the default 0.25 one value is dropped from each side; with fewer
    than 1 / trim_fraction clients nothing is dropped (the plain mean).
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must lie in [0, 0.5), got {trim_fraction}")
    k = int(math.floor(trim_fraction * len(tensors)))
    stacked = torch.stack([t.to(torch.float64) for t in tensors])
    if k:
        stacked = stacked.sort(dim=0).values[k:len(tensors) - k]
    return stacked.mean(dim=0).to(tensors[0].dtype)


def coordinate_median(tensors: Sequence[Tensor]) -> Tensor:
    """Coordinate-wise median (the mean of the two middle values for an even count)."""
    stacked = torch.stack([t.to(torch.float64) for t in tensors]).sort(dim=0).values
    n = len(tensors)
    middle = stacked[n // 2] if n % 2 else (stacked[n // 2 - 1] + stacked[n // 2]) / 2
    return middle.to(tensors[0].dtype)


def robust_merge(groups: Sequence[Mapping[str, Tensor]], how: str, trim_fraction: float = 0.25) -> dict[str, Tensor]:
    """Key-wise robust merge of the same-keyed dicts of a group's holders (``how``:
    trimmed-mean or median); non-floating tensors take the first holder's value."""
    if how not in ROBUST_MERGES[1:]:
        raise ValueError(f"robust merge must be one of {ROBUST_MERGES[1:]}, got {how!r}")
    if not groups:
        raise ValueError("robust_merge needs at least one holder")
    out: dict[str, Tensor] = {}
    for key, ref in groups[0].items():
        values = [g[key] for g in groups]
        if not ref.is_floating_point():
            out[key] = ref
        elif how == "median":
            out[key] = coordinate_median(values)
        else:
            out[key] = trimmed_mean(values, trim_fraction)
    return out


def robust_experts(previous: Mapping[str, Tensor], updates: Sequence[Mapping[str, Tensor]],
                   expert_of: Mapping[str, tuple[int, int]], how: str,
                   trim_fraction: float = 0.25) -> dict[str, Tensor]:
    """Each expert merged robustly over the clients that uploaded it (all its tensors
    come from the same holders); an expert nobody uploaded keeps its previous value."""
    result = dict(previous)
    holders: dict[tuple[int, int], list[int]] = {}
    for c, update in enumerate(updates):
        for le in {expert_of[k] for k in update}:
            holders.setdefault(le, []).append(c)
    for le, clients in holders.items():
        keys = [k for k in updates[clients[0]] if expert_of[k] == le]
        merged = robust_merge([{k: updates[c][k] for k in keys} for c in clients], how, trim_fraction)
        result.update(merged)
    return result
