"""Every federated method as a policy over the same runtime (issue #6).

A method differs from HFedMoE only in four places, so each is one row of
:data:`METHODS`:

- **selection**: which experts a client trains on each mini-batch (a
  :data:`~hfedmoe.train.SelectionPolicy`, built per client and round);
- **upload**: which trained experts it sends back;
- **aggregation**: how the server merges experts and routers
  (:class:`~hfedmoe.fl.strategy.HFedMoE` with ``expert_agg`` / ``gate_agg``);
- **budget handling**: whether the client's expert budget is enforced, ignored
  (the unconstrained reference) or fails the round when full fine-tuning does
  not fit (FedAvg's "training failure").

Some baselines look at how the client's data routes before training: PFL-MoE ranks
experts by the current router's top-k hits on the round's first batches; FedMoE
and SEER-MoE profile once, on the *initial* global model and a fixed set of the
client's batches, and keep that subset for the whole run. Clients hold no state
between rounds, so that one-time profile is recomputed deterministically whenever
a process lacks it (see :func:`initial_profile`). docs/baselines.md states what
each implementation keeps from its paper and what it simplifies.

Everything here except :func:`plan_round` is a pure function of routing
statistics, so the unit tests drive it with hand-built tensors.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hfedmoe import core
from hfedmoe.train import BatchRouting, LocalTrainResult, SelectionPolicy, hfedmoe_policy

# Batches of a client's data the profiling passes look at (forward only, no grad).
PROFILE_BATCHES = 4
# FedMoE: share of the budget its sub-model search may fill (Mei et al. keep memory
# headroom with alpha <= 1 and give no value; 0.8 is our choice, baselines.md).
FEDMOE_BUDGET_SHARE = 0.8
# SEER-MoE: share of all experts pruned by heavy-hitter counting, and weight of the
# gate-entropy penalty (neither value is in the abstract; baselines.md).
SEER_PRUNE_RATIO = 0.25
SEER_ENTROPY_COEF = 0.01

EXPERT_AGGREGATIONS = ("hfedmoe", "fedavg")
GATE_AGGREGATIONS = ("hfedmoe", "fedavg")


@dataclass(frozen=True)
class MethodSpec:
    """One method as a policy over the shared runtime.

    Attributes
    ----------
    selection : str
        "hfedmoe" (I_b / s_b per batch, Eq. 15), "all" (every expert), "preferred"
        (PFL-MoE), "submodel" (FedMoE), "heavy-hitters" (SEER-MoE) or "random".
    upload : str
        "used" (trained and u_c >= tau, HFedMoE's rule), "trained" (every expert
        trained in some batch) or "all" (the whole model).
    expert_agg, gate_agg : str or None
        Aggregation of experts / routers; None = the run's ``--expert-agg`` /
        ``--gate-agg`` (HFedMoE and its ablations).
    budget : str
        "enforce", "ignore" (train every expert whatever the budget) or
        "full-or-fail" (train every expert, or fail the round if the budget is short).
    mask_routing : bool
        Experts outside the client's fixed subset are removed from its routing
        (router logit -inf), as if the client held a pruned sub-model.
    entropy_coef : float
        Weight of the gate-entropy penalty added to the local loss.
    """

    name: str
    summary: str
    selection: str
    upload: str
    expert_agg: str | None
    gate_agg: str | None
    budget: str
    mask_routing: bool = False
    entropy_coef: float = 0.0


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("hfedmoe", "HFedMoE: I_b selection per batch, sparse upload, Eq. 17-21",
                   selection="hfedmoe", upload="used", expert_agg=None, gate_agg=None, budget="enforce"),
        MethodSpec("fedavg-full", "FedAvg, every client trains and uploads every expert, budgets ignored",
                   selection="all", upload="all", expert_agg="fedavg", gate_agg="fedavg", budget="ignore"),
        MethodSpec("fedavg", "FedAvg under budgets: a client that cannot train every expert fails the round",
                   selection="all", upload="all", expert_agg="fedavg", gate_agg="fedavg", budget="full-or-fail"),
        MethodSpec("pfl-moe", "PFL-MoE: the experts the client's router prefers, plain FedAvg",
                   selection="preferred", upload="trained", expert_agg="hfedmoe", gate_agg="fedavg",
                   budget="enforce"),
        MethodSpec("fedmoe", "FedMoE: fixed sub-model from activation frequency, modular aggregation",
                   selection="submodel", upload="trained", expert_agg="hfedmoe", gate_agg="fedavg",
                   budget="enforce", mask_routing=True),
        MethodSpec("seer-moe", "SEER-MoE: heavy-hitter pruning, fine-tuning with gate-entropy penalty",
                   selection="heavy-hitters", upload="trained", expert_agg="hfedmoe", gate_agg="fedavg",
                   budget="enforce", mask_routing=True, entropy_coef=SEER_ENTROPY_COEF),
        MethodSpec("random", "random experts within the budget (HFedMoE's upload and aggregation)",
                   selection="random", upload="used", expert_agg=None, gate_agg=None, budget="enforce"),
    )
}


def method_spec(name: str) -> MethodSpec:
    """The row of :data:`METHODS` for ``name`` (ValueError naming the choices)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def method_aggregation(method: str, expert_agg: str = "hfedmoe", gate_agg: str = "hfedmoe") -> tuple[str, str]:
    """(expert_agg, gate_agg) the server uses for ``method``.

    HFedMoE and ``random`` take the run's ablation switches; every other method
    has its own aggregation.
    """
    spec = method_spec(method)
    return spec.expert_agg or expert_agg, spec.gate_agg or gate_agg


# --- selection policies: pure functions of one batch's routing ----------------------------

def all_experts_policy() -> SelectionPolicy:
    """Full fine-tuning: every expert of every layer, whether it received tokens or not."""

    def select(routing: BatchRouting) -> torch.Tensor:
        return torch.ones_like(routing.candidates)

    return select


def fixed_subset_policy(subset: torch.Tensor) -> SelectionPolicy:
    """Train the experts of a fixed ``subset`` (BoolTensor[L, S]) that received tokens.

    An expert of the subset that no token of the batch reached would get no
    gradient; counting it as trained would only make it upload an unchanged copy.
    """

    def select(routing: BatchRouting) -> torch.Tensor:
        return subset & routing.candidates

    return select


def random_policy(generator: torch.Generator) -> SelectionPolicy:
    """Random experts among the batch's candidates, one per layer first, up to the budget."""

    def select(routing: BatchRouting) -> torch.Tensor:
        scores = torch.rand(routing.candidates.shape, generator=generator, dtype=torch.float64)
        return core.select_experts(scores, routing.candidates, routing.budget)

    return select


# --- per-client subsets from routing statistics ------------------------------------------

def preferred_experts(hits: torch.Tensor, budget: int) -> torch.Tensor:
    """PFL-MoE's subset: the experts the client's router sends most tokens to.

    Parameters
    ----------
    hits : Tensor[L, S]
        Top-k dispatch counts over real tokens.
    budget : int
        C_budget; the subset holds min(budget, L * S) experts, at least one per layer
        (the most-hit expert of each layer), ties to the lower index.

    Returns
    -------
    BoolTensor[L, S]
    """
    return core.select_experts(hits.double(), torch.ones_like(hits, dtype=torch.bool), budget)


def fedmoe_submodel(frequency: torch.Tensor, max_experts: int, iterations: int = 40) -> torch.Tensor:
    """FedMoE's sub-model search (Mei et al. 2024), with an expert count for memory.

    Finds the largest coverage threshold theta such that the smallest sub-model
    holding, in every layer, experts whose activation frequencies add up to at
    least theta has at most ``max_experts`` experts (binary search on theta, as the
    paper does); returns that sub-model. Every layer keeps at least one expert.

    Parameters
    ----------
    frequency : Tensor[L, S]
        Activation counts or frequencies p_ij >= 0 (normalised per layer here; a
        layer with no activations counts as uniform).
    max_experts : int
        The most experts the sub-model may hold, >= L.
    iterations : int
        Bisection steps on theta.

    Returns
    -------
    BoolTensor[L, S]
    """
    num_layers, num_experts = frequency.shape
    if max_experts < num_layers:
        raise ValueError(f"a sub-model of {max_experts} experts cannot cover {num_layers} layers")
    p = frequency.double()
    totals = p.sum(dim=1, keepdim=True)
    p = torch.where(totals > 0, p / totals.clamp_min(1e-300), torch.full_like(p, 1.0 / num_experts))
    sorted_p, order = torch.sort(p, dim=1, descending=True, stable=True)
    cumulative = sorted_p.cumsum(dim=1)

    def needed(theta: float) -> torch.Tensor:
        # experts per layer until the cumulative frequency reaches theta (>= 1 each)
        return ((cumulative < theta - 1e-12).sum(dim=1) + 1).clamp(max=num_experts)

    if int(needed(1.0).sum()) <= max_experts:
        theta = 1.0
    else:
        low, high = 0.0, 1.0  # needed(0) = one per layer always fits
        for _ in range(iterations):
            mid = (low + high) / 2
            low, high = (mid, high) if int(needed(mid).sum()) <= max_experts else (low, mid)
        theta = low
    keep = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    for layer, count in enumerate(needed(theta).tolist()):
        keep[layer, order[layer, :count]] = True
    return keep


def fedmoe_max_experts(budget: int, num_layers: int, share: float = FEDMOE_BUDGET_SHARE) -> int:
    """floor(share * C_budget), never below one expert per layer."""
    return max(num_layers, math.floor(share * budget))


def heavy_hitters(soft_counts: torch.Tensor, keep: int) -> torch.Tensor:
    """SEER-MoE's surviving experts: the ``keep`` largest soft counts over all layers.

    Soft count S_{l,e} = sum over tokens of the router probability of e. The
    ranking is global across (layer, expert), which SEER-MoE reports works better
    than a uniform per-layer cut; every layer keeps at least its heaviest expert.
    """
    return core.select_experts(soft_counts.double(), torch.ones_like(soft_counts, dtype=torch.bool), keep)


def seer_keep_count(budget: int, num_layers: int, num_experts: int, prune_ratio: float = SEER_PRUNE_RATIO) -> int:
    """Experts a SEER-MoE client keeps: (1 - prune_ratio) of all, capped by its budget."""
    return max(num_layers, min(budget, math.ceil((1.0 - prune_ratio) * num_layers * num_experts)))


# --- routing statistics of a forward-only pass --------------------------------------------

@dataclass
class RouteCounts:
    """How a client's batches route through a model, over real (non-padding) tokens."""

    hits: torch.Tensor  # Tensor[L, S]: tokens dispatched to each expert (top-k)
    soft: torch.Tensor  # Tensor[L, S]: summed router probabilities
    tokens: int


@torch.no_grad()
def route_counts(access, batches: Iterable[dict[str, torch.Tensor]]) -> RouteCounts:
    """Forward ``batches`` through ``access.model`` (eval mode) and count routing."""
    model = access.model
    was_training = model.training
    model.eval()
    hits = soft = None
    tokens = 0
    try:
        for batch in batches:
            mask = batch["attention_mask"]
            model(batch["input_ids"], mask)
            real = mask.bool()[:, :, None, None]  # [B, T, 1, 1]
            batch_hits = (access.dispatch() & real).sum(dim=(0, 1))
            batch_soft = (access.router_probs().double() * real).sum(dim=(0, 1))
            hits = batch_hits if hits is None else hits + batch_hits
            soft = batch_soft if soft is None else soft + batch_soft
            tokens += int(mask.sum())
    finally:
        model.train(was_training)
    if hits is None:
        raise ValueError("no batch to profile: the client's partition is empty")
    return RouteCounts(hits=hits.long(), soft=soft, tokens=tokens)


def profile_batches(data, num_batches: int = PROFILE_BATCHES) -> Iterator[dict[str, torch.Tensor]]:
    """The client's fixed profiling batches: the first batches of its epoch 0."""
    return itertools.islice(data.batches.iter_epoch(0), num_batches)


# Profiles of the initial model, per (run, partition): computed once per process.
_INITIAL_PROFILES: OrderedDict[tuple[str, int], RouteCounts] = OrderedDict()
_MAX_CACHED = 256


def initial_profile(cfg, access, data, server_round: int,
                    build_initial: Callable[[], nn.Module] | None = None) -> RouteCounts:
    """Routing of the client's profiling batches through the run's *initial* model.

    The first round's global model is the initial model, so round 1 profiles the
    model the client just loaded. A process that meets the client later without
    the profile (a restarted worker, another node) rebuilds the initial model from
    the run config (deterministic in the seed) and gets the same counts, so the
    client's subset stays fixed for the whole run without any client state.
    """
    key = (cfg.to_json(), data.partition_id)
    if key in _INITIAL_PROFILES:
        _INITIAL_PROFILES.move_to_end(key)
        return _INITIAL_PROFILES[key]
    if server_round == 1:
        counts = route_counts(access, profile_batches(data))
    else:
        from hfedmoe.moe import make_access

        if build_initial is None:
            from hfedmoe.task import build_model

            def build_initial() -> nn.Module:
                return build_model(cfg, pretrained=True)

        initial = build_initial()
        counts = route_counts(make_access(initial), profile_batches(data))
        del initial
    _INITIAL_PROFILES[key] = counts
    while len(_INITIAL_PROFILES) > _MAX_CACHED:
        _INITIAL_PROFILES.popitem(last=False)
    return counts


# --- router hooks: routing mask and live router logits ------------------------------------

class RouterHooks:
    """Forward hooks on every MoE layer's router, while the context is open.

    - ``mask`` (BoolTensor[L, S]): experts outside it get router logit -inf, so
      no token is routed to them (a pruned sub-model) and their probability is 0.
    - ``capture``: keep each layer's (masked) router logits *with* gradient, for a
      loss on the gate distribution (:meth:`entropy`). The MoE block itself only
      records detached probabilities.

    Works on layouts with separate ``MoEFeedForward`` blocks (the embedded model),
    whose router is a plain linear layer returning logits.
    """

    def __init__(self, access, mask: torch.Tensor | None = None, capture: bool = False):
        routers = access.router_modules()
        if routers is None:
            raise NotImplementedError(
                f"{type(access).__name__}: routing masks and gate-entropy losses need separate-expert MoE blocks "
                "(the embedded model); fused Hugging Face layouts are not supported for fedmoe/seer-moe yet"
            )
        self.routers = list(routers)
        self.mask = mask
        self.capture = capture
        self.logits: list[torch.Tensor | None] = [None] * len(self.routers)
        self._handles: list = []

    def __enter__(self) -> "RouterHooks":
        for index, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.logits = [None] * len(self.routers)

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
            if self.mask is not None:
                keep = self.mask[index].to(output.device)
                output = output.masked_fill(~keep, float("-inf"))
            if self.capture:
                self.logits[index] = output
            return output if self.mask is not None else None

        return hook

    def entropy(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over layers and real tokens of H(p) = -sum_e p_e log p_e (with gradient).

        p is the softmax of the (masked) router logits, so with a mask the entropy
        is over the surviving experts only (pruned experts have p = 0).
        """
        if any(logits is None for logits in self.logits):
            raise RuntimeError("no router logits captured: open RouterHooks(capture=True) and run a forward pass")
        real = attention_mask.reshape(-1).bool()
        per_layer = []
        for logits in self.logits:
            # Removed experts have logit -inf; a finite floor gives them p = 0 with a
            # zero gradient (the derivative of p log p is infinite at p = 0: NaN otherwise).
            log_probs = torch.log_softmax(logits.float().clamp(min=-1e4), dim=-1)
            entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
            per_layer.append(entropy[real].mean())
        return torch.stack(per_layer).mean()


# --- one client's round -------------------------------------------------------------------

@dataclass
class RoundPlan:
    """What one client does this round under its method.

    ``failure`` set: the client does not train (FedAvg whose budget cannot hold
    full fine-tuning) and reports that reason instead of an update.
    """

    method: MethodSpec
    policy: SelectionPolicy | None
    train_budget: int
    failure: str | None = None
    subset: torch.Tensor | None = None  # the client's fixed/preferred experts, if any
    routing_mask: torch.Tensor | None = None

    @contextlib.contextmanager
    def hooks(self, access) -> Iterator[Callable | None]:
        """Install the method's router hooks; yields the ``extra_loss`` for train_local."""
        if self.routing_mask is None and not self.method.entropy_coef:
            yield None
            return
        capture = bool(self.method.entropy_coef)
        with RouterHooks(access, mask=self.routing_mask, capture=capture) as router_hooks:
            coef = self.method.entropy_coef

            def entropy_penalty(_access, batch: dict[str, torch.Tensor]) -> torch.Tensor:
                return coef * router_hooks.entropy(batch["attention_mask"])

            yield entropy_penalty if capture else None

    def upload_mask(self, result: LocalTrainResult, tau: float) -> torch.Tensor:
        """BoolTensor[L, S]: the experts this client uploads."""
        if self.method.upload == "all":
            return torch.ones_like(result.trained)
        if self.method.upload == "trained":
            return result.trained.clone()
        # HFedMoE: experts it really used, trained in some batch and with u_c >= tau (Eq. 18's S_c)
        return result.trained & (result.usage >= tau)


def plan_round(cfg, access, data, expert_budget: int, server_round: int) -> RoundPlan:
    """The round plan of ``cfg.method`` for one client (the global model is loaded).

    Parameters
    ----------
    cfg : RunConfig
    access : MoEAccess
        The client's model, holding this round's global state.
    data : ClientData
    expert_budget : int
        The client's C_budget.
    server_round : int
    """
    spec = method_spec(cfg.method)
    num_layers, num_experts = access.num_layers, access.num_experts
    total = num_layers * num_experts
    if spec.budget == "ignore":
        return RoundPlan(spec, all_experts_policy(), train_budget=total)
    if spec.budget == "full-or-fail":
        if expert_budget < total:
            return RoundPlan(spec, None, train_budget=expert_budget, failure=(
                f"training failure: full fine-tuning trains all {total} experts, the budget allows {expert_budget}"))
        return RoundPlan(spec, all_experts_policy(), train_budget=total)

    if spec.selection == "hfedmoe":
        return RoundPlan(spec, hfedmoe_policy(cfg.select_by), expert_budget)
    if spec.selection == "random":
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + server_round * 1_009 + data.partition_id)
        return RoundPlan(spec, random_policy(generator), expert_budget)
    if spec.selection == "preferred":
        # The current router's preference on this round's first batches (what it
        # is about to train on): re-derived every round as the router changes.
        from hfedmoe.client import batches_from_round

        first = itertools.islice(batches_from_round(data, server_round, cfg.local_steps),
                                 min(PROFILE_BATCHES, cfg.local_steps))
        subset = preferred_experts(route_counts(access, first).hits, expert_budget)
        return RoundPlan(spec, fixed_subset_policy(subset), expert_budget, subset=subset)
    profile = initial_profile(cfg, access, data, server_round)
    if spec.selection == "submodel":
        subset = fedmoe_submodel(profile.hits, fedmoe_max_experts(expert_budget, num_layers))
    elif spec.selection == "heavy-hitters":
        subset = heavy_hitters(profile.soft, seer_keep_count(expert_budget, num_layers, num_experts))
    else:
        raise ValueError(f"method {spec.name!r} has an unknown selection rule {spec.selection!r}")
    return RoundPlan(spec, fixed_subset_policy(subset), expert_budget, subset=subset,
                     routing_mask=subset if spec.mask_routing else None)
