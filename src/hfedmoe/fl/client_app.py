"""Flower ClientApp: one HFedMoE client (thin glue; the ML lives in hfedmoe.train).

The server sends the run configuration and this client's expert budget in every
message; the client's partition comes from its node config (``partition-id``,
set by the simulation engine or by ``flower-supernode --node-config``).
"""

from __future__ import annotations

import functools
import itertools

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hfedmoe.config import RunConfig
from hfedmoe.moe.access import make_access
from hfedmoe.task import ClientData, build_model, load_client_data
from hfedmoe.train import LocalTrainConfig, set_torch_threads, train_local

app = ClientApp()


@functools.lru_cache(maxsize=2)
def _client(run_config_json: str, partition_id: int) -> tuple[RunConfig, torch.nn.Module, ClientData]:
    """Model skeleton and tokenized partition, built once per process and run."""
    cfg = RunConfig.from_json(run_config_json)
    set_torch_threads()
    return cfg, build_model(cfg, pretrained=False), load_client_data(cfg, partition_id)


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no 'partition-id' in its node config: start it with "
                         "--node-config 'partition-id=<i> num-partitions=<n>'")
    return int(context.node_config["partition-id"])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    num_partitions = int(context.node_config.get("num-partitions", 0))
    if num_partitions < 1:
        raise ValueError("this SuperNode has no 'num-partitions' in its node config")
    reply = ConfigRecord({"partition-id": _partition_id(context), "num-partitions": num_partitions})
    return Message(content=RecordDict({"config": reply}), reply_to=msg)


def _batches_from_round(data: ClientData, server_round: int, local_steps: int):
    """Continue the client's data stream where the previous round stopped.

    Computed from the round number rather than kept in process state, so the run
    is the same whichever simulation worker serves this client.
    """
    epoch, skip = divmod((server_round - 1) * local_steps, len(data.batches))
    while True:
        yield from itertools.islice(data.batches.iter_epoch(epoch), skip, None)
        epoch, skip = epoch + 1, 0


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local HFedMoE round; reply with the experts actually used."""
    config = msg.content["config"]
    cfg, model, data = _client(str(config["run-config"]), _partition_id(context))
    budget = int(config["expert-budget"])
    server_round = int(config["server-round"])
    access = make_access(model)
    access.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)

    local = LocalTrainConfig(
        local_steps=cfg.local_steps, lr=cfg.lr, new_param_lr_mult=cfg.new_param_lr_mult, lam=cfg.lam,
        beta=cfg.beta, pooling=cfg.pooling, select_by=cfg.select_by, aux_loss_coef=cfg.aux_loss_coef,
    )
    torch.manual_seed(cfg.seed * 7919 + server_round * 31 + data.partition_id)  # dropout
    result = train_local(model, _batches_from_round(data, server_round, cfg.local_steps), budget, local)

    # Upload only the experts this client really used: trained in some batch and
    # with usage u_c >= tau (Eq. 18's S_c). An untrained expert equals the global one,
    # so uploading it would only drag the average back.
    upload = result.trained & (result.usage >= cfg.tau)
    state = access.state_dict()
    groups = access.param_groups()
    keep = set(groups.dense) | set(groups.routers)
    for layer, expert in upload.nonzero().tolist():
        keep.update(groups.experts[(layer, expert)])
    arrays = ArrayRecord({k: v for k, v in state.items() if k in keep})
    stats = ArrayRecord({
        "usage": result.usage,
        "importance": result.importance,
        "selection-counts": result.selection_counts,
    })
    metrics = MetricRecord({
        "num-examples": data.num_examples,
        "partition-id": data.partition_id,
        "expert-budget": budget,
        "train-loss": result.train_loss,
        "experts-trained-mean": result.experts_trained_mean,
        "experts-uploaded": int(upload.sum()),
        "peak-mem-bytes": result.peak_mem_bytes,
        "wall-s": result.wall_s,
    })
    return Message(content=RecordDict({"arrays": arrays, "stats": stats, "metrics": metrics}), reply_to=msg)
