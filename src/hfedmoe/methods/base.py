"""The interface every federated method implements, and what it is given.

A method is one file in this package, in the spirit of Flower's strategies: a
:class:`Method` subclass answering, for one client and round, *which experts it
trains on each mini-batch* and *under which budget rule* (:meth:`Method.plan_round`,
returning a :class:`RoundPlan` that may add a loss term or mask the routing), *what
it uploads* (:meth:`Method.upload_mask`), and, on the server, *how experts and
routers are merged* (:attr:`Method.expert_merge`, :attr:`Method.router_weights`,
callables over :mod:`hfedmoe.core` from :mod:`hfedmoe.methods.merging`).
Adding a method = one new file + one line in :mod:`hfedmoe.methods.registry`
(docs/extending.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from hfedmoe.methods.merging import ExpertMerge, RouterWeights, merge_over_uploaders, preference_weights
from hfedmoe.moe import MoEAccess
from hfedmoe.training import LocalTrainResult, SelectionPolicy

# extra_loss(access, batch) -> scalar added to a batch's loss (see hfedmoe.training.train_local)
ExtraLoss = Callable[[MoEAccess, dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class ClientContext:
    """What a method may look at when it plans one client's round.

    Attributes
    ----------
    access : MoEAccess
        The client's model, already holding this round's global state.
    data : ClientData
        The client's partition (``partition_id``, ``batches``).
    expert_budget : int
        C_budget: the most experts the client may train per mini-batch.
    server_round : int
        The run's absolute round number (1 = the first).
    local_steps, seed : int
        The run's settings of those names.
    select_by : str
        "ib" (rank by I_b, Eq. 15) or "importance" (s_b).
    run_key : str
        Identifies the run (its configuration JSON); caches that must not cross
        runs are keyed by it.
    build_initial_model : callable
        Rebuilds the run's initial global model (deterministic in the seed), for
        methods that profile it once (FedMoE, SEER-MoE).
    private_state : dict
        What the method keeps on this client between rounds (never uploaded): plain
        JSON-like values (numbers, strings, lists of them). Flower keeps it in the
        node's context state; it starts empty (and is lost when the node restarts).
    """

    access: MoEAccess
    data: Any
    expert_budget: int
    server_round: int
    local_steps: int
    seed: int
    select_by: str
    run_key: str
    build_initial_model: Callable[[], nn.Module]
    private_state: dict[str, Any] = field(default_factory=dict)

    @property
    def total_experts(self) -> int:
        """L * S: the budget that trains every expert."""
        return self.access.num_layers * self.access.num_experts


@dataclass
class RoundPlan:
    """What one client does this round under its method.

    Attributes
    ----------
    policy : SelectionPolicy or None
        Which experts to train on each batch; None together with ``failure``.
    train_budget : int
        The C_budget the local loop enforces.
    failure : str, optional
        Set: the client does not train (e.g. FedAvg whose budget cannot hold full
        fine-tuning) and reports this reason instead of an update.
    subset : BoolTensor[L, S], optional
        The client's fixed or preferred experts, where the method has one.
    routing_mask : BoolTensor[L, S], optional
        Experts outside it are never routed to (a pruned sub-model).
    routing_top_k : int, optional
        Experts each token is routed to during the round (FLAME's k_i); None: the model's.
    output_scales : Tensor[L], optional
        Each layer's routed-expert output is multiplied by it (FLAME's rescaler s_i); when
        it requires grad, the local loop trains it with the experts.
    entropy_coef : float
        Weight of a gate-entropy penalty added to the loss (0: none).
    honours_time_budget : bool
        False for the unconstrained reference, which ignores every budget.
    """

    policy: SelectionPolicy | None
    train_budget: int
    failure: str | None = None
    subset: torch.Tensor | None = None
    routing_mask: torch.Tensor | None = None
    routing_top_k: int | None = None
    output_scales: torch.Tensor | None = None
    entropy_coef: float = 0.0
    honours_time_budget: bool = True

    @contextlib.contextmanager
    def hooks(self, access: MoEAccess) -> Iterator[ExtraLoss | None]:
        """Install the plan's routing changes while training; yields the extra loss (or None)."""
        with contextlib.ExitStack() as stack:
            capture = None
            if self.routing_mask is not None or self.routing_top_k is not None or self.entropy_coef:
                capture = stack.enter_context(access.routing_override(self.routing_mask, self.routing_top_k))
            if self.output_scales is not None:
                stack.enter_context(access.routed_output_scale(self.output_scales))
            if not self.entropy_coef:
                yield None
                return
            coef = self.entropy_coef

            def entropy_penalty(_access: MoEAccess, batch: dict[str, torch.Tensor]) -> torch.Tensor:
                return coef * capture.entropy(batch["attention_mask"])

            yield entropy_penalty


class Method:
    """One federated method's behaviour. Subclass, override what differs; its name,
    summary and whether HFedMoE's ablation switches apply are its line in
    :mod:`hfedmoe.methods.registry`.

    Class attributes
    ----------------
    expert_merge : ExpertMerge
        How the server merges the uploaded experts (default Eq. 17).
    router_weights : RouterWeights
        Each client's weight in the router merge (default Eq. 18-20).
    """

    expert_merge: ClassVar[ExpertMerge] = staticmethod(merge_over_uploaders)
    router_weights: ClassVar[RouterWeights] = staticmethod(preference_weights)

    def plan_round(self, ctx: ClientContext) -> RoundPlan:
        """The selection policy and budget rule of one client's round."""
        raise NotImplementedError

    def end_round(self, ctx: ClientContext, plan: RoundPlan) -> None:
        """After a successful local round: keep what the method carries to the client's
        next round in ``ctx.private_state`` (default: nothing)."""

    def upload_mask(self, result: LocalTrainResult, tau: float) -> torch.Tensor:
        """BoolTensor[L, S]: the experts the client uploads after training.

        Default, HFedMoE's rule: the experts it really used, trained in some batch
        and with usage u_c >= tau (Eq. 18's S_c). An untrained expert equals the
        global one, so uploading it would only drag the average back.
        """
        return upload_used(result, tau)


# --- rules several methods share ------------------------------------------------------------

def upload_used(result: LocalTrainResult, tau: float) -> torch.Tensor:
    """Trained in some batch and u_c >= tau (HFedMoE, Eq. 18's S_c)."""
    return result.trained & (result.usage >= tau)


def upload_trained(result: LocalTrainResult, tau: float) -> torch.Tensor:
    """Every expert trained in some batch, whatever its usage."""
    return result.trained.clone()


def upload_all(result: LocalTrainResult, tau: float) -> torch.Tensor:
    """The whole model (FedAvg)."""
    return torch.ones_like(result.trained)


def all_experts_policy() -> SelectionPolicy:
    """Full fine-tuning: every expert of every layer, whether it received tokens or not."""

    def select(routing) -> torch.Tensor:
        return torch.ones_like(routing.candidates)

    return select


def fixed_subset_policy(subset: torch.Tensor) -> SelectionPolicy:
    """Train the experts of a fixed ``subset`` (BoolTensor[L, S]) that received tokens.

    An expert of the subset that no token of the batch reached would get no
    gradient; counting it as trained would only make it upload an unchanged copy.
    """

    def select(routing) -> torch.Tensor:
        return subset & routing.candidates

    return select
