"""Client sampling (--clients-per-round / fraction-train): seeded, the same across
methods and resumes, budgets by partition id, rows record participants, unsampled
clients get no message and are no failures, a returning client starts from the
current global model."""

from __future__ import annotations

import json

import pytest
import torch

import hfedmoe.fl.client_app as client_app_module
from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.fl.inprocess import run_inprocess
from hfedmoe.fl.strategy import HFedMoE

from builders import mixtral_config


def tiny(mixtral, out, **changes) -> RunConfig:
    """4 clients, 2 sampled per round, 3 rounds of one step."""
    return mixtral_config(mixtral, out, **{"clients": 4, "clients_per_round": 2, "rounds": 3, "local_steps": 1,
                                           **changes})


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- the sample itself (no torch) -----------------------------------------------------------

def test_participants_depend_only_on_seed_round_clients_and_k():
    cfg = RunConfig(clients=20, clients_per_round=5, seed=3)
    first = [cfg.round_participants(r) for r in range(1, 6)]
    assert all(len(p) == 5 and p == sorted(set(p)) and all(0 <= i < 20 for i in p) for p in first)
    assert len({tuple(p) for p in first}) > 1  # rounds differ
    # Method, aggregation and the other knobs do not enter the draw.
    other = RunConfig(clients=20, clients_per_round=5, seed=3, method="fedavg", lr=1e-3, local_steps=2)
    assert [other.round_participants(r) for r in range(1, 6)] == first
    assert RunConfig(clients=20, clients_per_round=5, seed=4).round_participants(1) != first[0] or \
        RunConfig(clients=20, clients_per_round=5, seed=4).round_participants(2) != first[1]


def test_k_zero_and_k_all_take_every_client():
    assert RunConfig(clients=6).round_participants(1) == list(range(6))
    assert RunConfig(clients=6, clients_per_round=6).round_participants(2) == list(range(6))
    assert RunConfig(clients=6, fraction_train=1.0).round_participants(2) == list(range(6))


def test_fraction_train_maps_to_k():
    cfg = RunConfig.from_flower_run_config({"num-clients": 10, "fraction-train": 0.25}).validate()
    assert cfg.participants_per_round() == 2  # max(1, round(2.5)) = 2 (round half to even)
    assert RunConfig(clients=10, fraction_train=0.01).participants_per_round() == 1  # at least one
    assert RunConfig(clients=50, fraction_train=0.2).participants_per_round() == 10
    # fraction-train 1.0 (Flower's default: all) leaves clients-per-round in charge.
    assert RunConfig(clients=10, clients_per_round=3, fraction_train=1.0).validate().participants_per_round() == 3


@pytest.mark.parametrize("changes, match", [
    (dict(clients=4, clients_per_round=5), r"--clients-per-round must be an integer in \[0, --clients 4\].*lower it"),
    (dict(clients=4, clients_per_round=-1), r"--clients-per-round"),
    (dict(clients=4, fraction_train=1.5), r"--fraction-train .* must lie in \[0, 1\]"),
    (dict(clients=4, clients_per_round=2, fraction_train=0.5), r"give only one of them"),
])
def test_sampling_config_errors_name_the_fix(changes, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**changes).validate()


def test_strategy_messages_only_the_sampled_nodes():
    nodes = {1000 + pid: pid for pid in range(5)}
    strategy = HFedMoE.__new__(HFedMoE)  # sampled_nodes reads only these two attributes
    strategy.node_budgets = {n: 10 + pid for n, pid in nodes.items()}
    strategy.node_partitions, strategy.participants = nodes, lambda r: [4, 1] if r == 1 else [0]
    assert strategy.sampled_nodes(1) == [1001, 1004] and strategy.sampled_nodes(2) == [1000]


# --- in-process runs with a tiny Mixtral -----------------------------------------------------------

def test_every_method_samples_the_same_clients_and_budgets_follow_partition_ids(mixtral, tmp_path):
    seen = {}
    for method in ("hfedmoe", "random"):
        cfg = tiny(mixtral, tmp_path / method, method=method, rounds=2)
        run_inprocess(cfg)
        budgets = cfg.budgets_for(2, 4)  # the tiny Mixtral: 2 MoE layers x 4 experts
        got = rows(tmp_path / method)
        assert got[0]["participants"] == []  # round 0: the initial evaluation
        for row in got[1:]:
            assert row["participants"] == cfg.round_participants(row["round"])
            assert sorted(c["id"] for c in row["clients"]) == row["participants"]
            assert row["failures"] == []  # the unsampled clients are no failures
            for c in row["clients"]:
                assert c["expert_budget"] == budgets[c["id"]]
        seen[method] = [row["participants"] for row in got]
    assert seen["hfedmoe"] == seen["random"]


def test_a_sampled_client_that_crashes_is_a_failure_and_the_others_are_not(mixtral, tmp_path, monkeypatch):
    cfg = tiny(mixtral, tmp_path / "r", rounds=1)
    crashed = cfg.round_participants(1)[0]
    monkeypatch.setenv("HFEDMOE_INJECT_CRASH", f"{crashed}@1")
    run_inprocess(cfg)
    row = rows(tmp_path / "r")[1]
    assert len(row["failures"]) == 1 and "no reply" not in row["failures"][0]["reason"]
    assert [c["id"] for c in row["clients"]] == [p for p in row["participants"] if p != crashed]


def _seed_with_a_gap(clients: int, k: int) -> tuple[int, int]:
    """A seed and a partition id sampled in rounds 1 and 3 but not in round 2."""
    for seed in range(200):
        cfg = RunConfig(clients=clients, clients_per_round=k, seed=seed)
        p1, p2, p3 = (set(cfg.round_participants(r)) for r in (1, 2, 3))
        gap = sorted((p1 & p3) - p2)
        if gap:
            return seed, gap[0]
    raise AssertionError("no seed gives a gap")


def test_a_returning_client_trains_from_the_newest_global_model(mixtral, tmp_path, monkeypatch):
    seed, pid = _seed_with_a_gap(4, 2)
    received: dict[tuple[int, int], dict] = {}
    real = client_app_module.client_round

    def spy(cfg, access, data, global_state, budget, server_round, **kw):
        received[(data.partition_id, server_round)] = {k: v.clone() for k, v in global_state.items()}
        return real(cfg, access, data, global_state, budget, server_round, **kw)

    aggregated: dict[int, dict] = {}
    real_aggregate = HFedMoE.aggregate_train

    def keep(self, server_round, replies):
        result = real_aggregate(self, server_round, replies)
        aggregated[server_round + self.round_offset] = {k: v.clone() for k, v in self.last_aggregated_state.items()}
        return result

    monkeypatch.setattr(client_app_module, "client_round", spy)
    monkeypatch.setattr(HFedMoE, "aggregate_train", keep)
    run_inprocess(tiny(mixtral, tmp_path / "r", seed=seed))
    assert (pid, 1) in received and (pid, 2) not in received and (pid, 3) in received
    state = received[(pid, 3)]
    assert state.keys() == aggregated[2].keys()
    assert all(torch.equal(state[k], aggregated[2][k]) for k in state)
    assert any(not torch.equal(state[k], received[(pid, 1)][k]) for k in state)  # the model moved on


def test_a_resumed_run_samples_what_an_uninterrupted_run_samples(mixtral, tmp_path):
    run_inprocess(tiny(mixtral, tmp_path / "whole", rounds=3))
    run_inprocess(tiny(mixtral, tmp_path / "resumed", rounds=2))
    run_inprocess(tiny(mixtral, tmp_path / "resumed", rounds=3, resume=True))
    whole, resumed = rows(tmp_path / "whole"), rows(tmp_path / "resumed")
    assert [r["participants"] for r in resumed] == [r["participants"] for r in whole]
    assert [sorted(c["id"] for c in r["clients"]) for r in resumed] == \
        [sorted(c["id"] for c in r["clients"]) for r in whole]
