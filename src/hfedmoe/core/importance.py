"""Expert importance (Eq. 3-5) and per-client expert usage (Eq. 16).

Shapes: B samples, T tokens, L MoE layers, S routed experts per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

POOLING_MODES = ("mean", "max")


def check_tensor(t: object, name: str, ndim: int, dims: str) -> None:
    """Raise ValueError unless ``t`` is a floating tensor with ``ndim`` dims (named ``dims``)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {dims}, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(
            f"{name} must have {ndim} dims {dims}, got shape {tuple(t.shape)}; reshape it to {dims}"
        )
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (float32/float64), got {t.dtype}")


def pool_token_scores(
    token_scores: Tensor, attention_mask: Tensor | None = None, mode: str = "mean"
) -> Tensor:
    """Pool per-token router probabilities into one score per sample.

    The paper writes G_e(x_i) per sample while routers score tokens (Eq. 3-5
    ambiguity); the project pools over a sample's non-padding tokens.

    Parameters
    ----------
    token_scores : Tensor[B, T, L, S]
        Router probability of every token for every expert of every MoE layer.
    attention_mask : Tensor[B, T] or Tensor[B, T, L], optional
        1 (or True) for real tokens, 0 (or False) for padding. None means no padding.
        A per-layer mask [B, T, L] serves encoder-decoder models, whose encoder
        and decoder layers route different token sequences (padded to one T).
    mode : {"mean", "max"}
        Mean (project default) or max over the non-padding tokens.

    Returns
    -------
    Tensor[B, L, S]
        Per-sample scores G_e(x_i), in the dtype of ``token_scores``.

    Raises
    ------
    ValueError
        On a wrong ndim/dtype, a mask whose shape is not [B, T] or whose values are not
        0/1, an unknown ``mode``, or a sample with no non-padding token.
    """
    check_tensor(token_scores, "token_scores", 4, "[B, T, L, S]")
    if mode not in POOLING_MODES:
        raise ValueError(f"pooling mode must be one of {POOLING_MODES}, got {mode!r}")
    B, T = token_scores.shape[:2]
    if attention_mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=token_scores.device)
    else:
        L = token_scores.shape[2]
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) not in ((B, T), (B, T, L)):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else None
            raise ValueError(
                f"attention_mask must be a tensor of shape [B, T] = {(B, T)} (or [B, T, L] = {(B, T, L)}) "
                f"matching token_scores, got {shape}"
            )
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask must hold only 0/1 (or bool) values")
        mask = attention_mask.to(device=token_scores.device, dtype=torch.bool)
    if mask.dim() == 2:
        mask = mask[:, :, None]  # one mask for every layer
    counts = mask.sum(dim=1)  # [B, L] (or [B, 1])
    if (counts == 0).any():
        empty = sorted(set(torch.nonzero(counts == 0)[:, 0].tolist()))
        raise ValueError(
            f"samples {empty} have no non-padding token; drop them or fix attention_mask"
        )
    keep = mask[:, :, :, None]
    # torch.where (not multiplication) so NaN/inf garbage in padding cannot leak through.
    if mode == "mean":
        summed = torch.where(keep, token_scores, 0.0).sum(dim=1)
        return summed / counts.to(token_scores.dtype)[:, :, None]
    return torch.where(keep, token_scores, float("-inf")).amax(dim=1)


def importance(gates: Tensor, lam: float = 0.9) -> Tensor:
    """Combined expert importance of a mini-batch (Eq. 3-5).

    s_cumul = (1/B) sum_i G_e(x_i) (Eq. 3), s_spec = max_i G_e(x_i) (Eq. 4),
    s_b = lam * s_cumul + (1 - lam) * s_spec (Eq. 5).

    Parameters
    ----------
    gates : Tensor[B, L, S]
        Per-sample routing probabilities G_e(x_i) (see ``pool_token_scores``).
    lam : float
        Weight of the cumulative term, in [0, 1]. The paper uses 0.9.

    Returns
    -------
    Tensor[L, S]
        s_b(e) for every expert, in the dtype of ``gates``.

    Raises
    ------
    ValueError
        If ``gates`` is not a floating [B, L, S] tensor with B >= 1, or ``lam`` is
        outside [0, 1].
    """
    check_tensor(gates, "gates", 3, "[B, L, S]")
    if gates.shape[0] == 0:
        raise ValueError("gates has no samples (B = 0); importance needs at least one sample")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return lam * gates.mean(dim=0) + (1.0 - lam) * gates.amax(dim=0)


def expert_usage(gate_sums: Tensor, num_samples: int) -> Tensor:
    """Per-client expert usage over its local data (Eq. 16).

    u_c(e) = (1/|D_c|) sum_{x in D_c} G_e(x). Summing per batch and dividing once
    lets the client accumulate over any number of batches.

    Parameters
    ----------
    gate_sums : Tensor[L, S]
        Sum over the client's samples of the pooled G_e(x).
    num_samples : int
        |D_c|, the number of samples summed into ``gate_sums``; must be > 0.

    Returns
    -------
    Tensor[L, S]
        u_c(e), in the dtype of ``gate_sums``.

    Raises
    ------
    ValueError
        If ``gate_sums`` is not a floating [L, S] tensor or ``num_samples`` <= 0.
    """
    check_tensor(gate_sums, "gate_sums", 2, "[L, S]")
    if num_samples <= 0:
        raise ValueError(
            f"num_samples must be > 0 (the number of samples summed into gate_sums), "
            f"got {num_samples}"
        )
    return gate_sums / num_samples
