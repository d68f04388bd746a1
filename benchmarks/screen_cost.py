"""What the server's update-norm screen (--norm-screen) costs next to the aggregation it
guards, on the embedded model (289 MB fp32): K clients each uploading every tensor.

Usage::

    PYTHONPATH=src python benchmarks/screen_cost.py [K ...]     # default 4 10
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def measure(clients: int, repeats: int = 3) -> dict:
    from hfedmoe.client_round import ClientUpload
    from hfedmoe.config import RunConfig
    from hfedmoe.fl.records import ReceivedUpload
    from hfedmoe.fl.strategy import HFedMoE
    from hfedmoe.moe import make_access
    from hfedmoe.recipe import build_model

    cfg = RunConfig(clients=clients)
    access = make_access(build_model(cfg, pretrained=True))
    groups, state = access.param_groups(), {k: v.detach() for k, v in access.state_dict().items()}
    strategy = HFedMoE(groups, {c: 1 for c in range(clients)}, cfg.to_json(), norm_screen=10.0)
    strategy.set_global_state(state)
    shape = (groups.num_layers, groups.num_experts)
    received = []
    for c in range(clients):
        g = torch.Generator().manual_seed(c)
        tensors = {k: v + 1e-3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                   for k, v in state.items()}
        upload = ClientUpload(tensors=tensors, usage=torch.full(shape, 1 / shape[1]),
                              importance=torch.full(shape, 1 / shape[1]),
                              selection_counts=torch.full(shape, cfg.local_steps),
                              metrics={"num-examples": 100, "partition-id": c, "local-steps": cfg.local_steps})
        received.append(ReceivedUpload(node_id=c, upload=upload, bytes_up=0, bytes_up_floor=0))
    screen_s, aggregate_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        assert strategy.screen(received) == {}
        screen_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        strategy.aggregate(received)
        aggregate_s.append(time.perf_counter() - started)
    return {"clients": clients, "screen_s": statistics.median(screen_s), "aggregate_s": statistics.median(aggregate_s)}


def main(counts: list[int]) -> None:
    torch.set_num_threads(1)
    for k in counts:
        r = measure(k)
        print(f"{k:3d} clients: screen {r['screen_s']:.2f} s, aggregation {r['aggregate_s']:.2f} s "
              f"(screen / aggregation {r['screen_s'] / r['aggregate_s']:.2f})", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [4, 10])
