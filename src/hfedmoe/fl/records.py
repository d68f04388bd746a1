"""Wire format: what a client's reply holds, and its validation on the server.

A training reply is a RecordDict with
- ``arrays``  (ArrayRecord): every dense and router tensor, plus the tensors of
  the experts the client uploads (each uploaded expert complete);
- ``stats``   (ArrayRecord): ``usage`` u_c and ``importance`` s^c, Tensor[L, S],
  and ``selection-counts`` (batches in which each expert was trained);
- ``metrics`` (MetricRecord): num-examples, train-loss, experts-trained-mean,
  experts-uploaded, peak-mem-bytes, wall-s, partition-id.

A malformed reply is rejected with a :class:`ReplyError` naming what is wrong; the
server drops that client for the round and keeps everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Message

from hfedmoe.client import ClientRoundResult
from hfedmoe.moe.access import ParamGroups


class ReplyError(ValueError):
    """A client's reply cannot be aggregated."""


@dataclass
class ClientUpdate:
    """A validated training reply, split into the method's parameter groups."""

    node_id: int
    partition_id: int
    num_examples: int
    experts: dict[str, torch.Tensor]
    routers: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor]
    usage: torch.Tensor
    importance: torch.Tensor
    selection_counts: torch.Tensor
    metrics: dict
    bytes_up: int
    bytes_up_floor: int  # raw tensor bytes of the uploaded arrays (numel x itemsize)


def update_from_round(node_id: int, reply: ClientRoundResult, groups: ParamGroups) -> ClientUpdate:
    """A ClientUpdate straight from a client round, without a Flower message (in-process
    loops: benchmarks and tests). The tensors are copied, as serialising would."""
    upload = {k: v.clone() for k, v in reply.upload.items()}
    return ClientUpdate(
        node_id=node_id, partition_id=int(reply.metrics["partition-id"]),
        num_examples=int(reply.metrics["num-examples"]),
        experts={k: v for k, v in upload.items() if k in groups.expert_of},
        routers={k: upload[k] for k in groups.routers},
        dense={k: upload[k] for k in groups.dense},
        usage=reply.stats["usage"], importance=reply.stats["importance"],
        selection_counts=reply.stats["selection-counts"], metrics=reply.metrics,
        bytes_up=0, bytes_up_floor=raw_nbytes(upload),
    )


def record_nbytes(record: ArrayRecord) -> int:
    """Serialised bytes of an ArrayRecord's arrays (tensor data plus each array's
    small .npy header, about 128 bytes; the message envelope is not counted)."""
    return sum(len(array.data) for array in record.values())


def parse_reply(msg: Message, groups: ParamGroups, reference: dict[str, torch.Tensor]) -> ClientUpdate:
    """Validate one training reply against the global model's keys and shapes."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        raise ReplyError(f"client on node {node} failed: {msg.error.reason}")
    content = msg.content
    for name in ("arrays", "stats", "metrics"):
        if name not in content:
            raise ReplyError(f"reply of node {node} has no {name!r} record")
    arrays = content["arrays"].to_torch_state_dict()
    stats = content["stats"].to_torch_state_dict()
    metrics = dict(content["metrics"])

    unknown = sorted(set(arrays) - set(reference))
    if unknown:
        raise ReplyError(f"reply of node {node} has unknown tensor(s) {unknown[:3]}")
    for key, value in arrays.items():
        if value.dtype != reference[key].dtype:
            raise ReplyError(f"reply of node {node}: {key} has dtype {value.dtype}, expected {reference[key].dtype}")
        if tuple(value.shape) != tuple(reference[key].shape):
            raise ReplyError(
                f"reply of node {node}: {key} has shape {tuple(value.shape)}, expected {tuple(reference[key].shape)}"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ReplyError(f"reply of node {node}: {key} holds NaN or infinite values")
    missing = [k for k in groups.dense + groups.routers if k not in arrays]
    if missing:
        raise ReplyError(f"reply of node {node} lacks dense/router tensor(s) {missing[:3]}")

    uploaded = {groups.expert_of[k] for k in arrays if k in groups.expert_of}
    for le in uploaded:
        incomplete = [k for k in groups.experts[le] if k not in arrays]
        if incomplete:
            raise ReplyError(f"reply of node {node} uploads expert {le} without {incomplete}")

    shape = (groups.num_layers, groups.num_experts)
    for name in ("usage", "importance", "selection-counts"):
        if name not in stats or tuple(stats[name].shape) != shape:
            raise ReplyError(f"reply of node {node}: stats {name!r} missing or not of shape {shape}")
        # Usage and importance feed the gate weights: one bad value would skew or
        # crash the router merge for everyone.
        values = stats[name].double()
        if not (torch.isfinite(values).all() and (values >= 0).all()):
            raise ReplyError(f"reply of node {node}: stats {name!r} must be finite and >= 0")
    num_examples = int(metrics.get("num-examples", 0))
    if num_examples < 1:
        raise ReplyError(f"reply of node {node} has no valid num-examples (must be >= 1)")
    return ClientUpdate(
        node_id=node,
        partition_id=int(metrics.get("partition-id", -1)),
        num_examples=num_examples,
        experts={k: v for k, v in arrays.items() if k in groups.expert_of},
        routers={k: arrays[k] for k in groups.routers},
        dense={k: arrays[k] for k in groups.dense},
        usage=stats["usage"].float(),
        importance=stats["importance"].float(),
        selection_counts=stats["selection-counts"],
        metrics=metrics,
        bytes_up=record_nbytes(content["arrays"]) + record_nbytes(content["stats"]),
        bytes_up_floor=raw_nbytes(arrays),
    )


def raw_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """The floor for sending ``tensors``: their raw element bytes, no headers."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
