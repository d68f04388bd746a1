"""FLAME (hfedmoe.methods.flame): per-client top-k, private rescaler, activation-aware merge."""

from __future__ import annotations

import json

import pytest
import torch

from hfedmoe import core
from hfedmoe.client_round import client_round
from hfedmoe.config import RunConfig
from hfedmoe.data import TensorBatches
from hfedmoe.fl.client_app import METHOD_STATE
from hfedmoe.fl.client_app import app as client_app
from hfedmoe.fl.inprocess import InProcessGrid, run_server, server_identity
from hfedmoe.methods.flame import RESCALER_KEY, client_top_k, initial_rescale
from hfedmoe.methods.merging import merge_by_activation, merge_over_uploaders
from hfedmoe.moe.modular import ModularMoEAccess
from hfedmoe.recipe import ClientData

from builders import K, L, LABELS, S, VOCAB, mixtral_config, tiny_moe


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: one thread is fastest


def client_data(n: int = 24, t: int = 10) -> ClientData:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    labels = torch.randint(0, LABELS, (n,), generator=g)
    return ClientData(0, TensorBatches(ids, mask, labels, batch_size=6, shuffle=True, seed=0),
                      [int((labels == c).sum()) for c in range(LABELS)])


def flame_round(budget: int, private: dict, server_round: int = 1, top_k: int = K):
    model = tiny_moe(top_k=top_k, sharp_router=True)
    access = ModularMoEAccess(model)
    state = {k: v.clone() for k, v in access.state_dict().items()}
    cfg = RunConfig(method="flame", clients=2, local_steps=3, lr=1e-2, num_experts=S, top_k=top_k)
    return client_round(cfg, access, client_data(), state, budget, server_round, private_state=private), access


def test_the_budget_sets_how_many_experts_each_token_is_routed_to():
    assert [client_top_k(8, b, 64) for b in (64, 32, 16, 8, 4, 1)] == [8, 4, 2, 1, 1, 1]
    assert client_top_k(2, 6, 8) == 2 and client_top_k(2, 2, 8) == 1  # 1.5 rounds up, 0.5 to the floor of 1
    assert client_top_k(2, 100, 8) == 2  # never above the model's k
    assert initial_rescale(8, 2, renormalized=False) == 4.0 and initial_rescale(8, 2, renormalized=True) == 1.0


def test_activation_weights_are_frequency_to_the_t_times_data_size():
    f = torch.tensor([[[0.5, 0.0]], [[0.25, 1.0]]])  # [C=2, L=1, S=2]
    gamma = core.activation_weights(f, [10, 40], temperature=2.0)
    assert torch.allclose(gamma, torch.tensor([[[2.5, 0.0]], [[2.5, 40.0]]], dtype=torch.float64))
    assert torch.equal(core.activation_weights(f, [10, 40], temperature=0.0)[:, 0, 0],
                       torch.tensor([10.0, 40.0], dtype=torch.float64))  # t = 0 is FedAvg
    with pytest.raises(ValueError, match="temperature"):
        core.activation_weights(f, [10, 40], temperature=-1.0)


def test_the_activation_aware_merge_weighs_each_expert_on_its_own():
    previous = {"e0": torch.zeros(3), "e1": torch.full((3,), 7.0), "e2": torch.full((3,), -1.0)}
    expert_of = {"e0": (0, 0), "e1": (0, 1), "e2": (0, 2)}
    uploads = [{"e0": torch.full((3,), 1.0), "e1": torch.full((3,), 1.0)},
               {"e0": torch.full((3,), 4.0), "e1": torch.full((3,), 4.0), "e2": torch.full((3,), 5.0)}]
    frequency = torch.tensor([[[0.5, 1.0, 0.0]], [[0.25, 0.0, 0.0]]])
    merged = merge_by_activation(previous, uploads, [10, 40], frequency, expert_of)
    # e0: gamma 2.5 and 2.5 -> the plain mean; e1: only client 0 routed to it -> its value;
    # e2: its one uploader never routed a token to it (gamma 0) -> unchanged
    assert torch.allclose(merged["e0"], torch.full((3,), 2.5))
    assert torch.equal(merged["e1"], torch.full((3,), 1.0))
    assert merged["e2"] is previous["e2"]
    # t = 0 would be Eq. 17's |D|-weighted mean over uploaders
    weights = core.activation_weights(frequency, [10, 40], temperature=0.0)
    assert torch.allclose(core.aggregate_experts_weighted(previous, uploads, weights, expert_of)["e0"],
                          merge_over_uploaders(previous, uploads, [10, 40])["e0"])
    with pytest.raises(ValueError, match="activation frequency"):
        merge_by_activation(previous, uploads, [10, 40])


def test_a_constrained_client_routes_fewer_experts_trains_every_routed_one_and_keeps_its_rescaler():
    private: dict = {}
    reply, access = flame_round(budget=2, private=private)  # k_c = round(2 x 2 / 8) = 1
    assert reply.failure is None
    # one expert per token: each layer's activation shares add up to 1 (k_c), not 2 (k)
    torch.testing.assert_close(reply.activation.sum(dim=1), torch.ones(L))
    assert torch.equal(reply.result.trained, reply.result.activation > 0), "trains exactly the routed experts"
    uploaded = {access.param_groups().expert_of[k] for k in reply.tensors if k in access.param_groups().expert_of}
    assert uploaded == {tuple(x) for x in reply.result.trained.nonzero().tolist()}
    assert all(layer.top_k == K for layer in access.layers), "the model's own top-k is back after the round"
    rescaler = private[RESCALER_KEY]
    assert len(rescaler) == L and rescaler != [1.0] * L, "the rescaler was trained (it starts at 1: renormalised)"
    assert not any(RESCALER_KEY in k for k in reply.tensors), "the rescaler is never uploaded"
    # the next round starts from the kept rescaler
    again: dict = {RESCALER_KEY: list(rescaler)}
    flame_round(budget=2, private=again, server_round=2)
    assert again[RESCALER_KEY] != rescaler


def test_an_unconstrained_client_routes_the_models_top_k():
    reply, _ = flame_round(budget=L * S, private={})
    torch.testing.assert_close(reply.activation.sum(dim=1), torch.full((L,), float(K)))


def test_a_federated_flame_run_keeps_each_rescaler_on_its_node(mixtral, tmp_path, one_thread):
    """Two rounds on the tiny Mixtral through the real ServerApp/ClientApp: each node's
    rescaler lives in its Flower context state, and the server never sees it."""
    # 2 layers x 4 experts, top-2: budget 2 routes 1 expert per token, budget 8 the model's 2
    cfg = mixtral_config(mixtral, tmp_path / "r", method="flame", rounds=2, local_steps=2, expert_budgets=[2, 8])
    grid = InProcessGrid(client_app, cfg.clients)
    with server_identity():
        run_server(grid, cfg)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["failures"] == []
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for context in grid.contexts.values():
        kept = context.state[METHOD_STATE][RESCALER_KEY]
        assert len(kept) == 2 and all(isinstance(x, float) for x in kept)
    shares = {c["id"]: sum(c["activation"][0]) for c in rows[-1]["clients"]}
    assert shares == pytest.approx({0: 1.0, 1: 2.0})  # experts per token: k_c = 1 and the model's 2
