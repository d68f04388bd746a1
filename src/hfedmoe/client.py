"""What one client does in one round, without Flower.

:mod:`hfedmoe.fl.client_app` wraps this in Flower messages; benchmarks call it
directly to measure what the federated engine adds on top.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from hfedmoe.config import RunConfig
from hfedmoe.moe import MoEAccess
from hfedmoe.policies import plan_round
from hfedmoe.resources import bound_allocator
from hfedmoe.task import ClientData
from hfedmoe.train import LocalTrainConfig, LocalTrainResult, train_local


@dataclass
class ClientRoundResult:
    """A client's reply content: the tensors it uploads, its statistics and metrics."""

    upload: dict[str, torch.Tensor]  # dense + routers + the experts it really used
    stats: dict[str, torch.Tensor]  # usage, importance, selection-counts  ([L, S] each)
    metrics: dict[str, float | int]
    result: LocalTrainResult | None
    failure: str | None = None  # the client could not train this round (method's budget rule); nothing uploaded


def batches_from_round(data: ClientData, server_round: int, local_steps: int):
    """Continue the client's data stream where the previous round stopped.

    Computed from the round number rather than kept in process state, so the run
    is the same whichever simulation worker serves this client.
    """
    epoch, skip = divmod((server_round - 1) * local_steps, len(data.batches))
    while True:
        yield from itertools.islice(data.batches.iter_epoch(epoch), skip, None)
        epoch, skip = epoch + 1, 0


def local_train_config(cfg: RunConfig) -> LocalTrainConfig:
    return LocalTrainConfig(
        local_steps=cfg.local_steps, lr=cfg.lr, new_param_lr_mult=cfg.new_param_lr_mult, lam=cfg.lam,
        beta=cfg.beta, pooling=cfg.pooling, select_by=cfg.select_by, aux_loss_coef=cfg.aux_loss_coef,
        task=cfg.task,
    )


def client_round(
    cfg: RunConfig,
    access: MoEAccess,
    data: ClientData,
    global_state: dict[str, torch.Tensor],
    expert_budget: int,
    server_round: int,
    mem_budget_bytes: int | None = None,
    time_budget_s: float | None = None,
    release_global_state: bool = False,
) -> ClientRoundResult:
    """Load the global state, train one local round, and choose what to upload.

    With ``release_global_state`` the received ``global_state`` dict is emptied once
    loaded into the model, so the received copy of the model (as large as the model)
    is not resident while the client trains (the Flower client does this; callers
    that reuse one state for several clients leave it False).
    """
    if mem_budget_bytes:
        bound_allocator()  # peaks that stay within the memory model, round after round
    access.load_state_dict(global_state, strict=True)
    if release_global_state:
        global_state.clear()
    torch.manual_seed(cfg.seed * 7919 + server_round * 31 + data.partition_id)  # dropout
    # The method (hfedmoe.policies) decides selection, budget handling and upload.
    plan = plan_round(cfg, access, data, expert_budget, server_round)
    if plan.failure:
        metrics = {"num-examples": data.num_examples, "partition-id": data.partition_id,
                   "expert-budget": expert_budget}
        return ClientRoundResult(upload={}, stats={}, metrics=metrics, result=None, failure=plan.failure)
    local = local_train_config(cfg)
    local.time_budget_s = None if plan.method.budget == "ignore" else time_budget_s
    with plan.hooks(access) as extra_loss:
        result = train_local(
            access.model, batches_from_round(data, server_round, cfg.local_steps), plan.train_budget, local,
            policy=plan.policy, extra_loss=extra_loss,
        )

    # HFedMoE uploads only the experts this client really used: trained in some batch
    # and with usage u_c >= tau (Eq. 18's S_c). An untrained expert equals the global
    # one, so uploading it would only drag the average back.
    uploaded = plan.upload_mask(result, cfg.tau)
    groups = access.param_groups()
    keep = set(groups.dense) | set(groups.routers)
    for layer, expert in uploaded.nonzero().tolist():
        keep.update(groups.experts[(layer, expert)])
    state = access.state_dict()
    metrics = {
        "num-examples": data.num_examples,
        "partition-id": data.partition_id,
        "expert-budget": expert_budget,
        "train-loss": result.train_loss,
        "experts-trained-mean": result.experts_trained_mean,
        "experts-uploaded": int(uploaded.sum()),
        "peak-mem-bytes": result.peak_mem_bytes,
        "mem-budget-bytes": mem_budget_bytes or 0,
        "over-budget": int(bool(mem_budget_bytes) and result.peak_mem_bytes > mem_budget_bytes),
        "local-steps": result.steps,
        "wall-s": result.wall_s,
        "select-s": result.select_s,
    }
    return ClientRoundResult(
        upload={k: v for k, v in state.items() if k in keep},
        stats={"usage": result.usage, "importance": result.importance,
               "selection-counts": result.selection_counts},
        metrics=metrics,
        result=result,
    )
