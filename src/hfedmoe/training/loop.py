"""One client's local training round: route -> score -> select -> masked backward -> step.

Per mini-batch (Algorithm 1 of the paper):
1. forward with the model's own top-k routing, recording router probabilities;
2. pool token probabilities into per-sample gates G_e(x_i)          (core.pool_token_scores)
3. score the experts: I_b = s_b - beta * KL                           (core.ib_score, Eq. 3-14)
4. select the best experts within the client's budget, covering
   every MoE layer, among the experts that received tokens          (core.select_experts, Eq. 15)
5. backward only into the selected experts (plus routers and dense
   parameters) and step.
Across the round it accumulates the client's usage u_c (Eq. 16) and its mean
importance s^c, which the server needs for the gate weights (Eq. 18-20).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from hfedmoe import core
from hfedmoe.moe import MoEAccess, make_access
from hfedmoe.moe.slice_adamw import ExpertSliceAdamW
from hfedmoe.training.device import model_device, to_device
from hfedmoe.training.memory import PeakMemory, memtrace, weight_bytes
from hfedmoe.training.objectives import objective_for
from hfedmoe.training.selection import BatchRouting, SelectionPolicy, score_policy


@dataclass
class LocalTrainConfig:
    """Hyper-parameters of a client's local round (the paper's defaults)."""

    local_steps: int = 10
    lr: float = 1e-4
    new_param_lr_mult: float = 10.0  # router + task head start from scratch
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    lam: float = 0.9
    beta: float = 0.1
    pooling: str = "mean"
    select_by: str = "ib"  # "ib" (Eq. 15) or "importance" (the paper's text: s_b)
    aux_loss_coef: float = 0.01
    deferred_backward: bool = True  # constrained clients: backward only through selected experts
    unselected_experts: str = "freeze"  # "freeze" | "detach": see MoEAccess.enable_deferred_backward
    time_budget_s: float | None = None  # compute budget: stop the local round after this long (>= 1 step)
    task: str = "classification"  # the batch loss (hfedmoe.training.objectives)
    # The round's exact peak memory on the CPU (PeakMemory's clean baseline: ~15% of a local
    # round). Off: on the CPU the result's peak_mem_bytes is None; on CUDA it is measured anyway.
    measure_memory: bool = True


# on_phase(phase, step, batch, selected): see train_local.
PhaseHook = Callable[[str, int, "dict[str, torch.Tensor] | None", "torch.Tensor | None"], None]


@dataclass
class LocalTrainResult:
    """What a client learned about its experts during one local round."""

    num_samples: int
    steps: int
    train_loss: float
    usage: torch.Tensor  # u_c, Tensor[L, S] (Eq. 16)
    importance: torch.Tensor  # s^c, mean of s_b over the round's batches, Tensor[L, S]
    trained: torch.Tensor  # BoolTensor[L, S]: selected in at least one batch
    selection_counts: torch.Tensor  # Tensor[L, S]: batches in which each expert was selected
    activation: torch.Tensor  # Tensor[L, S]: share of the round's routed tokens each expert processed
    experts_trained_mean: float  # mean |E_active| per batch
    # Training memory: weights + what local training added at its peak; None where it was
    # not measured (on the CPU without LocalTrainConfig.measure_memory)
    peak_mem_bytes: int | None
    wall_s: float
    select_s: float  # time spent pooling, scoring and selecting (the method's own overhead)
    extra: dict = field(default_factory=dict)


def make_optimizer(model: nn.Module, access: MoEAccess, cfg: LocalTrainConfig,
                   extra_params: list[torch.Tensor] = ()) -> torch.optim.Optimizer:
    """AdamW with a larger learning rate for parameters that start untrained.

    Built fresh every round: clients are stateless between rounds (as in FedAvg),
    so optimizer moments never carry over from one global model to the next.
    ``extra_params`` (a method's own scalars outside the model, e.g. FLAME's rescaler)
    get the new-parameter learning rate and no weight decay (they scale outputs around 1).
    """
    new = access.new_parameter_names()
    pretrained = [p for n, p in model.named_parameters() if n not in new]
    fresh = [p for n, p in model.named_parameters() if n in new]
    groups = [{"params": pretrained, "lr": cfg.lr}, {"params": fresh, "lr": cfg.lr * cfg.new_param_lr_mult}]
    if extra_params:
        groups.append({"params": list(extra_params), "lr": cfg.lr * cfg.new_param_lr_mult, "weight_decay": 0.0})
    # Fused expert tensors (one [E, ...] parameter per layer): AdamW per expert slice,
    # so unselected experts are neither moved nor given moments (hfedmoe.moe.slice_adamw).
    adamw = ExpertSliceAdamW if access.optimizer_slices_experts else torch.optim.AdamW
    # The fused kernel (one pass per tensor instead of a dozen elementwise ops) is the
    # same AdamW update; on CPU it made the optimizer step about 5x faster (measured).
    # Parameters without a gradient (unselected experts) are skipped either way.
    try:
        return adamw(groups, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return adamw(groups, weight_decay=cfg.weight_decay)


def train_local(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    expert_budget: int,
    cfg: LocalTrainConfig,
    policy: SelectionPolicy | None = None,
    extra_loss: Callable[[MoEAccess, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    on_phase: PhaseHook | None = None,
    extra_params: list[torch.Tensor] = (),
) -> LocalTrainResult:
    """Run ``cfg.local_steps`` HFedMoE steps on a client's batches.

    Parameters
    ----------
    model : nn.Module
        The global model loaded into this client; trained in place.
    batches : iterator of dict
        Yields {"input_ids", "attention_mask", "labels", ...} in ``cfg.task``'s
        format (hfedmoe.training.objectives); must not run out before ``cfg.local_steps``
        batches (use an endless iterator).
    expert_budget : int
        C_budget: the most experts trained per mini-batch, summed over layers.
    cfg : LocalTrainConfig
    policy : SelectionPolicy, optional
        Which experts to train per batch; default HFedMoE's (``cfg.select_by``).
        Baselines plug in their own rules here.
    extra_loss : callable, optional
        ``extra_loss(access, batch)`` -> scalar added to the batch's loss after the
        forward pass (e.g. SEER-MoE's gate-entropy penalty); None adds nothing.
    on_phase : callable, optional
        ``on_phase(phase, step, batch, selected)`` at the end of each phase of a
        step: "start", "forward", "select", "backward", "clip", "optimizer", "zero"
        (``batch`` is None at "start", ``selected`` None before "select"). For
        benchmarks that time the loop's phases (benchmarks/step_breakdown.py);
        None costs nothing.
    extra_params : list of Tensor
        Leaf tensors outside the model that the round trains too (a method's own, e.g.
        FLAME's rescaler); they are optimised with the selected experts.

    Returns
    -------
    LocalTrainResult
    """
    access = make_access(model)
    if expert_budget < access.num_layers:
        raise ValueError(
            f"expert budget {expert_budget} is below one expert per MoE layer: "
            f"the minimum budget is {access.num_layers}"
        )
    policy = policy or score_policy(cfg.select_by)
    objective = objective_for(cfg.task)
    optimizer = make_optimizer(model, access, cfg, extra_params)
    # A client that can train every expert keeps plain autograd; a constrained one
    # skips the unselected experts' backward and activation memory entirely.
    deferred = cfg.deferred_backward and expert_budget < access.num_layers * access.num_experts
    deferred = access.enable_deferred_backward(deferred, cfg.unselected_experts) and deferred
    model.train()
    device = model_device(model)
    shape = (access.num_layers, access.num_experts)
    # Scoring and selection run on the host: the selection decides in Python which
    # tensors the backward reaches, so it must come back anyway, and its inputs are
    # small (pooled gates [B, L, S]). The loss stays on the device, read once at the end.
    gate_sums = torch.zeros(shape, dtype=torch.float64)
    importance_sum = torch.zeros(shape, dtype=torch.float64)
    selection_counts = torch.zeros(shape, dtype=torch.long)
    # Tokens each expert processed / tokens routed, per layer (on the device: read once at the end)
    dispatched = torch.zeros(shape, dtype=torch.float64, device=device)
    routed_tokens = torch.zeros((access.num_layers, 1), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_samples, routed_rows = 0, 0
    select_s = 0.0
    step_times: list[float] = []
    start = time.perf_counter()
    memtrace("train-local-start", budget=expert_budget)
    try:
        # On CUDA the allocator's counters measure the peak at no cost; on the CPU an exact
        # peak costs a clean baseline (PeakMemory), so only where asked for.
        measured = cfg.measure_memory or device.type == "cuda"
        with (PeakMemory(device, collect=cfg.measure_memory) if measured else contextlib.nullcontext()) as peak:
            memtrace("peak-enter", start_rss=peak.start_rss / 1e6 if peak else None)
            for step in range(cfg.local_steps):
                if cfg.time_budget_s is not None and step > 0 and time.perf_counter() - start > cfg.time_budget_s:
                    break  # compute budget spent: the round ends early, with what it trained
                t_step = time.perf_counter()
                if on_phase:
                    on_phase("start", step, None, None)
                batch = to_device(next(batches), device)
                # mask: the [rows, T] tokens the routing was recorded over (a
                # multiple-choice example is K rows, one per choice).
                loss, mask = objective.loss(model, batch)
                aux = access.aux_loss() if cfg.aux_loss_coef else None
                total = loss + cfg.aux_loss_coef * aux if aux is not None else loss
                if extra_loss is not None:
                    total = total + extra_loss(access, batch)
                if on_phase:
                    on_phase("forward", step, batch, None)

                t_select = time.perf_counter()
                gates = core.pool_token_scores(access.router_probs(), mask, mode=cfg.pooling)  # [B, L, S]
                real_tokens = mask.bool()[..., None] if mask.dim() == 3 else mask.bool()[:, :, None, None]
                routed = access.dispatch() & real_tokens  # [B, T, L, S]
                candidates = routed.any(dim=1).any(dim=0)  # E_union, [L, S]
                dispatched += routed.sum(dim=(0, 1))
                routed_tokens += real_tokens.expand(*routed.shape[:3], 1).sum(dim=(0, 1))
                gates, candidates = gates.cpu(), candidates.cpu()  # the step's one host round trip
                s_b = core.importance(gates, lam=cfg.lam)
                i_b = core.ib_score(gates, lam=cfg.lam, beta=cfg.beta)
                selected = policy(BatchRouting(gates, candidates, s_b, i_b, expert_budget, step))
                select_s += time.perf_counter() - t_select
                if on_phase:
                    on_phase("select", step, batch, selected)

                params = access.trainable_parameters(selected) + list(extra_params)
                access.set_selection(selected)
                total.backward(inputs=params)
                if on_phase:
                    on_phase("backward", step, batch, selected)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if on_phase:
                    on_phase("clip", step, batch, selected)
                with access.freeze_unselected(selected, optimizer):
                    optimizer.step()
                if on_phase:
                    on_phase("optimizer", step, batch, selected)
                optimizer.zero_grad(set_to_none=True)
                # Experts outside this batch's selection hold no optimizer state: a
                # constrained client's memory is bounded by its budget, not by the union
                # of every expert it trained this round (their moments restart instead).
                for param in access.unselected_expert_parameters(selected):
                    optimizer.state.pop(param, None)
                if on_phase:
                    on_phase("zero", step, batch, selected)

                gate_sums += gates.sum(dim=0).double()
                importance_sum += s_b.double()
                selection_counts += selected.long()
                examples = len(batch["input_ids"])
                loss_sum += loss.detach().double() * examples
                num_samples += examples
                routed_rows += len(mask)
                step_times.append(time.perf_counter() - t_step)
                memtrace("step", step=step)
    finally:  # also after an out-of-memory error: the next round starts clean
        access.enable_deferred_backward(False)
        # A step that failed mid-backward or mid-step leaves gradients on the parameters:
        # memory still held, and the next round's first backward would add to them.
        model.zero_grad(set_to_none=True)
    steps = len(step_times)
    return LocalTrainResult(
        num_samples=num_samples,
        steps=steps,
        train_loss=float(loss_sum) / max(num_samples, 1),
        usage=core.expert_usage(gate_sums, routed_rows).float(),
        importance=(importance_sum / steps).float(),
        trained=selection_counts > 0,
        selection_counts=selection_counts,
        activation=(dispatched / routed_tokens.clamp_min(1)).float().cpu(),
        experts_trained_mean=float(selection_counts.sum()) / steps,
        peak_mem_bytes=weight_bytes(model) + peak.added_bytes if peak else None,
        wall_s=time.perf_counter() - start,
        select_s=select_s,
        # The first step also allocates optimizer state and warms caches.
        extra={"step_s": statistics.median(step_times[1:] or step_times),
               "peak_rss_bytes": peak.peak_rss if peak else None},
    )


def set_torch_threads() -> None:
    """Use the cores this process was given (Ray sets OMP_NUM_THREADS for actors)."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or os.cpu_count() or 1
    torch.set_num_threads(max(1, threads))
