"""Training on one client: the local round (route -> score -> select -> masked backward ->
step), the task objectives, evaluation, and peak-memory measurement."""

from hfedmoe.training.evaluate import evaluate
from hfedmoe.training.loop import (
    LocalTrainConfig,
    LocalTrainResult,
    PhaseHook,
    make_optimizer,
    set_torch_threads,
    train_local,
)
from hfedmoe.training.selection import BatchRouting, SelectionPolicy, score_policy
from hfedmoe.training.stream import batches_from_round

__all__ = [
    "BatchRouting",
    "LocalTrainConfig",
    "LocalTrainResult",
    "PhaseHook",
    "SelectionPolicy",
    "batches_from_round",
    "evaluate",
    "make_optimizer",
    "score_policy",
    "set_torch_threads",
    "train_local",
]
