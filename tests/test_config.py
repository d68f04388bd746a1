"""RunConfig: validation, default budgets, (de)serialisation and Flower's run config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hfedmoe.config import ConfigError, RunConfig, parse_int_list


def test_defaults_are_valid():
    cfg = RunConfig()
    assert cfg.validate() is cfg


@pytest.mark.parametrize(
    "changes, flag",
    [
        ({"rounds": 0}, "--rounds"),
        ({"clients": -1}, "--clients"),
        ({"local_steps": 0}, "--local-steps"),
        ({"batch_size": 2.5}, "--batch-size"),
        ({"num_experts": 0}, "--num-experts"),
        ({"top_k": 0}, "--top-k"),
        ({"max_length": 0}, "--max-length"),
        ({"eval_batch_size": 0}, "--eval-batch-size"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"lr": float("inf")}, "--lr"),
        ({"alpha": -0.5}, "--alpha"),
        ({"lam": 1.5}, "--lam"),
        ({"lam": float("nan")}, "--lam"),
        ({"beta": -0.1}, "--beta"),
        ({"tau": 1.2}, "--tau"),
        ({"tau": float("nan")}, "--tau"),
        ({"test_fraction": 0.0}, "--test-fraction"),
        ({"test_fraction": 1.0}, "--test-fraction"),
        ({"top_k": 9, "num_experts": 8}, "--top-k 9 exceeds --num-experts 8"),
        ({"method": "fedprox"}, "--method 'fedprox' is not available; choose one of hfedmoe, fedavg-full, "),
        ({"pooling": "sum"}, "--pooling must be one of mean, max"),
        ({"select_by": "random"}, "--select-by must be one of ib, importance"),
        ({"expert_budgets": [8, 8, 8]}, "--expert-budgets lists 3 budgets for 4 clients"),
        ({"expert_budgets": [8, 8, 0, 8]}, "--expert-budgets must be positive integers"),
        ({"expert_budgets": [8, 8, 2.5, 8]}, "--expert-budgets must be positive integers"),
    ],
)
def test_validate_names_the_invalid_flag(changes, flag):
    with pytest.raises(ConfigError) as info:
        RunConfig(**changes).validate()
    assert flag in str(info.value)
    assert isinstance(info.value, ValueError)


def test_validate_rejects_nan_beta():
    with pytest.raises(ConfigError, match="--beta"):
        RunConfig(beta=float("nan")).validate()


def test_default_budgets_are_paper_like():
    assert RunConfig(clients=4, num_experts=8).budgets_for(6) == [48, 48, 24, 12]
    assert RunConfig(clients=3, num_experts=8).budgets_for(6) == [48, 48, 24]
    assert RunConfig(clients=1, num_experts=8).budgets_for(6) == [48]
    # never below one expert per layer
    assert RunConfig(clients=4, num_experts=2).budgets_for(6) == [12, 12, 6, 6]
    budgets = RunConfig(clients=7, num_experts=8).budgets_for(6)
    assert budgets[:4] == [48] * 4 and budgets[4] == 24 and budgets[-1] == 12
    assert budgets == sorted(budgets, reverse=True)


def test_explicit_budgets_are_clamped_to_all_experts():
    cfg = RunConfig(clients=3, num_experts=8, expert_budgets=[100, 48, 6])
    assert cfg.budgets_for(6) == [48, 48, 6]


def test_budget_below_the_number_of_layers_is_refused():
    cfg = RunConfig(clients=2, num_experts=8, expert_budgets=[48, 5]).validate()
    with pytest.raises(ConfigError, match="minimum budget is 6") as info:
        cfg.budgets_for(6)
    assert "client 1" in str(info.value) and "--expert-budgets" in str(info.value)


def test_json_round_trip():
    cfg = RunConfig(rounds=5, clients=2, expert_budgets=[16, 6], lr=3e-4, out="runs/x", gate_normalize=False,
                    extra={"note": "hi", "n": [1, 2]})
    again = RunConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.to_json() == cfg.to_json()


def test_unknown_json_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown configuration key\(s\) \['bogus'\]"):
        RunConfig.from_json('{"rounds": 2, "bogus": 1}')


def test_from_flower_run_config_maps_dash_keys_and_aliases():
    cfg = RunConfig.from_flower_run_config({
        "num-server-rounds": 7,
        "num-clients": 2,
        "dirichlet-alpha": 0.3,
        "local-steps": 3,
        "batch-size": 4,
        "expert-budgets": "12, 6",
        "select-by": "importance",
        "out": "",
        "model": "",
        "dataset": "",
    })
    assert cfg.rounds == 7 and cfg.clients == 2 and cfg.alpha == 0.3
    assert cfg.local_steps == 3 and cfg.batch_size == 4
    assert cfg.expert_budgets == [12, 6]
    assert cfg.select_by == "importance"
    assert cfg.out is None
    assert cfg.model == RunConfig().model and cfg.dataset == RunConfig().dataset
    cfg.validate()
    assert RunConfig.from_flower_run_config({"expert-budgets": ""}).expert_budgets is None


def test_from_flower_run_config_refuses_unknown_keys():
    with pytest.raises(ConfigError, match="'num-rounds'"):
        RunConfig.from_flower_run_config({"num-rounds": 3})


def test_the_shipped_flower_app_config_is_valid():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    app_config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_flower_run_config(app_config).validate()
    assert cfg.rounds == app_config["num-server-rounds"]
    assert cfg.alpha == app_config["dirichlet-alpha"]


def test_parse_int_list():
    assert parse_int_list("48,48,24,12") == [48, 48, 24, 12]
    assert parse_int_list(" 8 , 4,") == [8, 4]
    with pytest.raises(ConfigError, match="comma-separated integers.*'8,x'"):
        parse_int_list("8,x")
    with pytest.raises(ConfigError, match="comma-separated integers"):
        RunConfig.from_flower_run_config({"expert-budgets": "8;4"})
