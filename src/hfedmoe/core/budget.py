"""Memory model of one local training step, and the map memory budget -> C_budget.

The paper caps each client's memory (uniformly in [12, 32] GB) and gives each a
C_budget, the most experts it trains per mini-batch, without saying how one maps to
the other. This project models the peak memory of local training as linear in the
number n of experts trained per batch:

    M(n) = base_bytes + n * per_expert_bytes

base_bytes holds what every step needs whatever the selection (the weights, the
dense and router gradients and optimizer state, the forward activations);
per_expert_bytes what one more trained expert adds (its gradient, its AdamW
moments, its saved activations). Unselected experts hold neither gradient nor
optimizer state (see hfedmoe.training.loop), which is what makes M linear in n. The
coefficients come from a measured calibration (`hfedmoe calibrate`, or measured
automatically on a run's first use: fitted with :func:`fit_memory_model`, then raised
by :func:`cover_measurements` so that no measured peak lies above the line) or, when
asked for (``--calibration analytic``), from :func:`analytic_memory_model`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'600MB' -> 600_000_000; '1.2GB', '512MiB', '2e9' and plain numbers work too."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read {text!r} as a memory size: use a number with B, KB, MB or GB, e.g. 600MB")
        value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@dataclass(frozen=True)
class MemoryModel:
    """Peak training memory M(n) = base_bytes + n * per_expert_bytes."""

    base_bytes: float
    per_expert_bytes: float
    source: str = "analytic"  # "analytic" or "calibrated"

    def predict(self, trained_experts: int) -> float:
        """Predicted peak bytes of a step that trains ``trained_experts`` experts."""
        return self.base_bytes + trained_experts * self.per_expert_bytes

    def to_dict(self) -> dict:
        return asdict(self)


def analytic_memory_model(
    weight_bytes: int,
    dense_param_bytes: int,
    expert_param_bytes: int,
    activation_base_bytes: int,
    activation_per_expert_bytes: int,
    fused_expert_bytes: int | None = None,
) -> MemoryModel:
    """A first-principles estimate for AdamW in float32.

    Parameters
    ----------
    weight_bytes : int
        Every parameter of the model (all experts included): always resident.
    dense_param_bytes : int
        Dense + router parameters: always trained, so each also holds a gradient
        and two AdamW moments (3 x its bytes).
    expert_param_bytes : int
        Parameters of one expert: a trained expert adds the same 3 x.
    activation_base_bytes, activation_per_expert_bytes : int
        Saved activations of the dense part, and of one trained expert.
    fused_expert_bytes : int, optional
        Every expert's bytes, when the experts are slices of fused ``[E, ...]``
        tensors. Each MoE layer trains at least one expert, so each fused tensor holds
        a full-size gradient: these bytes are in the base, and a trained expert adds
        only its two AdamW moments (2 x, see hfedmoe.moe.slice_adamw).
    """
    base = weight_bytes + 3 * dense_param_bytes + activation_base_bytes
    per_expert = 3 * expert_param_bytes + activation_per_expert_bytes
    if fused_expert_bytes is not None:
        base += fused_expert_bytes
        per_expert -= expert_param_bytes
    return MemoryModel(float(base), float(per_expert), "analytic")


def fit_memory_model(trained_experts: list[int], peak_bytes: list[float]) -> MemoryModel:
    """Least-squares line through measured (n, peak) points."""
    if len(trained_experts) != len(peak_bytes) or len(set(trained_experts)) < 2:
        raise ValueError("fitting the memory model needs peaks measured at two or more different expert counts")
    n = len(trained_experts)
    mean_x = sum(trained_experts) / n
    mean_y = sum(peak_bytes) / n
    sxx = sum((x - mean_x) ** 2 for x in trained_experts)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(trained_experts, peak_bytes))
    slope = sxy / sxx
    return MemoryModel(mean_y - slope * mean_x, max(slope, 0.0), "calibrated")


def cover_measurements(model: MemoryModel, trained_experts: list[int], peak_bytes: list[float]) -> MemoryModel:
    """``model`` with its base raised just enough that no measured peak lies above the
    prediction: an upper bound of its own measurements (the slope is kept).

    A least-squares line passes through the middle of the points, so about half of them
    lie above it; a budget planned on it would be exceeded by its own calibration. If
    the line already covers every point, ``model`` is returned unchanged.
    """
    if len(trained_experts) != len(peak_bytes):
        raise ValueError("cover_measurements needs one peak per expert count")
    shortfall = max((y - model.predict(n) for n, y in zip(trained_experts, peak_bytes)), default=0.0)
    if shortfall <= 0:
        return model
    # Rounded up past the next whole byte, so float rounding cannot leave a point above.
    return MemoryModel(float(math.ceil(model.base_bytes + shortfall) + 1), model.per_expert_bytes, model.source)


def expert_budget_for_memory(
    memory_bytes: int, model: MemoryModel, num_layers: int, num_experts_total: int, headroom: float = 0.0
) -> int:
    """C_budget: the most experts per batch whose predicted peak fits ``memory_bytes``.

    ``headroom``: the share of the budget left unplanned, i.e. the prediction must
    fit ``memory_bytes * (1 - headroom)`` (room for the memory model's error and the
    allocator's slow growth over a long run).

    Raises
    ------
    ValueError
        When the budget cannot hold the dense part alone, or not one expert per
        MoE layer (HFedMoE's coverage rule); the message names the minimum.
    """
    usable = memory_bytes * (1.0 - headroom)
    minimum = format_bytes(model.predict(num_layers) / (1.0 - headroom))
    kept = f", keeping {headroom:.0%} headroom" if headroom else ""
    if usable < model.base_bytes:
        raise ValueError(
            f"memory budget {format_bytes(memory_bytes)} is below the dense part's own need "
            f"({format_bytes(model.base_bytes)}, {model.source} memory model{kept}): the minimum is "
            f"{minimum} (one expert per MoE layer)"
        )
    if model.per_expert_bytes <= 0:
        return num_experts_total
    budget = int((usable - model.base_bytes) // model.per_expert_bytes)
    if budget < num_layers:
        raise ValueError(
            f"memory budget {format_bytes(memory_bytes)} fits {budget} trained experts, fewer than one per MoE "
            f"layer ({num_layers}): the minimum is {minimum} ({model.source} memory model{kept})"
        )
    return min(budget, num_experts_total)
