"""Flower ClientApp: one HFedMoE client (thin glue; the round itself is hfedmoe.client_round).

The server sends the run configuration and this client's expert budget in every
message; the client's partition comes from its node config (``partition-id``,
set by the simulation engine or by ``flower-supernode --node-config``), and so does
its own data when it has some (``data-path``, plus ``text-column`` etc. where its
file's columns differ from the run's; see hfedmoe.recipe.data.site_source).
"""

from __future__ import annotations

import functools
import os
import sys
import time

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hfedmoe.client_round import client_round
from hfedmoe.config import RunConfig
from hfedmoe.core.budget import parse_bytes
from hfedmoe.fl.dp import sparse_local_dp_mod
from hfedmoe.fl.ray_transport import use_out_of_band_arrays
from hfedmoe.fl.records import encode_upload, record_to_state
from hfedmoe.moe import make_access
from hfedmoe.recipe import (
    ClientData,
    SiteSource,
    build_model,
    load_client_data,
    load_client_test,
    site_label_names,
    site_source,
)
from hfedmoe.training import evaluate, set_torch_threads
from hfedmoe.training.memory import memtrace

app = ClientApp()


@functools.lru_cache(maxsize=1)
def _model(run_config_json: str) -> tuple[RunConfig, torch.nn.Module]:
    """One model skeleton per process and run, shared by the clients this process
    serves one after another: every round loads the whole global state into it
    (strict), so nothing of one client's round carries over to the next."""
    cfg = RunConfig.from_json(run_config_json)
    set_torch_threads()
    return cfg, build_model(cfg, pretrained=False)


@functools.lru_cache(maxsize=None)
def _data(run_config_json: str, partition_id: int, source: SiteSource | None) -> ClientData:
    """A client's tokenized partition (small: all partitions together are the dataset)."""
    return load_client_data(RunConfig.from_json(run_config_json), partition_id, source)


@functools.lru_cache(maxsize=None)
def _test(run_config_json: str, partition_id: int, source: SiteSource | None):
    """What this client scores the global model on in federated evaluation (or None)."""
    return load_client_test(RunConfig.from_json(run_config_json), partition_id, source)


def _source(cfg: RunConfig, context: Context) -> SiteSource | None:
    return site_source(cfg, _partition_id(context), dict(context.node_config))


def _client(run_config_json: str, context: Context) -> tuple[RunConfig, torch.nn.Module, ClientData]:
    """Model skeleton and tokenized data, built once per process and run (a
    cache keyed by partition would rebuild the model for every client once a worker
    serves more clients than the cache holds)."""
    cfg, model = _model(run_config_json)
    return cfg, model, _data(run_config_json, _partition_id(context), _source(cfg, context))


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no 'partition-id' in its node config: start it with "
                         "--node-config 'partition-id=<i> num-partitions=<n>'")
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds, and, when it holds its
    own data, the label names in it (names only: the server agrees the label set)."""
    num_partitions = int(context.node_config.get("num-partitions", 0))
    if num_partitions < 1:
        raise ValueError("this SuperNode has no 'num-partitions' in its node config")
    reply = ConfigRecord({"partition-id": _partition_id(context), "num-partitions": num_partitions})
    if "mem-budget" in context.node_config:  # deployment: the device states its own memory
        reply["mem-budget-bytes"] = parse_bytes(str(context.node_config["mem-budget"]))
    if "run-config" in msg.content["config"]:
        cfg = RunConfig.from_json(str(msg.content["config"]["run-config"]))
        source = _source(cfg, context)
        if source is not None:
            reply["own-data"] = True
            reply["label-names"] = site_label_names(cfg, source)
    return Message(content=RecordDict({"config": reply}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Federated evaluation: score the global model on this client's held-out data."""
    config = msg.content["config"]
    run_config_json = str(config["run-config"])
    cfg, model = _model(run_config_json)
    pid = _partition_id(context)
    test = _test(run_config_json, pid, _source(cfg, context))
    metrics = MetricRecord({"partition-id": pid, "num-examples": 0})
    if test is not None:
        state = record_to_state(msg.content["arrays"])
        del msg.content["arrays"]
        make_access(model).load_state_dict(state, strict=True)
        del state
        scores = evaluate(model, test, task=cfg.task)
        # "scored": the units the loss and accuracy average over (examples; response tokens
        # for causal-lm), so the server's weighted mean is the pooled score.
        metrics = MetricRecord({"partition-id": pid, "num-examples": int(scores["num_examples"]),
                                "scored": int(scores.get("tokens", scores["num_examples"])),
                                "accuracy": float(scores["accuracy"]), "loss": float(scores["loss"])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _injected_crash(partition_id: int, server_round: int) -> bool:
    """Fault injection for tests: HFEDMOE_INJECT_CRASH="1@2,0@3" crashes partition 1
    in round 2 and partition 0 in round 3 ("1@*": every round)."""
    for item in os.environ.get("HFEDMOE_INJECT_CRASH", "").split(","):
        if "@" in item:
            pid, rnd = item.split("@", 1)
            if int(pid) == partition_id and rnd.strip() in ("*", str(server_round)):
                return True
    return False


def _injected_delay(partition_id: int, server_round: int) -> float:
    """Fault injection for tests: HFEDMOE_INJECT_DELAY="2@5:30" makes partition 2 take 30 s
    longer in round 5 (past --round-timeout, its reply is late)."""
    for item in os.environ.get("HFEDMOE_INJECT_DELAY", "").split(","):
        if "@" in item and ":" in item:
            pid, rest = item.split("@", 1)
            rnd, seconds = rest.split(":", 1)
            if int(pid) == partition_id and rnd.strip() in ("*", str(server_round)):
                return float(seconds)
    return 0.0


def _injected_update(partition_id: int, server_round: int) -> str | None:
    """Fault injection for tests: HFEDMOE_INJECT_UPDATE="3@1:scale" makes partition 3's
    round-1 update 1000x its real delta; "3@*:noise" replaces it with noise of the
    weights' scale (both finite: they pass the reply checks and must be caught by the
    server's norm screen or robust merge)."""
    for item in os.environ.get("HFEDMOE_INJECT_UPDATE", "").split(","):
        if "@" in item and ":" in item:
            pid, rest = item.split("@", 1)
            rnd, kind = rest.split(":", 1)
            if int(pid) == partition_id and rnd.strip() in ("*", str(server_round)):
                return kind.strip()
    return None


def _destroy(tensors: dict[str, torch.Tensor], received: dict[str, torch.Tensor], kind: str) -> None:
    generator = torch.Generator().manual_seed(0)
    for key, value in tensors.items():
        if not value.is_floating_point():
            continue
        if kind == "scale":
            tensors[key] = received[key] + 1000.0 * (value - received[key])
        elif kind == "noise":
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(value.dtype)
            tensors[key] = noise * value.float().std().clamp_min(1e-3).to(value.dtype)
        else:
            raise ValueError(f"HFEDMOE_INJECT_UPDATE: unknown kind {kind!r} (scale or noise)")


# Key of the method's private per-client state in the node's Context.state (kept by Flower
# between rounds on the node that runs the client; never sent)
METHOD_STATE = "method-state"


def _method_state(context: Context) -> dict:
    """The method's state this node kept from its earlier rounds of the run ({} at first)."""
    if METHOD_STATE not in context.state:
        return {}
    return dict(context.state[METHOD_STATE].items())


@app.train(mods=[sparse_local_dp_mod])  # local DP on the sparse upload; a no-op unless dp_epsilon > 0
def train(msg: Message, context: Context) -> Message:
    """One local round (hfedmoe.client_round.client_round) as a Flower reply."""
    if "ray" in sys.modules:  # a simulation worker: the reply goes back through Ray, and the
        use_out_of_band_arrays("copy")  # server copies it out of Ray's store (it holds all replies)
    config = msg.content["config"]
    memtrace("train-entry", round=int(config["server-round"]), budget=int(config["expert-budget"]))
    cfg, model, data = _client(str(config["run-config"]), context)
    budget = int(config["expert-budget"])
    server_round = int(config["server-round"])
    if _injected_crash(data.partition_id, server_round):
        raise RuntimeError(f"injected crash of partition {data.partition_id} in round {server_round}")
    if delay := _injected_delay(data.partition_id, server_round):
        time.sleep(delay)
    mem = int(config["mem-budget-bytes"]) if "mem-budget-bytes" in config else None
    seconds = float(config["time-budget-s"]) if "time-budget-s" in config else None
    memtrace("after-client-build", pid_part=data.partition_id)
    started = time.perf_counter()
    # Read-only views of the message's bytes: loading them into the model copies once.
    # Without local DP the arrays record leaves the message and the views are dropped once
    # loaded (release_global_state), so no second copy of the model stays resident while
    # training. Local DP (sparse_local_dp_mod) needs the received values after training.
    global_state = record_to_state(msg.content["arrays"])
    hostile = _injected_update(data.partition_id, server_round)
    received = dict(global_state) if hostile else None  # views of the message: kept alive by this dict
    if not cfg.dp_epsilon:
        del msg.content["arrays"]
    decoded = time.perf_counter()
    memtrace("after-to-state-dict")
    private = _method_state(context)
    upload = client_round(cfg, make_access(model), data, global_state, budget, server_round,
                          mem_budget_bytes=mem, time_budget_s=seconds, release_global_state=True,
                          private_state=private)
    if private:  # the method's own state (FLAME's rescaler) stays on this node for its next round
        context.state[METHOD_STATE] = ConfigRecord(private)
    trained = time.perf_counter()
    memtrace("after-client-round", peak=upload.metrics.get("peak-mem-bytes", 0) / 1e6)
    if upload.failure:  # a training failure (e.g. FedAvg over budget): a flagged reply, not a crash
        return Message(content=encode_upload(upload), reply_to=msg)
    if hostile:
        _destroy(upload.tensors, received, hostile)
    # Where the client's time went (the benchmark subtracts it from the round's time
    # to find what the message layer costs); encode-s covers the arrays, not itself.
    content = encode_upload(upload, {"decode-s": decoded - started, "round-s": trained - decoded})
    content["metrics"]["encode-s"] = time.perf_counter() - trained
    return Message(content=content, reply_to=msg)
