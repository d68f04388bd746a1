"""A Flower message of the embedded model's size through a Ray actor call and back,
with Flower's default pickling of ``Array`` data (in band) and with
hfedmoe.fl.ray_transport (out of band), in one process (issue 8, BENCHMARKS.md).

    python benchmarks/ray_message.py [ROUND_TRIPS]

The actor reads every received array (as a client loads the model), clones 85% of
them and replies with those (as a client uploads dense + routers + its experts).
``inner_s`` is that work inside the actor; ``transport_s`` = round trip - inner_s.
Each mode runs in a fresh Ray session; the first round trip of each is dropped.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time

import ray
import ray.util
import torch
from flwr.app import Array, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from hfedmoe.fl.ray_transport import use_out_of_band_arrays
from hfedmoe.fl.records import record_to_state, state_to_record


def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # Message() needs them (Flower sets them in a run)


@ray.remote
class Client:
    def __init__(self, out_of_band: bool) -> None:
        _identity()
        if out_of_band:
            use_out_of_band_arrays("copy")  # as the client app: the server copies the reply

    def train(self, msg: Message) -> tuple[Message, float]:
        start = time.perf_counter()
        state = record_to_state(msg.content["arrays"])
        upload = {k: v.clone() for k, v in list(state.items())[: int(len(state) * 0.85)]}  # reads every array
        reply = Message(content=RecordDict({"arrays": state_to_record(upload)}), reply_to=msg)
        return reply, time.perf_counter() - start


def measure(out_of_band: bool, round_trips: int) -> dict:
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level=logging.ERROR)
    try:
        _identity()
        if out_of_band:
            use_out_of_band_arrays("copy")  # as the client app: the server copies the reply
        record = state_to_record({f"w{i}": torch.randn(1024, 1000) for i in range(72)})  # 295 MB
        client = Client.options(num_cpus=2).remote(out_of_band)
        transport = []
        for i in range(round_trips + 1):
            msg = Message(content=RecordDict({"arrays": record, "config": ConfigRecord({"round": i})}),
                          dst_node_id=1, message_type=MessageType.TRAIN)
            msg.metadata.__dict__["_message_id"] = str(i)
            start = time.perf_counter()
            reply, inner = ray.get(client.train.remote(msg))
            record_to_state(reply.content["arrays"])
            transport.append(time.perf_counter() - start - inner)
            del reply
        return {"out_of_band": out_of_band, "transport_s": [round(t, 3) for t in transport[1:]],
                "median_s": round(statistics.median(transport[1:]), 3)}
    finally:
        ray.util.deregister_serializer(Array)  # the next mode starts from Flower's default
        ray.shutdown()


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    results = [measure(False, n), measure(True, n)]
    for r in results:
        print(r)
    print({"transport_ratio_out_of_band_over_in_band": round(results[1]["median_s"] / results[0]["median_s"], 3)})
