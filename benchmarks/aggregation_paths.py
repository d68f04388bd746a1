"""Issue 19: is the server's aggregation slower on parsed replies than in the bare loop?

The federated server aggregates tensors parsed from reply messages (read-only views of
each message's bytes, :func:`hfedmoe.fl.records.parse_upload`); the bare loop of
``hfedmoe bench`` aggregates clones (``ReceivedUpload.in_process``). This times
``HFedMoE.aggregate`` on the same synthetic uploads of the embedded model both ways,
alternated, in the main thread and in a second thread (where Flower's simulation engine
runs the ServerApp), and prints one JSON line.

    PYTHONPATH=src python benchmarks/aggregation_paths.py [CLIENTS] [REPEATS]
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time

import torch
from flwr.app import Message, MessageType, RecordDict

from hfedmoe.client_round import ClientUpload
from hfedmoe.config import RunConfig
from hfedmoe.fl.inprocess import server_identity
from hfedmoe.fl.records import ReceivedUpload, encode_upload, parse_upload
from hfedmoe.fl.strategy import HFedMoE
from hfedmoe.moe import make_access
from hfedmoe.recipe import build_model
from hfedmoe.training import set_torch_threads


def _uploads(clients: int):
    cfg = RunConfig(clients=clients)
    access = make_access(build_model(cfg, pretrained=False))
    groups, state = access.param_groups(), access.state_dict()
    generator = torch.Generator().manual_seed(0)
    shape = (groups.num_layers, groups.num_experts)
    uploads = []
    for c in range(clients):
        chosen = torch.rand(shape, generator=generator) < 0.5
        keys = [k for (l, e), names in groups.experts.items() if chosen[l, e] for k in names]
        tensors = {**{k: state[k] + 0.001 for k in [*groups.routers, *groups.dense]},
                   **{k: state[k] + 0.01 for k in keys}}
        uploads.append(ClientUpload(tensors=tensors, usage=torch.rand(shape, generator=generator),
                                    importance=torch.rand(shape, generator=generator),
                                    selection_counts=chosen.long(),
                                    metrics={"num-examples": 100 + c, "partition-id": c}))
    return groups, state, uploads


def _parsed(groups, state, uploads) -> list[ReceivedUpload]:
    """Each upload through the wire format and the server's parser (views of the bytes)."""
    out = []
    for c, upload in enumerate(uploads):
        instruction = Message(content=RecordDict({}), dst_node_id=1000 + c, message_type=MessageType.TRAIN)
        out.append(parse_upload(Message(encode_upload(upload), reply_to=instruction), groups, state))
    return out


THREADS_SEEN: set[tuple[bool, int]] = set()  # (in the main thread, torch.get_num_threads() there)


def _time(strategy: HFedMoE, received: list[ReceivedUpload], in_thread: bool) -> float:
    box = {}

    def work():
        start = time.perf_counter()
        strategy.aggregate(received)
        box["s"] = time.perf_counter() - start
        THREADS_SEEN.add((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))

    if in_thread:
        t = threading.Thread(target=work)
        t.start()
        t.join()
    else:
        work()
    return box["s"]


def main() -> None:
    clients = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    set_torch_threads()
    groups, state, uploads = _uploads(clients)
    strategy = HFedMoE(groups, {i: 1 for i in range(clients)}, "{}", 0.05, True)
    strategy.set_global_state(state)
    with server_identity():  # Flower reads the process's run id to create a message
        views = _parsed(groups, state, uploads)
    clones = [ReceivedUpload.in_process(c, u) for c, u in enumerate(uploads)]
    times = {f"{kind}-{where}": [] for kind in ("views", "clones") for where in ("main", "thread")}
    _time(strategy, clones, False)  # warm-up
    for _ in range(repeats):
        for kind, received in (("views", views), ("clones", clones)):
            for where in ("main", "thread"):
                times[f"{kind}-{where}"].append(_time(strategy, received, where == "thread"))
    medians = {k: round(statistics.median(v), 3) for k, v in times.items()}
    print(json.dumps({"clients": clients, "repeats": repeats, "torch_threads": torch.get_num_threads(),
                      "threads_seen": sorted(THREADS_SEEN),
                      "median_s": medians, "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
                      "views_over_clones_main": round(medians["views-main"] / medians["clones-main"], 3)}))


if __name__ == "__main__":
    main()
