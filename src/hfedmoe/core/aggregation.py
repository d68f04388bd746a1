"""Server-side aggregation: experts (Eq. 17), gate weights (Eq. 18-20), gates (Eq. 21),
and FedAvg for the dense (non-expert) parameters.

Shapes: C clients, L MoE layers, S routed experts per layer. Weighted sums are done in
float64 and cast back, so float32 models do not lose precision over many clients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from hfedmoe.core.importance import check_tensor


def _check_num_examples(num_examples: Sequence[int], num_clients: int, what: str) -> None:
    """Raise ValueError unless ``num_examples`` has one entry >= 0 per client, not all 0."""
    if num_clients == 0:
        raise ValueError(f"the list of {what} is empty; aggregate at least one client")
    if len(num_examples) != num_clients:
        raise ValueError(
            f"num_examples has {len(num_examples)} entries but there are {num_clients} "
            f"{what}; pass one count per client"
        )
    negative = [c for c, n in enumerate(num_examples) if n < 0]
    if negative:
        raise ValueError(f"num_examples must be >= 0, negative for clients {negative}")
    if sum(num_examples) == 0:
        raise ValueError("num_examples are all 0: no client trained on any data")


def _weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float], like: Tensor) -> Tensor:
    """sum_c weights[c] * tensors[c], accumulated in float64, cast to ``like``'s dtype.

    ``add_`` with ``alpha`` converts each element to float64 as it reads it: no
    float64 copy of every client tensor (the server's aggregation took twice as
    long with those temporaries).
    """
    acc = torch.zeros(like.shape, dtype=torch.float64, device=like.device)
    for t, w in zip(tensors, weights):
        acc.add_(t.to(device=like.device), alpha=float(w))
    return acc.to(like.dtype)


def _weighted_dict(
    dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> dict[str, Tensor]:
    """Key-wise weighted sum of same-keyed dicts; non-floating tensors come from dicts[0]."""
    out: dict[str, Tensor] = {}
    for key, ref in dicts[0].items():
        floating = ref.is_floating_point()
        out[key] = _weighted_sum([d[key] for d in dicts], weights, ref) if floating else ref
    return out


def _merge_over_uploaders(
    previous: Mapping[str, Tensor],
    updates: Sequence[Mapping[str, Tensor]],
    weights_of: Callable[[str, list[int]], list[float] | None],
) -> dict[str, Tensor]:
    """Each tensor of ``previous`` as the weighted sum over the clients that uploaded it,
    ``weights_of(key, uploaders)`` giving the weights (None: keep the previous value).
    Nobody uploaded it: the previous tensor object itself; a non-floating tensor: the
    first uploader's value."""
    result: dict[str, Tensor] = {}
    for key, prev in previous.items():
        uploaders = [c for c, update in enumerate(updates) if key in update]
        if not uploaders:
            result[key] = prev
            continue
        if not prev.is_floating_point():
            result[key] = updates[uploaders[0]][key]
            continue
        weights = weights_of(key, uploaders)
        result[key] = prev if weights is None else _weighted_sum([updates[c][key] for c in uploaders], weights, prev)
    return result


def aggregate_experts(
    previous: Mapping[str, Tensor],
    updates: Sequence[Mapping[str, Tensor]],
    num_examples: Sequence[int],
) -> dict[str, Tensor]:
    """Sparse expert aggregation (Eq. 17, with the paper's u_j -> u_c typo fixed).

    Every expert parameter becomes the |D_c|-weighted mean over the clients that
    uploaded it; a parameter nobody uploaded keeps its previous global value.
    If every client that uploaded a key has num_examples 0, they are weighted equally
    (plain mean) rather than dividing by zero. Non-floating tensors take the first
    uploader's value, since averaging integers is meaningless.

    Parameters
    ----------
    previous : Mapping[str, Tensor]
        Global expert parameters of the last round, one entry per tensor (any key format).
    updates : Sequence[Mapping[str, Tensor]]
        Per client, only the expert tensors it uploaded (a subset of ``previous``' keys).
    num_examples : Sequence[int]
        |D_c| per client, same length as ``updates``, each >= 0, not all 0.

    Returns
    -------
    dict[str, Tensor]
        A new dict with the keys of ``previous``. Keys nobody uploaded map to the same
        tensor objects as in ``previous`` (not copies); inputs are not modified.

    Raises
    ------
    ValueError
        On an empty ``updates``, a length mismatch, negative or all-zero
        ``num_examples``, or an uploaded key that is not in ``previous`` or whose
        shape differs from it (the message names the key and the client index).
    """
    _check_num_examples(num_examples, len(updates), "updates")
    for c, update in enumerate(updates):
        for key, t in update.items():
            if key not in previous:
                raise ValueError(
                    f"client {c} uploaded {key!r}, which is not an expert in previous"
                )
            if t.shape != previous[key].shape:
                raise ValueError(
                    f"client {c} uploaded {key!r} with shape {tuple(t.shape)}, expected "
                    f"{tuple(previous[key].shape)}"
                )

    def data_size(key: str, uploaders: list[int]) -> list[float]:
        counts = [num_examples[c] for c in uploaders]
        total = sum(counts)
        return [n / total for n in counts] if total > 0 else [1 / len(counts)] * len(counts)

    return _merge_over_uploaders(previous, updates, data_size)


def activation_weights(frequency: Tensor, num_examples: Sequence[int], temperature: float = 2.0) -> Tensor:
    """FLAME's activation-aware weights gamma_c^j = (f_c^j)^t * |D_c| (Le et al. 2025).

    Parameters
    ----------
    frequency : Tensor[C, L, S]
        f_c^j: the share of client c's routed tokens that expert j processed in its
        local round (>= 0).
    num_examples : Sequence[int]
        |D_c| per client.
    temperature : float
        t >= 0; t = 0 gives FedAvg's |D_c| weights, FLAME advises 2-4.

    Returns
    -------
    Tensor[C, L, S], float64
    """
    if frequency.dim() != 3 or frequency.shape[0] != len(num_examples):
        raise ValueError(f"frequency must be Tensor[C, L, S] with C = {len(num_examples)} clients, "
                         f"got {tuple(frequency.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    sizes = torch.tensor(num_examples, dtype=torch.float64)[:, None, None]
    return frequency.double().clamp_min(0).pow(temperature) * sizes


def aggregate_experts_weighted(
    previous: Mapping[str, Tensor],
    updates: Sequence[Mapping[str, Tensor]],
    weights: Tensor,
    expert_of: Mapping[str, tuple[int, int]],
) -> dict[str, Tensor]:
    """Each expert tensor as its uploaders' mean under per-expert client weights.

    theta^j = sum_c gamma_c^j theta_c^j / sum_c gamma_c^j over the clients c that
    uploaded expert j (FLAME's activation-aware aggregation with gamma from
    :func:`activation_weights`). An expert nobody uploaded, or whose uploaders all
    have weight 0 (they trained it without routing a token to it), keeps its previous
    value. Non-floating tensors take the first uploader's value.

    Parameters
    ----------
    previous : Mapping[str, Tensor]
        Global expert tensors of the last round.
    updates : Sequence[Mapping[str, Tensor]]
        Per client, the expert tensors it uploaded.
    weights : Tensor[C, L, S]
        gamma_c^j >= 0.
    expert_of : Mapping[str, tuple[int, int]]
        Expert tensor key -> (layer, expert).
    """
    if weights.dim() != 3 or weights.shape[0] != len(updates):
        raise ValueError(f"weights must be Tensor[C, L, S] with C = {len(updates)} clients, got {tuple(weights.shape)}")
    def activation(key: str, uploaders: list[int]) -> list[float] | None:
        layer, expert = expert_of[key]
        gamma = [float(weights[c, layer, expert]) for c in uploaders]
        total = sum(gamma)
        return [g / total for g in gamma] if total > 0 else None

    return _merge_over_uploaders(previous, updates, activation)


def gate_weights(
    usage: Tensor, importance: Tensor, tau: float = 0.05, normalize: bool = True
) -> Tensor:
    """Per-client gate aggregation weights alpha(c) (Eq. 18-20).

    S_c = {(l, e) : u_c(e) >= tau}, S_global = union_c S_c, p_c(e) = u_c(e) * s^c(e)
    on S_c and 0 elsewhere (Eq. 19), alpha(c) = sum_e p_c(e) / |S_global| (Eq. 20).
    r(c) of Eq. 18 is never used by the paper and is not computed. The paper's alpha
    does not sum to 1, so Eq. 21 would rescale the router; ``normalize=True`` (project
    default) divides by sum_c alpha(c). Degenerate cases (|S_global| = 0 or
    sum_c alpha(c) = 0) give uniform 1/C when normalised and zeros when literal.

    Parameters
    ----------
    usage : Tensor[C, L, S]
        u_c(e) per client (Eq. 16), >= 0.
    importance : Tensor[C, L, S]
        s^c(e): each client's importance averaged over its local batches, >= 0.
    tau : float
        Upload threshold on usage, >= 0. The paper uses 0.05.
    normalize : bool
        True: weights sum to 1 (project default). False: the paper's literal Eq. 20.

    Returns
    -------
    Tensor[C]
        alpha(c), in the dtype of ``usage``.

    Raises
    ------
    ValueError
        On a wrong ndim/dtype, mismatched shapes, C = 0, negative usage or importance,
        or ``tau`` < 0.
    """
    check_tensor(usage, "usage", 3, "[C, L, S]")
    check_tensor(importance, "importance", 3, "[C, L, S]")
    if usage.shape != importance.shape:
        raise ValueError(
            f"usage shape {tuple(usage.shape)} and importance shape "
            f"{tuple(importance.shape)} must match"
        )
    C = usage.shape[0]
    if C == 0:
        raise ValueError("usage has no clients (C = 0); pass at least one client")
    if (usage < 0).any() or (importance < 0).any():
        raise ValueError("usage and importance must be >= 0 (they are averaged probabilities)")
    if not tau >= 0.0:
        raise ValueError(f"tau must be >= 0, got {tau}")

    uploaded = usage >= tau  # S_c per client
    n_global = int(uploaded.any(dim=0).sum())  # |S_global|
    p = torch.where(uploaded, usage * importance.to(usage.dtype), 0.0)
    uniform = torch.full((C,), 1.0 / C, dtype=usage.dtype, device=usage.device)
    if n_global == 0:
        return uniform if normalize else torch.zeros_like(uniform)
    alpha = p.sum(dim=(1, 2)) / n_global
    if not normalize:
        return alpha
    total = alpha.sum()
    return alpha / total if total > 0 else uniform


def aggregate_gates(gates: Sequence[Mapping[str, Tensor]], alpha: Tensor) -> dict[str, Tensor]:
    """Gate (router) aggregation G^{t+1} = sum_c alpha(c) * G_c^t (Eq. 21).

    Non-floating tensors take the first client's value.

    Parameters
    ----------
    gates : Sequence[Mapping[str, Tensor]]
        Per client, its router parameters; all clients must have the same keys and shapes.
    alpha : Tensor[C]
        Weight per client (``gate_weights``).

    Returns
    -------
    dict[str, Tensor]
        A new dict key -> sum_c alpha(c) * G_c, in each tensor's original dtype.

    Raises
    ------
    ValueError
        On an empty ``gates``, ``alpha`` not of shape [C] or not finite, or keys/shapes
        that differ between clients.
    """
    if len(gates) == 0:
        raise ValueError("the list of gates is empty; aggregate at least one client")
    if not isinstance(alpha, Tensor) or alpha.ndim != 1 or alpha.shape[0] != len(gates):
        shape = tuple(alpha.shape) if isinstance(alpha, Tensor) else type(alpha).__name__
        raise ValueError(f"alpha must be a tensor of shape [C] = [{len(gates)}], got {shape}")
    if not torch.isfinite(alpha).all():
        raise ValueError("alpha contains NaN or inf")
    _check_same_keys_and_shapes(gates, "gates")
    return _weighted_dict(gates, alpha.tolist())


def fedavg(
    states: Sequence[Mapping[str, Tensor]], num_examples: Sequence[int]
) -> dict[str, Tensor]:
    """|D_c|-weighted FedAvg of dense (non-expert) parameters.

    The paper does not say how dense parameters are aggregated; this is the
    project's choice. Non-floating tensors (e.g. integer ``position_ids`` buffers)
    take the first client's value.

    Parameters
    ----------
    states : Sequence[Mapping[str, Tensor]]
        Per client, its dense parameters; all clients must have the same keys and shapes.
    num_examples : Sequence[int]
        |D_c| per client, same length as ``states``, each >= 0, not all 0.

    Returns
    -------
    dict[str, Tensor]
        A new dict key -> weighted mean, in each tensor's original dtype.

    Raises
    ------
    ValueError
        On an empty ``states``, a length mismatch, negative or all-zero
        ``num_examples``, or keys/shapes that differ between clients.
    """
    _check_num_examples(num_examples, len(states), "states")
    _check_same_keys_and_shapes(states, "states")
    total = sum(num_examples)
    return _weighted_dict(states, [n / total for n in num_examples])


def _check_same_keys_and_shapes(dicts: Sequence[Mapping[str, Tensor]], what: str) -> None:
    """Raise ValueError naming the client and key where ``dicts`` disagree with client 0."""
    ref = dicts[0]
    for c, d in enumerate(dicts[1:], start=1):
        if d.keys() != ref.keys():
            missing = sorted(set(ref) - set(d))
            extra = sorted(set(d) - set(ref))
            raise ValueError(
                f"{what} of client {c} have different keys from client 0: "
                f"missing {missing}, extra {extra}"
            )
        for key, t in d.items():
            if t.shape != ref[key].shape:
                raise ValueError(
                    f"{what} of client {c}: {key!r} has shape {tuple(t.shape)}, "
                    f"client 0 has {tuple(ref[key].shape)}"
                )
