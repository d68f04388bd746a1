"""The federated methods (hfedmoe.methods: one file each, one registry) and the strategy's
aggregation variants.

Pure policy functions are checked on hand-built routing; the per-round plans run
on a tiny upcycled BERT (2 MoE layers x 4 experts), so the whole file takes seconds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hfedmoe import core
from hfedmoe.client_round import ClientUpload, client_round
from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.data import TensorBatches
from hfedmoe.fl.records import ReceivedUpload
from hfedmoe.fl.strategy import HFedMoE
from hfedmoe.methods import EXPERT_MERGES, METHODS, ROUTER_WEIGHTS, get_method, merge_names, server_merges
from hfedmoe.methods import base, profiling, registry
from hfedmoe.methods.base import ClientContext, Method
from hfedmoe.methods.fedmoe import fedmoe_max_experts, fedmoe_submodel
from hfedmoe.methods.pfl_moe import preferred_experts
from hfedmoe.methods.random_experts import random_policy
from hfedmoe.methods.seer_moe import heavy_hitters, seer_keep_count
from hfedmoe.moe.modular import ModularMoEAccess
from hfedmoe.recipe import ClientData
from hfedmoe.training import BatchRouting, LocalTrainConfig, train_local

from builders import K, L, LABELS, S, VOCAB, tiny_moe


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: one thread is fastest


def routing(candidates: torch.Tensor, budget: int, seed: int = 0) -> BatchRouting:
    g = torch.Generator().manual_seed(seed)
    gates = torch.softmax(torch.randn(5, *candidates.shape, generator=g), dim=-1)
    return BatchRouting(gates, candidates, core.importance(gates), core.ib_score(gates), budget, step=0)


def client_data(partition_id: int = 0, n: int = 24, t: int = 10) -> ClientData:
    g = torch.Generator().manual_seed(100 + partition_id)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, LABELS, (n,), generator=g)
    batches = TensorBatches(ids * mask, mask, labels, batch_size=6, shuffle=True, seed=partition_id)
    return ClientData(partition_id, batches, [int((labels == c).sum()) for c in range(LABELS)])


def run_config(method: str, **kw) -> RunConfig:
    return RunConfig(method=method, clients=2, local_steps=3, lr=1e-3, num_experts=S, top_k=K, **kw)


def context(method: str, access, budget: int, server_round: int) -> ClientContext:
    cfg = run_config(method)
    return ClientContext(access=access, data=client_data(), expert_budget=budget, server_round=server_round,
                         local_steps=cfg.local_steps, seed=cfg.seed, select_by=cfg.select_by, run_key=cfg.to_json(),
                         build_initial_model=tiny_moe)


# --- the method table ----------------------------------------------------------------------

def test_the_registry_holds_the_eight_methods_each_loading_its_own_class():
    assert list(METHODS) == ["hfedmoe", "fedavg-full", "fedavg", "pfl-moe", "fedmoe", "seer-moe", "flame", "random"]
    for name, entry in METHODS.items():
        method = get_method(name)
        assert isinstance(method, Method) and entry.summary and get_method(name) is method
        assert f"{type(method).__module__}:{type(method).__name__}" == entry.location
        assert method.expert_merge in [registry.load(where) for where in EXPERT_MERGES.values()]
        assert method.router_weights in [registry.load(where) for where in ROUTER_WEIGHTS.values()]
        RunConfig(method=name).validate()
    assert [name for name, entry in METHODS.items() if entry.ablation_switches] == ["hfedmoe", "random"]


def test_config_and_help_read_the_registry_without_importing_a_method():
    """--help and a config error must not pay for torch: the registry is metadata until used."""
    code = ("import sys; from hfedmoe.config import RunConfig; from hfedmoe.cli import build_parser; "
            "RunConfig(method='fedmoe').validate(); build_parser().format_help(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('hfedmoe.methods.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['hfedmoe.methods.registry']"


def merges(method: str) -> dict:
    expert_merge, router_weights = server_merges(method)
    return {"expert_merge": expert_merge, "router_weights": router_weights}


def names(method, expert_agg="hfedmoe", gate_agg="hfedmoe"):
    return merge_names(*server_merges(method, expert_agg, gate_agg))


def test_aggregation_switches_apply_to_hfedmoe_only():
    assert names("hfedmoe", "fedavg", "hfedmoe") == ("fedavg", "hfedmoe")
    assert names("random", "hfedmoe", "fedavg") == ("hfedmoe", "fedavg")
    assert names("pfl-moe") == ("hfedmoe", "fedavg")
    assert names("fedavg-full") == ("fedavg", "fedavg")
    RunConfig(method="hfedmoe", expert_agg="fedavg", gate_agg="fedavg").validate()
    with pytest.raises(ConfigError, match="--method fedmoe has its own aggregation"):
        RunConfig(method="fedmoe", gate_agg="fedavg").validate()
    with pytest.raises(ConfigError, match="--expert-agg must be one of hfedmoe, fedavg"):
        RunConfig(expert_agg="mean").validate()
    with pytest.raises(ValueError, match="unknown method 'fedprox'"):
        get_method("fedprox")


# --- per-batch policies on hand-built routing ------------------------------------------------

def test_all_experts_policy_ignores_candidates_and_budget():
    candidates = torch.tensor([[True, False, False, False], [False, False, True, False]])
    assert base.all_experts_policy()(routing(candidates, budget=2)).all()


def test_fixed_subset_policy_trains_only_subset_experts_that_received_tokens():
    subset = torch.tensor([[True, True, False, False], [False, False, True, True]])
    candidates = torch.tensor([[True, False, True, False], [True, True, True, False]])
    got = base.fixed_subset_policy(subset)(routing(candidates, budget=8))
    assert torch.equal(got, torch.tensor([[True, False, False, False], [False, False, True, False]]))


def test_random_policy_stays_in_budget_covers_layers_and_is_seeded():
    candidates = torch.tensor([[True, True, True, False], [False, True, True, True]])
    for budget in (2, 3, 5, 8):
        picks = [random_policy(torch.Generator().manual_seed(7))(routing(candidates, budget))
                 for _ in range(2)]
        assert torch.equal(picks[0], picks[1]), "same seed, same choice"
        chosen = picks[0]
        assert int(chosen.sum()) == min(budget, int(candidates.sum()))
        assert not (chosen & ~candidates).any(), "only experts that received tokens"
        assert chosen.any(dim=1).all(), "one expert per layer at least"
    draws = {tuple(random_policy(torch.Generator().manual_seed(s))(routing(candidates, 3)).flatten().tolist())
             for s in range(20)}
    assert len(draws) > 1, "different seeds pick different experts"


# --- per-client subsets from routing statistics --------------------------------------------

def test_preferred_experts_one_per_layer_then_most_hit():
    hits = torch.tensor([[5, 0, 3, 1], [0, 0, 0, 9]])
    got = preferred_experts(hits, budget=3)
    assert got.nonzero().tolist() == [[0, 0], [0, 2], [1, 3]]
    # ties go to the lower index; a full budget keeps everything
    assert preferred_experts(torch.zeros(2, 4, dtype=torch.long), 2).nonzero().tolist() == [[0, 0], [1, 0]]
    assert preferred_experts(hits, budget=8).all()


@pytest.mark.parametrize("max_experts, expected", [
    (2, [[0, 0], [1, 0]]),  # theta <= 0.5: one expert per layer
    (4, [[0, 0], [0, 1], [1, 0], [1, 1]]),  # theta = 0.8: 0.5+0.3 and 0.7+0.1
    (5, [[0, 0], [0, 1], [1, 0], [1, 1]]),  # theta = 0.9 would need 6: the search keeps 0.8
    (6, [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]),  # theta = 0.9
    (8, [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2], [1, 3]]),  # theta = 1: the never-used (0,3) stays out
])
def test_fedmoe_submodel_is_the_largest_coverage_threshold_that_fits(max_experts, expected):
    frequency = torch.tensor([[5.0, 3.0, 2.0, 0.0], [7.0, 1.0, 1.0, 1.0]])
    assert fedmoe_submodel(frequency, max_experts).nonzero().tolist() == expected


def test_fedmoe_submodel_covers_every_layer_within_its_size():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        frequency = torch.randint(0, 20, (3, 6), generator=g).float()
        frequency[trial % 3] = 0  # a layer nobody routed to counts as uniform
        for max_experts in (3, 5, 9, 18):
            keep = fedmoe_submodel(frequency, max_experts)
            assert keep.any(dim=1).all() and int(keep.sum()) <= max_experts
            assert torch.equal(keep, fedmoe_submodel(frequency, max_experts))
    with pytest.raises(ValueError, match="cannot cover 3 layers"):
        fedmoe_submodel(torch.ones(3, 4), 2)
    assert fedmoe_max_experts(48, 6) == 38 and fedmoe_max_experts(6, 6) == 6


def test_heavy_hitters_rank_globally_after_keeping_one_per_layer():
    soft = torch.tensor([[10.0, 1.0, 1.0, 1.0], [2.0, 3.0, 0.0, 0.0]])
    assert heavy_hitters(soft, keep=3).nonzero().tolist() == [[0, 0], [1, 0], [1, 1]]
    assert seer_keep_count(48, 6, 8) == 36  # 25% of 48 pruned
    assert seer_keep_count(12, 6, 8) == 12  # the budget is smaller
    assert seer_keep_count(6, 6, 8, prune_ratio=0.99) == 6  # never below one per layer


# --- routing override: routing mask and gate entropy -------------------------------------------

def test_routing_mask_removes_experts_and_is_undone_on_exit():
    model = tiny_moe(sharp_router=True)
    access = ModularMoEAccess(model)
    batch = next(client_data().batches.iter_epoch(0))
    keep = torch.tensor([[True, False, True, False], [False, True, True, True]])
    with access.routing_override(mask=keep):
        model(batch["input_ids"], batch["attention_mask"])
        probs, dispatch = access.router_probs(), access.dispatch()
    assert (probs[..., ~keep] == 0).all(), "removed experts get probability 0"
    assert not dispatch[..., ~keep].any(), "no token goes to a removed expert (>= top_k kept per layer)"
    model(batch["input_ids"], batch["attention_mask"])
    assert (access.router_probs()[..., ~keep] > 0).any(), "the hook is gone after the context"


def test_gate_entropy_has_gradient_and_matches_its_definition():
    model = tiny_moe(sharp_router=True)
    access = ModularMoEAccess(model)
    batch = next(client_data().batches.iter_epoch(0))
    with access.routing_override() as hooks:
        model(batch["input_ids"], batch["attention_mask"])
        entropy = hooks.entropy(batch["attention_mask"])
        probs = access.router_probs()  # [B, T, L, S], detached
    real = batch["attention_mask"].bool()
    expected = torch.stack([torch.special.entr(probs[:, :, l][real]).sum(-1).mean() for l in range(L)]).mean()
    torch.testing.assert_close(entropy.detach(), expected)
    entropy.backward()
    assert all(layer.router.weight.grad is not None for layer in access.layers)


def test_train_local_adds_the_extra_loss_every_step():
    calls = []

    def extra(access, batch):
        calls.append(batch["input_ids"].shape[0])
        return torch.zeros((), requires_grad=True)

    cfg = LocalTrainConfig(local_steps=3, lr=1e-3)
    train_local(tiny_moe(sharp_router=True), client_data().batches.infinite(), L * S, cfg, extra_loss=extra)
    assert calls == [6, 6, 6]


# --- one client's round under each method ----------------------------------------------

@pytest.fixture(autouse=True)
def _fresh_profiles():
    profiling.clear_profile_cache()
    yield
    profiling.clear_profile_cache()


def _round(method: str, budget: int, server_round: int = 1, model=None, **kw):
    model = model or tiny_moe(sharp_router=True)
    access = ModularMoEAccess(model)
    state = {k: v.clone() for k, v in access.state_dict().items()}
    return client_round(run_config(method, **kw), access, client_data(), state, budget, server_round), access


@pytest.mark.parametrize("method", ["hfedmoe", "pfl-moe", "fedmoe", "seer-moe", "random"])
def test_budgeted_methods_stay_within_the_budget(method):
    reply, access = _round(method, budget=3)
    assert reply.failure is None
    counts = reply.result.selection_counts
    assert (counts.sum(dim=1) >= 0).all()
    assert reply.metrics["experts-trained-mean"] <= 3
    assert reply.metrics["expert-budget"] == 3
    groups = access.param_groups()
    uploaded = {groups.expert_of[k] for k in reply.tensors if k in groups.expert_of}
    trained = {tuple(x) for x in reply.result.trained.nonzero().tolist()}
    assert uploaded <= trained, "nobody uploads an expert it did not train"
    assert set(groups.dense) | set(groups.routers) <= set(reply.tensors)


def test_fedavg_full_trains_and_uploads_every_expert_whatever_the_budget():
    reply, access = _round("fedavg-full", budget=2)
    assert reply.failure is None
    assert reply.metrics["experts-trained-mean"] == L * S > reply.metrics["expert-budget"]
    assert set(access.param_groups().all_expert_keys) <= set(reply.tensors)


def test_fedavg_fails_a_client_whose_budget_cannot_hold_full_fine_tuning():
    reply, _ = _round("fedavg", budget=L * S - 1)
    assert reply.failure and "training failure" in reply.failure and reply.result is None and reply.tensors == {}
    assert reply.metrics["expert-budget"] == L * S - 1
    full, access = _round("fedavg", budget=L * S)
    assert full.failure is None and set(access.param_groups().all_expert_keys) <= set(full.tensors)


def test_fedmoe_trains_a_fixed_submodel_with_the_others_removed_from_routing():
    model = tiny_moe(sharp_router=True)
    first, access = _round("fedmoe", budget=5, model=model)
    plan = get_method("fedmoe").plan_round(context("fedmoe", access, 5, server_round=3))
    subset = plan.subset
    assert subset.any(dim=1).all() and int(subset.sum()) <= fedmoe_max_experts(5, L)
    assert not (first.result.trained & ~subset).any()
    assert (first.result.usage[~subset] == 0).all(), "removed experts receive no routing"
    # later rounds keep the round-1 subset; a process without it rebuilds the same from the initial model
    profiling.clear_profile_cache()
    rebuilt = profiling.initial_profile(access, client_data(), 3, run_config("fedmoe").to_json(),
                                        build_initial=lambda: tiny_moe(sharp_router=True))
    assert torch.equal(fedmoe_submodel(rebuilt.hits, fedmoe_max_experts(5, L)), subset)


def test_seer_moe_prunes_to_heavy_hitters_and_penalises_gate_entropy():
    reply, access = _round("seer-moe", budget=8)
    plan = get_method("seer-moe").plan_round(context("seer-moe", access, 8, server_round=2))
    assert int(plan.subset.sum()) == seer_keep_count(8, L, S) == 6
    assert torch.equal(plan.routing_mask, plan.subset)
    assert not (reply.result.trained & ~plan.subset).any()
    assert (reply.result.usage[~plan.subset] == 0).all()
    with plan.hooks(access) as extra_loss:
        assert extra_loss is not None
        batch = next(client_data().batches.iter_epoch(0))
        access.model(batch["input_ids"], batch["attention_mask"])
        assert extra_loss(access, batch).item() > 0


def test_pfl_moe_trains_the_experts_its_router_prefers():
    reply, access = _round("pfl-moe", budget=3)
    plan = get_method("pfl-moe").plan_round(context("pfl-moe", access, 3, server_round=1))
    assert int(plan.subset.sum()) == 3 and plan.subset.any(dim=1).all() and plan.routing_mask is None
    assert not (reply.result.trained & ~plan.subset).any()


# --- server: aggregation variants and training failures ------------------------------------

@pytest.fixture(scope="module")
def tiny_state():
    access = ModularMoEAccess(tiny_moe(sharp_router=True))
    return access.param_groups(), {k: v.clone() for k, v in access.state_dict().items()}


def _update(groups, state, node, n, experts, seed, usage_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    moved = {k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}
    keys = [k for le in experts for k in groups.experts[le]]
    tensors = {k: moved[k] for k in [*keys, *groups.routers, *groups.dense]}
    upload = ClientUpload(tensors=tensors, usage=torch.rand(L, S, generator=g) * usage_scale,
                          importance=torch.rand(L, S, generator=g), selection_counts=torch.ones(L, S, dtype=torch.long),
                          metrics={"num-examples": n, "partition-id": node})
    return ReceivedUpload(node_id=node, upload=upload, bytes_up=0, bytes_up_floor=0), moved


def test_expert_fedavg_counts_non_uploaders_with_the_global_copy(tiny_state):
    groups, state = tiny_state
    strategy = HFedMoE(groups, {1: 8, 2: 8}, "{}", **merges("fedavg-full"))
    strategy.set_global_state(state)
    a, a_state = _update(groups, state, 1, 30, [(0, 0)], seed=1)
    b, b_state = _update(groups, state, 2, 10, [(0, 0), (1, 1)], seed=2)
    new = strategy.aggregate([a, b])
    alpha = new.pop("__alpha__")
    torch.testing.assert_close(alpha, torch.tensor([0.75, 0.25], dtype=torch.float64))
    for k in groups.experts[(0, 0)]:  # both uploaded: as Eq. 17
        torch.testing.assert_close(new[k], 0.75 * a_state[k] + 0.25 * b_state[k])
    for k in groups.experts[(1, 1)]:  # only B: A counts with the unchanged global copy
        torch.testing.assert_close(new[k], 0.75 * state[k] + 0.25 * b_state[k])
    for k in groups.experts[(1, 2)]:  # nobody: unchanged
        torch.testing.assert_close(new[k], state[k])
    for k in groups.routers:  # plain num_examples-weighted FedAvg, not Eq. 18-21
        torch.testing.assert_close(new[k], 0.75 * a_state[k] + 0.25 * b_state[k])


def test_default_aggregation_is_unchanged_eq_17_and_eq_18_21(tiny_state):
    groups, state = tiny_state
    strategy = HFedMoE(groups, {1: 8, 2: 8}, "{}")
    strategy.set_global_state(state)
    a, a_state = _update(groups, state, 1, 30, [(0, 0)], seed=1)
    b, b_state = _update(groups, state, 2, 10, [(0, 0), (1, 1)], seed=2)
    new = strategy.aggregate([a, b])
    alpha = core.gate_weights(torch.stack([a.upload.usage, b.upload.usage]),
                              torch.stack([a.upload.importance, b.upload.importance]))
    torch.testing.assert_close(new.pop("__alpha__"), alpha)
    for k in groups.experts[(1, 1)]:
        torch.testing.assert_close(new[k], b_state[k])
    for k in groups.routers:
        torch.testing.assert_close(new[k], alpha[0] * a_state[k] + alpha[1] * b_state[k])


def test_strategy_records_a_training_failure_and_aggregates_the_others(tiny_state, monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    groups, state = tiny_state
    strategy = HFedMoE(groups, {1: L * S, 2: L}, "{}", **merges("fedavg"))
    messages = {m.metadata.dst_node_id: m
                for m in strategy.configure_train(1, ArrayRecord(state), ConfigRecord(), grid=object())}
    full = {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}
    ok = Message(RecordDict({
        "arrays": ArrayRecord(full),
        "stats": ArrayRecord({"usage": torch.full((L, S), 0.25), "importance": torch.full((L, S), 0.25),
                              "selection-counts": torch.ones(L, S, dtype=torch.long)}),
        "metrics": MetricRecord({"num-examples": 12, "partition-id": 0, "expert-budget": L * S,
                                 "experts-trained-mean": float(L * S)}),
    }), reply_to=messages[1])
    failed = Message(RecordDict({
        "failure": ConfigRecord({"reason": "training failure: budget 2 < 8"}),
        "metrics": MetricRecord({"num-examples": 9, "partition-id": 1, "expert-budget": L}),
    }), reply_to=messages[2])
    arrays, metrics = strategy.aggregate_train(1, [failed, ok])
    info = strategy.round_info[1]
    assert info["failures"] == [{"node_id": 2, "id": 1, "kind": "training-failure", "expert_budget": L,
                                 "reason": "training failure: budget 2 < 8"}]
    assert [c["id"] for c in info["clients"]] == [0]
    assert metrics["failures"] == 1 and metrics["clients"] == 1
    new = arrays.to_torch_state_dict()
    for k in groups.all_expert_keys[:3] + list(groups.routers):
        torch.testing.assert_close(new[k], full[k])
