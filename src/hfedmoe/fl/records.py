"""Wire format: a :class:`~hfedmoe.client_round.ClientUpload` encoded into a Flower reply
(:func:`encode_upload`) and parsed and validated on the server (:func:`parse_upload`).

A training reply is a RecordDict with
- ``arrays``  (ArrayRecord): every dense and router tensor, plus the tensors of
  the experts the client uploads (each uploaded expert complete);
- ``stats``   (ArrayRecord): ``usage`` u_c and ``importance`` s^c, Tensor[L, S],
  ``selection-counts`` (batches in which each expert was trained) and ``activation``
  (share of the client's routed tokens each expert processed);
- ``metrics`` (MetricRecord): num-examples, train-loss, experts-trained-mean,
  experts-uploaded, peak-mem-bytes, wall-s, partition-id.

A malformed reply is rejected with a :class:`ReplyError` naming what is wrong; the
server drops that client for the round and keeps everything else.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

from hfedmoe.client_round import ClientUpload
from hfedmoe.moe import ParamGroups


class ReplyError(ValueError):
    """A client's reply cannot be aggregated."""


@dataclass
class ReceivedUpload:
    """A validated training reply: the client's :class:`ClientUpload` and what it cost."""

    node_id: int
    upload: ClientUpload
    bytes_up: int  # serialised bytes of the reply's arrays (tensor data + .npy headers)
    bytes_up_floor: int  # raw tensor bytes of the uploaded arrays (numel x itemsize)

    @classmethod
    def in_process(cls, node_id: int, upload: ClientUpload) -> "ReceivedUpload":
        """An upload handed over without a message (in-process loops: benchmarks, tests).
        The tensors are copied, as serialising would; nothing crossed a wire (0 bytes)."""
        copied = replace(upload, tensors={k: v.clone() for k, v in upload.tensors.items()})
        return cls(node_id=node_id, upload=copied, bytes_up=0, bytes_up_floor=raw_nbytes(copied.tensors))


def encode_upload(upload: ClientUpload, extra_metrics: dict | None = None) -> RecordDict:
    """The reply content of ``upload`` (see the module docstring); a training failure is
    a flagged reply: ``failure`` (ConfigRecord with the reason) and ``metrics``."""
    metrics = MetricRecord({**upload.metrics, **(extra_metrics or {})})
    if upload.failure:
        return RecordDict({"failure": ConfigRecord({"reason": upload.failure}), "metrics": metrics})
    stats = {"usage": upload.usage, "importance": upload.importance, "selection-counts": upload.selection_counts}
    if upload.activation is not None:
        stats["activation"] = upload.activation
    return RecordDict({"arrays": state_to_record(upload.tensors), "stats": state_to_record(stats),
                       "metrics": metrics})


# NumPy has no bfloat16: such a tensor travels as its raw 16-bit patterns in an int16
# .npy array, and the Array's dtype field names the real dtype.
BFLOAT16 = "bfloat16"


def tensor_to_array(tensor: torch.Tensor) -> Array:
    """A Flower ``Array`` holding ``tensor``, byte for byte what ``Array(tensor)`` holds.

    Flower's own conversion goes through ``np.save`` into a BytesIO (the data is
    copied chunk by chunk, then once more by ``getvalue``); this writes the same
    .npy header and joins it with the tensor's memory in one copy. A bfloat16 tensor
    (which NumPy and ``Array(tensor)`` cannot hold) is sent as its bits in an int16
    .npy array with ``dtype="bfloat16"``: 2 bytes an element, like float16.
    """
    tensor = tensor.detach().cpu().contiguous()
    bf16 = tensor.dtype == torch.bfloat16
    array = (tensor.view(torch.int16) if bf16 else tensor).numpy()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    data = b"".join((header.getvalue(), array.reshape(-1).view(np.uint8)))
    return Array(dtype=BFLOAT16 if bf16 else str(array.dtype), shape=tuple(array.shape), stype=SType.NUMPY,
                 data=data)


def state_to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """``ArrayRecord(tensors)`` with one copy per tensor (see :func:`tensor_to_array`)."""
    return ArrayRecord({key: tensor_to_array(value) for key, value in tensors.items()})


def array_to_tensor(array: Array) -> torch.Tensor:
    """The tensor of a Flower ``Array`` as a read-only view of its bytes (no copy).

    ``Array.numpy()`` (what ``to_torch_state_dict`` uses) reads the .npy data back
    through a BytesIO in 256 KB pieces into a new array; this parses the header and
    maps the data in place. The tensor shares the message's immutable bytes: it must
    not be modified in place (loading it into a model, or aggregating it, copies).
    Raises ValueError on anything but a well-formed, non-object .npy array (a
    Fortran-ordered one, never sent by this project, is read by numpy and copied).
    """
    if array.stype != SType.NUMPY:
        raise ValueError(f"unsupported array serialisation {array.stype!r}")
    data = array.data
    # BytesIO shares a ``bytes`` object but copies any other buffer (a received array
    # can hold a NumPy view of Ray's shared memory, see hfedmoe.fl.ray_transport):
    # parse the header from its own bytes.
    stream = io.BytesIO(data if isinstance(data, bytes) else npy_header(data))
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    bf16 = array.dtype == BFLOAT16
    if bf16 and dtype != np.int16:
        raise ValueError(f"a bfloat16 array must hold int16 bit patterns, its header says {dtype}")
    offset = stream.tell()
    count = math.prod(shape)
    nbytes = len(data) if isinstance(data, bytes) else memoryview(data).nbytes
    if nbytes != offset + count * dtype.itemsize:
        raise ValueError(f"array data holds {nbytes - offset} bytes, its header says {count * dtype.itemsize}")
    if fortran_order:  # never produced by this project; take numpy's own path
        if bf16:
            raise ValueError("a bfloat16 array must be C-ordered")
        return torch.from_numpy(array.numpy().copy(order="C"))
    values = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(values)
    return tensor.view(torch.bfloat16) if bf16 else tensor


def npy_header(data) -> bytes:
    """The .npy header of the buffer ``data`` (magic, version, length, dict) as bytes."""
    view = memoryview(data).cast("B")
    if len(view) < 10:
        raise ValueError("array data is shorter than a .npy header")
    length_bytes = 2 if view[6] == 1 else 4  # format 1.0: uint16 length; 2.0 and 3.0: uint32
    size = int.from_bytes(view[8:8 + length_bytes], "little")
    return bytes(view[:8 + length_bytes + size])


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """``record.to_torch_state_dict()`` without copying the data (see :func:`array_to_tensor`)."""
    return {key: array_to_tensor(value) for key, value in record.items()}


def drop_arrays(messages: Iterable[Message]) -> None:
    """Remove every ArrayRecord from ``messages`` (error replies have none), so their
    bytes are freed once nothing else refers to them."""
    for msg in messages:
        if msg.has_error():
            continue
        for key in [k for k, v in msg.content.items() if isinstance(v, ArrayRecord)]:
            del msg.content[key]


def all_finite(value: torch.Tensor) -> bool:
    """No NaN or infinity in ``value``: exactly ``isfinite(value).all()``, ~10x faster.

    A NaN or infinity makes the sum non-finite; a finite sum therefore proves every
    value finite. Only a non-finite sum (a bad value, or a float overflow of the sum)
    needs the element-wise check.
    """
    total = value.sum(dtype=torch.float32) if value.element_size() < 4 else value.sum()  # fp16 sums overflow
    return bool(torch.isfinite(total)) or bool(torch.isfinite(value).all())


def record_nbytes(record: ArrayRecord) -> int:
    """Serialised bytes of an ArrayRecord's arrays (tensor data plus each array's
    small .npy header, about 128 bytes; the message envelope is not counted)."""
    return sum(len(array.data) for array in record.values())


def parse_upload(msg: Message, groups: ParamGroups, reference: dict[str, torch.Tensor]) -> ReceivedUpload:
    """Validate one training reply against the global model's keys and shapes."""
    node = msg.metadata.src_node_id
    if msg.has_error():
        raise ReplyError(f"client on node {node} failed: {msg.error.reason}")
    content = msg.content
    for name in ("arrays", "stats", "metrics"):
        if name not in content:
            raise ReplyError(f"reply of node {node} has no {name!r} record")
    try:
        arrays = record_to_state(content["arrays"])
        stats = record_to_state(content["stats"])
    except (ValueError, TypeError, AttributeError) as err:
        raise ReplyError(f"reply of node {node} holds an unreadable array: {err}") from None
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
        if value.is_floating_point() and not all_finite(value):
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
    activation = stats.get("activation")  # optional: an activation-aware merge gives a client without it no weight
    if activation is not None:
        values = activation.double()
        if tuple(activation.shape) != shape or not (torch.isfinite(values).all() and (values >= 0).all()
                                                     and (values <= 1).all()):
            raise ReplyError(f"reply of node {node}: stats 'activation' must be of shape {shape}, "
                             "finite and within [0, 1]")
    num_examples = int(metrics.get("num-examples", 0))
    if num_examples < 1:
        raise ReplyError(f"reply of node {node} has no valid num-examples (must be >= 1)")
    upload = ClientUpload(
        tensors=arrays, usage=stats["usage"].float(), importance=stats["importance"].float(),
        selection_counts=stats["selection-counts"], metrics=metrics,
        activation=None if activation is None else activation.float(),
    )
    return ReceivedUpload(
        node_id=node, upload=upload,
        bytes_up=record_nbytes(content["arrays"]) + record_nbytes(content["stats"]),
        bytes_up_floor=raw_nbytes(arrays),
    )


def raw_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """The floor for sending ``tensors``: their raw element bytes, no headers."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
