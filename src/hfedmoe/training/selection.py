"""What a selection rule sees per mini-batch, and the score-ranking rule (Eq. 15).

A method (:mod:`hfedmoe.methods`) plugs a :data:`SelectionPolicy` into the local
loop (:func:`hfedmoe.training.loop.train_local`); the loop builds one
:class:`BatchRouting` per batch and trains the experts the policy returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hfedmoe import core


@dataclass
class BatchRouting:
    """What an expert-selection policy may look at for one mini-batch."""

    gates: torch.Tensor  # per-sample G_e(x_i), Tensor[B, L, S]
    candidates: torch.Tensor  # E_union, BoolTensor[L, S]
    importance: torch.Tensor  # s_b, Tensor[L, S] (Eq. 5)
    ib_score: torch.Tensor  # I_b, Tensor[L, S] (Eq. 14)
    budget: int  # C_budget
    step: int  # local step index in this round


# A policy maps a batch's routing to the experts trained on it (BoolTensor[L, S]).
SelectionPolicy = Callable[[BatchRouting], torch.Tensor]


def score_policy(select_by: str = "ib") -> SelectionPolicy:
    """Rank by I_b (Eq. 15) or s_b, cover every layer, fill the budget: HFedMoE's rule and
    the loop's default."""

    def select(routing: BatchRouting) -> torch.Tensor:
        scores = routing.ib_score if select_by == "ib" else routing.importance
        return core.select_experts(scores, routing.candidates, routing.budget)

    return select
