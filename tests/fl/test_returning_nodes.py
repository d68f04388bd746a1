"""A lost client node that comes back under a new node id (a restarted SuperNode) takes
its partition's place again: same budget, sampled again, trains from the current model."""

from __future__ import annotations

import json

from flwr.app import Context, RecordDict

from hfedmoe.fl.client_app import app as client_app
from hfedmoe.fl.inprocess import InProcessGrid, run_server, server_identity
from hfedmoe.fl.strategy import HFedMoE

from builders import mixtral_config


def test_a_restarted_node_is_picked_up_in_a_later_round(mixtral, tmp_path, monkeypatch, one_thread):
    cfg = mixtral_config(mixtral, tmp_path / "r", clients=3, rounds=3, local_steps=1)
    grid = InProcessGrid(client_app, 3)
    lost = 1001  # partition 1's node: it dies in round 2 and restarts as node 2001
    monkeypatch.setenv("HFEDMOE_INJECT_CRASH", "1@2")
    real = HFedMoE.aggregate_train

    def aggregate_then_restart(self, server_round, replies):
        result = real(self, server_round, replies)
        if server_round == 2:
            context = grid.contexts.pop(lost)
            grid.contexts[2001] = Context(run_id=context.run_id, node_id=2001, node_config=dict(context.node_config),
                                          state=RecordDict(), run_config={})
        return result

    monkeypatch.setattr(HFedMoE, "aggregate_train", aggregate_then_restart)
    with server_identity():
        run_server(grid, cfg)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [f["id"] for f in rows[2]["failures"]] == [1]
    assert sorted(c["id"] for c in rows[2]["clients"]) == [0, 2]
    back = {c["id"]: c for c in rows[3]["clients"]}
    assert sorted(back) == [0, 1, 2] and rows[3]["failures"] == []
    assert back[1]["node_id"] == 2001
    assert back[1]["expert_budget"] == rows[1]["clients"][1]["expert_budget"]  # its own budget again
