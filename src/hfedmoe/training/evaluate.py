"""Test metrics of a model on held-out batches (the server's per-round evaluation)."""

from __future__ import annotations

import torch
from torch import nn

from hfedmoe.training.device import model_device, to_device
from hfedmoe.training.objectives import objective_for


@torch.no_grad()
def evaluate(model: nn.Module, batches, max_batches: int | None = None, task: str = "classification") -> dict:
    """Test metrics of ``model`` over ``batches``: accuracy and mean loss (plus
    perplexity for causal-lm; see hfedmoe.training.objectives)."""
    objective = objective_for(task)
    model.eval()
    device = model_device(model)
    sums = {"loss_sum": 0.0, "correct": 0, "count": 0}
    examples = 0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        batch = to_device(batch, device)
        for key, value in objective.eval_sums(model, batch).items():
            sums[key] += value
        examples += len(batch["input_ids"])
    if examples == 0:
        raise ValueError("evaluation received no batches: the test set is empty")
    if sums["count"] == 0:
        raise ValueError("evaluation found nothing to score (no response tokens survived truncation): "
                         "raise --max-length")
    return objective.metrics(sums, examples)
