"""Tensors on the model's device: batches moved there, the model's device and dtypes.

Which device and precision a run uses is decided in :mod:`hfedmoe.recipe.device`;
the training loop and evaluation simply follow the model they are given.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device`` (a no-op on the CPU)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s parameters (a run's model lives on one device)."""
    return next(model.parameters()).device
