"""What each virtual client holds on Flower's simulation engine (hfedmoe.fl.simulation)."""

from __future__ import annotations

import pytest

from hfedmoe.config import RunConfig
from hfedmoe.fl.simulation import client_resources


def test_on_the_cpu_a_client_holds_every_core_so_clients_run_one_at_a_time():
    assert client_resources(RunConfig(), cores=16, gpus=0) == {"num_cpus": 16, "num_gpus": 0.0}
    assert client_resources(RunConfig(client_cpus=4), cores=16, gpus=0) == {"num_cpus": 4, "num_gpus": 0.0}


def test_on_gpus_a_client_holds_its_share_of_a_gpu_and_of_the_cores():
    assert client_resources(RunConfig(), cores=16, gpus=1) == {"num_cpus": 16, "num_gpus": 1.0}
    # four clients share the GPU and train at once: a quarter of the cores each
    assert client_resources(RunConfig(client_gpus=0.25), cores=16, gpus=1) == {"num_cpus": 4, "num_gpus": 0.25}
    assert client_resources(RunConfig(client_gpus=0.5), cores=16, gpus=2) == {"num_cpus": 4, "num_gpus": 0.5}
    assert client_resources(RunConfig(client_gpus=0.25, client_cpus=2), cores=16, gpus=1)["num_cpus"] == 2
    assert client_resources(RunConfig(client_gpus=0.1), cores=4, gpus=1)["num_cpus"] == 1  # never 0


def test_auto_engine_is_inprocess_one_client_at_a_time_and_simulation_when_clients_share():
    from hfedmoe.fl.simulation import pick_engine

    assert pick_engine(RunConfig(clients=4), cores=2, gpus=0) == "inprocess"  # a client holds every core
    assert pick_engine(RunConfig(clients=4, client_cpus=1), cores=2, gpus=0) == "simulation"
    assert pick_engine(RunConfig(clients=4, device="cuda"), cores=16, gpus=1) == "inprocess"
    assert pick_engine(RunConfig(clients=4, device="cuda", client_gpus=0.25), cores=16, gpus=1) == "simulation"
    assert pick_engine(RunConfig(clients=4, device="cuda"), cores=16, gpus=2) == "simulation"
    assert pick_engine(RunConfig(clients=1, client_cpus=1), cores=2, gpus=0) == "inprocess"


def test_resolve_engine_keeps_an_explicit_choice_and_refuses_an_unknown_one():
    from hfedmoe.config import ConfigError
    from hfedmoe.fl.simulation import resolve_engine

    assert resolve_engine(RunConfig(clients=4), "simulation") == "simulation"
    assert resolve_engine(RunConfig(clients=4), "inprocess") == "inprocess"
    assert resolve_engine(RunConfig(clients=4, device="cpu"), "auto") == "inprocess"  # one client holds every core
    with pytest.raises(ConfigError, match="--engine ray: choose one of auto, inprocess, simulation"):
        resolve_engine(RunConfig(), "ray")
