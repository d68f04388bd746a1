"""State keys shared by every access family: virtual per-expert keys, task heads, checks.

Aggregation works per expert, so layouts that fuse the experts of a layer into one
tensor split it on the wire into one key per expert::

    model.layers.1.mlp.experts.gate_up_proj               [E, 2I, H]   (real key)
    model.layers.1.mlp.experts.gate_up_proj.__expert__.3  [2I, H]      (virtual key, e=3)

``<real key>.__expert__.<e>``: the real key is the prefix, so the origin of every
slice is readable; ``__expert__`` cannot be a parameter name (parameter names have no
dots) and :func:`check_unique_keys` catches a real key colliding with a virtual one.
"""

from __future__ import annotations

import torch

EXPERT_TAG = "__expert__"
HEAD_NAMES = ("score", "classifier")  # task heads HF adds on top of a pretrained LM


def is_head_parameter(name: str) -> bool:
    """A parameter of a module named like a task head ("score.weight", "model.score.weight")."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] in HEAD_NAMES


def expert_key(real_key: str, expert: int) -> str:
    """Virtual state-dict key of slice ``expert`` of the fused tensor ``real_key``."""
    return f"{real_key}.{EXPERT_TAG}.{expert}"


def split_expert_key(key: str) -> tuple[str, int] | None:
    """Inverse of :func:`expert_key`: ``(real_key, expert)``, or None for other keys."""
    real, sep, index = key.rpartition(f".{EXPERT_TAG}.")
    if not sep or not index.isdigit():
        return None
    return real, int(index)


def check_state_keys(expected: list[str], state: dict[str, torch.Tensor]) -> None:
    """Strict loading: ValueError naming the first missing or unknown key."""
    known = set(expected)
    missing = [k for k in expected if k not in state]
    unknown = [k for k in state if k not in known]
    for problem, keys in (("missing", missing), ("unknown", unknown)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"state has {problem} key {keys[0]!r}{more}")


def check_unique_keys(keys: list[str], model_name: str) -> None:
    """ValueError when a real state key of the model collides with a virtual expert key."""
    if len(set(keys)) != len(keys):
        raise ValueError(f"a real state key of {model_name} collides with a virtual expert key")


def check_selection(selection: torch.Tensor, num_layers: int, num_experts: int) -> torch.Tensor:
    """``selection`` on the CPU, after checking it is a BoolTensor[L, S]."""
    shape = (num_layers, num_experts)
    if tuple(selection.shape) != shape or selection.dtype != torch.bool:
        got = f"{selection.dtype}{list(selection.shape)}"
        raise ValueError(f"selection must be a BoolTensor{list(shape)}, got {got}")
    return selection.cpu()
