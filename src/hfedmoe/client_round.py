"""One client's round without Flower: load the global model, plan the round under the
run's method, train locally, and build the :class:`ClientUpload`.

:mod:`hfedmoe.fl.client_app` wraps this in Flower messages (encoding and parsing
the upload live side by side in :mod:`hfedmoe.fl.records`); benchmarks and tests
call it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hfedmoe.config import RunConfig
from hfedmoe.methods import get_method
from hfedmoe.methods.base import ClientContext
from hfedmoe.moe import MoEAccess, ParamGroups
from hfedmoe.recipe import ClientData, build_model, local_train_config
from hfedmoe.training import LocalTrainResult, batches_from_round, train_local
from hfedmoe.training.device import model_device
from hfedmoe.training.memory import (
    bound_allocator,
    gpu_memory_cap,
    release_device_memory,
    resident_bytes,
    weight_bytes,
)


@dataclass
class ClientUpload:
    """What a client sends back after a round.

    Attributes
    ----------
    tensors : dict[str, Tensor]
        Every dense and router tensor, plus the complete tensors of each expert the
        method uploads (state-dict keys, one per expert tensor).
    usage, importance : Tensor[L, S]
        u_c (Eq. 16) and the round's mean s^c: the router merge's inputs (Eq. 18-20).
    selection_counts : Tensor[L, S]
        Batches in which each expert was trained.
    activation : Tensor[L, S], optional
        f_c: the share of the client's routed tokens each expert processed (FLAME's
        activation-aware merge weighs by it).
    metrics : dict
        ``num-examples``, ``partition-id``, ``expert-budget`` and the round's figures
        (train loss, experts trained/uploaded, peak memory, times, ...).
    failure : str, optional
        Set when the client could not train under its method (nothing else is sent).
    result : LocalTrainResult, optional
        The local loop's full result; stays on the client (never encoded).
    """

    tensors: dict[str, torch.Tensor]
    usage: torch.Tensor | None
    importance: torch.Tensor | None
    selection_counts: torch.Tensor | None
    metrics: dict[str, float | int]
    failure: str | None = None
    result: LocalTrainResult | None = field(default=None, repr=False, compare=False)
    activation: torch.Tensor | None = None

    @property
    def num_examples(self) -> int:
        return int(self.metrics.get("num-examples", 0))

    @property
    def partition_id(self) -> int:
        return int(self.metrics.get("partition-id", -1))

    def experts(self, groups: ParamGroups) -> dict[str, torch.Tensor]:
        """The uploaded expert tensors."""
        return {k: v for k, v in self.tensors.items() if k in groups.expert_of}

    def routers(self, groups: ParamGroups) -> dict[str, torch.Tensor]:
        return {k: self.tensors[k] for k in groups.routers}

    def dense(self, groups: ParamGroups) -> dict[str, torch.Tensor]:
        return {k: self.tensors[k] for k in groups.dense}


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
    private_state: dict | None = None,
) -> ClientUpload:
    """Load the global state, train one local round under ``cfg.method``, build the upload.

    With ``release_global_state`` the received ``global_state`` dict is emptied once
    loaded into the model, so the received copy of the model (as large as the model)
    is not resident while the client trains (the Flower client does this; callers
    that reuse one state for several clients leave it False).

    On a GPU, ``mem_budget_bytes`` caps this round's CUDA allocations
    (:func:`~hfedmoe.training.memory.gpu_memory_cap`); running out of memory is the
    client's failure for the round (memory freed, nothing uploaded), not a crash.

    ``private_state`` is what the method keeps on this client between rounds (FLAME's
    rescaler); updated in place after a successful round, never uploaded.
    """
    device = model_device(access.model)
    if mem_budget_bytes and device.type == "cpu":
        bound_allocator()  # peaks that stay within the memory model, round after round
    access.load_state_dict(global_state, strict=True)
    if release_global_state:
        global_state.clear()
    torch.manual_seed(cfg.seed * 7919 + server_round * 31 + data.partition_id)  # dropout
    method = get_method(cfg.method)
    context = ClientContext(
        access=access, data=data, expert_budget=expert_budget, server_round=server_round,
        local_steps=cfg.local_steps, seed=cfg.seed, select_by=cfg.select_by, run_key=cfg.to_json(),
        build_initial_model=lambda: build_model(cfg, pretrained=True),
        private_state=private_state if private_state is not None else {},
    )
    plan = method.plan_round(context)
    metrics: dict[str, float | int] = {"num-examples": data.num_examples, "partition-id": data.partition_id,
                                       "expert-budget": expert_budget}
    if plan.failure:
        return ClientUpload(tensors={}, usage=None, importance=None, selection_counts=None, metrics=metrics,
                            failure=plan.failure)
    local = local_train_config(cfg)
    local.time_budget_s = time_budget_s if plan.honours_time_budget else None
    local.measure_memory = cfg.measure_memory or bool(mem_budget_bytes)  # a budget is checked against it
    try:
        with gpu_memory_cap(device, mem_budget_bytes, weight_bytes(access.model)) as cap, \
                plan.hooks(access) as extra_loss:
            result = train_local(
                access.model, batches_from_round(data, server_round, cfg.local_steps), plan.train_budget, local,
                policy=plan.policy, extra_loss=extra_loss,
                extra_params=[plan.output_scales] if plan.output_scales is not None and
                plan.output_scales.requires_grad else [],
            )
    except torch.OutOfMemoryError as err:
        release_device_memory(device)  # the round's activations, gradients and moments are garbage now
        within = f" within its {mem_budget_bytes / 1e9:.2f} GB budget" if mem_budget_bytes else ""
        first = str(err).splitlines()[0][:200] if str(err) else "out of memory"
        metrics.update({"out-of-memory": 1, "mem-budget-bytes": mem_budget_bytes or 0})
        return ClientUpload(tensors={}, usage=None, importance=None, selection_counts=None, metrics=metrics,
                            failure=f"out of memory on {device} training {plan.train_budget} experts per "
                                    f"batch{within}: {first}")

    method.end_round(context, plan)
    uploaded = method.upload_mask(result, cfg.tau)
    groups = access.param_groups()
    keep = set(groups.dense) | set(groups.routers)
    for layer, expert in uploaded.nonzero().tolist():
        keep.update(groups.experts[(layer, expert)])
    state = access.state_dict()
    metrics.update({
        "train-loss": result.train_loss,
        "experts-trained-mean": result.experts_trained_mean,
        "experts-uploaded": int(uploaded.sum()),
        **({"peak-mem-bytes": result.peak_mem_bytes} if result.peak_mem_bytes is not None else {}),
        "mem-budget-bytes": mem_budget_bytes or 0,
        "over-budget": int(bool(mem_budget_bytes) and result.peak_mem_bytes > mem_budget_bytes),
        "local-steps": result.steps,
        "wall-s": result.wall_s,
        "select-s": result.select_s,
    })
    release_device_memory(device)
    # What the client still holds once its round is over (the model; on CUDA, tensors only):
    # flat round after round, or something leaks.
    metrics["resident-after-bytes"] = resident_bytes(device)
    return ClientUpload(
        tensors={k: v for k, v in state.items() if k in keep},
        usage=result.usage, importance=result.importance, selection_counts=result.selection_counts,
        metrics=metrics, result=result, activation=result.activation,
    )
