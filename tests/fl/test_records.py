"""Server-side Flower logic without the Flower engine: reply validation and the HFedMoE strategy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import hfedmoe.fl.records as records_module
from hfedmoe import core
from hfedmoe.config import RunConfig
from hfedmoe.client_round import ClientUpload
from hfedmoe.fl.records import (
    ReplyError,
    array_to_tensor,
    encode_upload,
    parse_upload,
    record_nbytes,
    record_to_state,
    state_to_record,
    tensor_to_array,
)
from hfedmoe.fl.strategy import HFedMoE
from hfedmoe.moe import ParamGroups
from hfedmoe.moe.modular import ModularMoEAccess

from builders import L, S, tiny_moe

NODE_A, NODE_B, NODE_C = 7, 9, 11


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower 1.41 reads run/node/task ids of the current process to create a message."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def tiny() -> tuple[ParamGroups, dict[str, torch.Tensor]]:
    model = tiny_moe()  # 2 MoE layers x 4 experts, top-2, 3 classes
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ModularMoEAccess(model).param_groups(), state


def instruction(node_id: int) -> Message:
    return Message(content=RecordDict({}), dst_node_id=node_id, message_type=MessageType.TRAIN)


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def stats(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    usage = torch.softmax(torch.randn(L, S, generator=g), dim=-1)
    return {
        "usage": usage,
        "importance": torch.rand(L, S, generator=g) * 0.5 + 0.1,
        "selection-counts": torch.randint(0, 5, (L, S), generator=g),
    }


def reply_content(
    groups: ParamGroups,
    client_state: dict[str, torch.Tensor],
    experts: list[tuple[int, int]],
    num_examples: int = 10,
    stat: dict | None = None,
    train_loss: float = 1.0,
) -> dict:
    """The three records of a well-formed reply, as editable dicts."""
    keys = list(groups.dense) + list(groups.routers)
    for le in experts:
        keys += list(groups.experts[le])
    return {
        "arrays": {k: client_state[k] for k in keys},
        "stats": dict(stat if stat is not None else stats(0)),
        "metrics": {"num-examples": num_examples, "partition-id": 3, "train-loss": train_loss,
                    "expert-budget": 4, "experts-uploaded": len(experts)},
    }


def to_reply(to: Message, parts: dict) -> Message:
    records = {}
    if "arrays" in parts:
        records["arrays"] = ArrayRecord(parts["arrays"])
    if "stats" in parts:
        records["stats"] = ArrayRecord(parts["stats"])
    if "metrics" in parts:
        records["metrics"] = MetricRecord(parts["metrics"])
    return Message(RecordDict(records), reply_to=to)


# --- encode_upload / parse_upload ---------------------------------------------------------

def test_an_encoded_upload_parses_back_to_the_same_upload(tiny):
    groups, state = tiny
    client = perturbed(state, 4)
    parts = reply_content(groups, client, [(1, 3)], num_examples=11, stat=stats(2))
    upload = ClientUpload(tensors=parts["arrays"], usage=parts["stats"]["usage"],
                          importance=parts["stats"]["importance"], selection_counts=parts["stats"]["selection-counts"],
                          metrics=parts["metrics"])
    content = encode_upload(upload, {"decode-s": 0.25})
    received = parse_upload(Message(content, reply_to=instruction(NODE_B)), groups, state)
    back = received.upload
    assert received.node_id == NODE_B and back.num_examples == 11 and back.partition_id == 3
    assert back.metrics == {**parts["metrics"], "decode-s": 0.25}
    assert set(back.tensors) == set(upload.tensors)
    assert all(torch.equal(back.tensors[k], v) for k, v in upload.tensors.items())
    for name in ("usage", "importance", "selection_counts"):
        assert torch.equal(getattr(back, name), getattr(upload, name))
    assert received.bytes_up_floor == sum(v.numel() * v.element_size() for v in upload.tensors.values())


def test_a_training_failure_encodes_as_a_flagged_reply_without_arrays():
    failed = ClientUpload(tensors={}, usage=None, importance=None, selection_counts=None,
                          metrics={"num-examples": 5, "partition-id": 1, "expert-budget": 2},
                          failure="training failure: budget 2 < 8")
    content = encode_upload(failed)
    assert set(content) == {"failure", "metrics"}
    assert content["failure"]["reason"] == "training failure: budget 2 < 8"
    assert dict(content["metrics"]) == failed.metrics



def test_reply_metadata_names_the_client_node():
    reply = to_reply(instruction(NODE_A), {})
    assert reply.metadata.src_node_id == NODE_A


def test_parse_reply_accepts_and_splits_a_wellformed_reply(tiny):
    groups, state = tiny
    client = perturbed(state, 1)
    parts = reply_content(groups, client, [(0, 0), (1, 2)], num_examples=17, stat=stats(5))
    msg = to_reply(instruction(NODE_A), parts)
    received = parse_upload(msg, groups, state)
    update = received.upload

    assert received.node_id == NODE_A
    assert update.partition_id == 3
    assert update.num_examples == 17
    assert set(update.experts(groups)) == set(groups.experts[(0, 0)]) | set(groups.experts[(1, 2)])
    assert set(update.routers(groups)) == set(groups.routers)
    assert set(update.dense(groups)) == set(groups.dense)
    for part in (update.experts(groups), update.routers(groups), update.dense(groups)):
        for k, v in part.items():
            assert torch.equal(v, client[k])
    torch.testing.assert_close(update.usage, stats(5)["usage"])
    torch.testing.assert_close(update.importance, stats(5)["importance"])
    assert torch.equal(update.selection_counts, stats(5)["selection-counts"])
    # Array.data is the serialized (.npy) payload: tensor bytes plus a small header per tensor.
    n_tensors = len(parts["arrays"]) + len(parts["stats"])
    raw = sum(v.numel() * v.element_size() for v in [*parts["arrays"].values(), *parts["stats"].values()])
    assert received.bytes_up == record_nbytes(ArrayRecord(parts["arrays"])) + record_nbytes(ArrayRecord(parts["stats"]))
    assert raw <= received.bytes_up <= raw + 256 * n_tensors


WIRE_TENSORS = {
    "f32": torch.randn(3, 5),
    "f64": torch.randn(4, dtype=torch.float64),
    "f16": torch.randn(2, 3).half(),
    "i64": torch.arange(6).reshape(2, 3),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
    "transposed": torch.randn(3, 4).t(),  # not contiguous: sent C-ordered
}


@pytest.mark.parametrize("name", list(WIRE_TENSORS))
def test_wire_helpers_match_flowers_own_conversion(name):
    tensor = WIRE_TENSORS[name]
    ours, flowers = tensor_to_array(tensor), Array(tensor)
    if tensor.is_contiguous():  # the same bytes as np.save
        assert (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype,
                                                                   flowers.data)
    else:  # Flower keeps the Fortran order of a transposed tensor; ours is sent C-ordered
        assert b"'fortran_order': False" in ours.data and b"'fortran_order': True" in flowers.data
    for array in (ours, flowers):
        back = array_to_tensor(array)
        assert back.dtype == tensor.dtype and back.shape == tensor.shape and torch.equal(back, tensor)


def test_record_round_trip_without_copies():
    record = state_to_record(WIRE_TENSORS)
    assert list(record) == list(WIRE_TENSORS)
    state = record_to_state(record)
    for key, tensor in WIRE_TENSORS.items():
        assert torch.equal(state[key], tensor)
    assert state["f32"].untyped_storage().nbytes() == 15 * 4  # a view of the record's bytes
    assert torch.equal(ArrayRecord(WIRE_TENSORS).to_torch_state_dict()["i64"], state["i64"])


@pytest.mark.parametrize("receiver", ["view", "copy"])
def test_ray_moves_array_data_out_of_band(receiver):
    """What a Ray actor call does with a message's record once hfedmoe.fl.ray_transport
    is registered: the array data leaves the pickle as out-of-band buffers; the
    receiver reads them in place ("view", a client) or copies them into bytes ("copy",
    the server, which holds every reply of a round)."""
    import pickle

    import numpy as np
    import ray.cloudpickle
    import ray.util

    from hfedmoe.fl.ray_transport import use_out_of_band_arrays

    record = state_to_record(WIRE_TENSORS)
    data_bytes = sum(len(a.data) for a in record.values())
    in_band = len(ray.cloudpickle.dumps(record, protocol=5))  # nothing registered: the data in the pickle
    assert in_band > data_bytes
    use_out_of_band_arrays(receiver)
    try:
        buffers: list[pickle.PickleBuffer] = []
        payload = ray.cloudpickle.dumps(record, protocol=5, buffer_callback=buffers.append)
        assert len(payload) < in_band - data_bytes + 2000  # metadata only
        assert sum(b.raw().nbytes for b in buffers) == data_bytes
        received = ray.cloudpickle.loads(payload, buffers=[b.raw() for b in buffers])
        sent = [np.frombuffer(b.raw(), dtype=np.uint8) for b in buffers]
        for (key, tensor), array in zip(WIRE_TENSORS.items(), received.values()):
            in_place = any(np.shares_memory(np.frombuffer(array.data, np.uint8), s) for s in sent)
            assert in_place == (receiver == "view")
            assert isinstance(array.data, bytes) == (receiver == "copy")
            assert len(array.data) == len(record[key].data)
            back = array_to_tensor(array)
            assert torch.equal(back, tensor) and back.dtype == tensor.dtype
            assert tensor.numel() == 0 or np.shares_memory(back.numpy(), np.frombuffer(array.data, np.uint8))
            assert np.array_equal(array.numpy(), tensor.numpy())  # Flower's own reader too
        assert record_nbytes(received) == data_bytes
        # Without a buffer callback (plain pickling, e.g. a process pool) the data stays in band.
        again = ray.cloudpickle.loads(ray.cloudpickle.dumps(record, protocol=5))
        assert torch.equal(array_to_tensor(again["f32"]), WIRE_TENSORS["f32"])
    finally:
        ray.util.deregister_serializer(Array)


def test_finite_check_is_exact():
    from hfedmoe.fl.records import all_finite

    big = torch.full((4,), 3e38)  # every value finite, their float32 sum is not
    assert all_finite(big) and all_finite(torch.full((9,), 60000.0).half())
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float16, torch.float64):
            value = torch.zeros(5, dtype=dtype)
            value[3] = bad
            assert not all_finite(value)
            assert not all_finite(torch.cat([big.to(dtype) if dtype != torch.float16 else value, value]))


def test_unreadable_array_is_a_reply_error(tiny):
    groups, state = tiny
    parts = reply_content(groups, perturbed(state, 1), [(0, 0)])
    msg = to_reply(instruction(NODE_A), parts)
    key = groups.dense[0]
    good = msg.content["arrays"][key]
    msg.content["arrays"][key] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-4])
    with pytest.raises(ReplyError, match=f"node {NODE_A} holds an unreadable array"):
        parse_upload(msg, groups, state)
    with pytest.raises(ValueError, match="unsupported .npy format|magic"):
        array_to_tensor(Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"not an npy payload"))


def _break_unknown_key(p, g):
    p["arrays"]["backbone.not.a.param"] = torch.zeros(2)


def _break_shape(p, g):
    key = g.dense[0]
    p["arrays"][key] = torch.zeros(3, 3)


def _break_nan(p, g):
    key = g.routers[0]
    bad = p["arrays"][key].clone()
    bad[0, 0] = float("nan")
    p["arrays"][key] = bad


def _break_inf(p, g):
    key = g.experts[(0, 0)][0]
    bad = p["arrays"][key].clone()
    bad.view(-1)[0] = float("inf")
    p["arrays"][key] = bad


def _break_missing_dense(p, g):
    del p["arrays"]["classifier.weight"]


def _break_missing_router(p, g):
    del p["arrays"][g.routers[1]]


def _break_incomplete_expert(p, g):
    del p["arrays"][g.experts[(0, 0)][2]]


def _break_stats_shape(p, g):
    p["stats"]["usage"] = torch.ones(L, S + 1) / (S + 1)


def _break_stats_missing(p, g):
    del p["stats"]["selection-counts"]


def _break_num_examples(p, g):
    del p["metrics"]["num-examples"]


def _break_no_stats_record(p, g):
    del p["stats"]


@pytest.mark.parametrize(
    "breaker, message",
    [
        (_break_unknown_key, r"unknown tensor.*backbone\.not\.a\.param"),
        (_break_shape, r"has shape \(3, 3\), expected"),
        (_break_nan, r"NaN or infinite"),
        (_break_inf, r"NaN or infinite"),
        (_break_missing_dense, r"lacks dense/router tensor.*classifier\.weight"),
        (_break_missing_router, r"lacks dense/router tensor.*router"),
        (_break_incomplete_expert, r"uploads expert \(0, 0\) without .*experts\.0\.fc2\.weight"),
        (_break_stats_shape, r"stats 'usage' missing or not of shape \(2, 4\)"),
        (_break_stats_missing, r"stats 'selection-counts' missing"),
        (_break_num_examples, r"no valid num-examples"),
        (_break_no_stats_record, r"has no 'stats' record"),
    ],
)
def test_parse_reply_rejects_malformed_replies(tiny, breaker, message):
    groups, state = tiny
    parts = reply_content(groups, perturbed(state, 1), [(0, 0), (1, 1)])
    breaker(parts, groups)
    msg = to_reply(instruction(NODE_B), parts)
    with pytest.raises(ReplyError, match=message) as info:
        parse_upload(msg, groups, state)
    assert f"node {NODE_B}" in str(info.value)


def test_parse_reply_rejects_an_error_reply(tiny):
    groups, state = tiny
    msg = Message(Error(code=0, reason="out of memory"), reply_to=instruction(NODE_C))
    with pytest.raises(ReplyError, match=f"node {NODE_C} failed: out of memory"):
        parse_upload(msg, groups, state)


# --- HFedMoE strategy -------------------------------------------------------------------

RUN_CONFIG = RunConfig(clients=3).to_json()


def make_strategy(groups, budgets=None) -> HFedMoE:
    budgets = budgets or {NODE_A: L * S, NODE_B: L, NODE_C: 5}
    return HFedMoE(groups, budgets, RUN_CONFIG, tau=0.05, gate_normalize=True)


def test_configure_train_sends_each_node_its_budget(tiny):
    groups, state = tiny
    strategy = make_strategy(groups)
    arrays = ArrayRecord(state)
    messages = list(strategy.configure_train(4, arrays, ConfigRecord({"lr": 0.5}), grid=object()))
    assert [m.metadata.dst_node_id for m in messages] == [NODE_A, NODE_B, NODE_C]
    budgets = {NODE_A: L * S, NODE_B: L, NODE_C: 5}
    for m in messages:
        assert m.metadata.message_type == MessageType.TRAIN
        config = m.content["config"]
        assert config["expert-budget"] == budgets[m.metadata.dst_node_id]
        assert config["run-config"] == RUN_CONFIG
        assert RunConfig.from_json(config["run-config"]).clients == 3
        assert config["server-round"] == 4
        assert config["lr"] == 0.5
        sent = m.content["arrays"].to_torch_state_dict()
        assert set(sent) == set(state)
        assert all(torch.equal(sent[k], state[k]) for k in state)
    assert strategy.round_info[4]["bytes_down"] == 3 * record_nbytes(arrays)


def test_strategy_needs_a_node():
    with pytest.raises(ValueError, match="at least one client"):
        HFedMoE(ParamGroups({}, [], [], 0, 0), {}, RUN_CONFIG)


def _round(groups, state, strategy, server_round=1):
    """configure_train, then the well-formed replies of A and B (plus the instruction for C)."""
    messages = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(server_round, ArrayRecord(state), ConfigRecord({}), grid=object())
    }
    a_state, b_state = perturbed(state, 11), perturbed(state, 12)
    a = reply_content(groups, a_state, [(0, 0)], num_examples=30, stat=stats(21), train_loss=2.0)
    b = reply_content(groups, b_state, [(0, 0), (1, 1)], num_examples=10, stat=stats(22), train_loss=1.0)
    return messages, (a_state, a), (b_state, b)


def _check_two_client_aggregate(groups, state, new, a_state, b_state):
    assert set(new) == set(state)
    n_a, n_b = 30, 10
    # Eq. 17: expert (0,0) is the num_examples-weighted mean of A and B
    for k in groups.experts[(0, 0)]:
        torch.testing.assert_close(new[k], (n_a * a_state[k] + n_b * b_state[k]) / (n_a + n_b))
    # (1,1): only B uploaded it
    for k in groups.experts[(1, 1)]:
        assert torch.equal(new[k], b_state[k])
    # nobody uploaded the others: previous global value, exactly
    for le, names in groups.experts.items():
        if le not in {(0, 0), (1, 1)}:
            for k in names:
                assert torch.equal(new[k], state[k]), f"expert {le} changed: {k}"
    # dense: FedAvg
    for k in groups.dense:
        torch.testing.assert_close(new[k], (n_a * a_state[k] + n_b * b_state[k]) / (n_a + n_b))
    # routers: alpha-weighted sum (Eq. 18-21)
    alpha = core.gate_weights(
        torch.stack([stats(21)["usage"], stats(22)["usage"]]),
        torch.stack([stats(21)["importance"], stats(22)["importance"]]),
        tau=0.05, normalize=True,
    )
    assert not torch.allclose(alpha, torch.full((2,), 0.5))  # the test distinguishes alpha from a plain mean
    for k in groups.routers:
        torch.testing.assert_close(new[k], alpha[0] * a_state[k] + alpha[1] * b_state[k])
    return alpha


def test_aggregate_train_sparse_experts_dense_and_routers(tiny):
    groups, state = tiny
    strategy = make_strategy(groups)
    messages, (a_state, a), (b_state, b) = _round(groups, state, strategy)
    replies = [to_reply(messages[NODE_A], a), to_reply(messages[NODE_B], b)]
    arrays, metrics = strategy.aggregate_train(1, replies)

    alpha = _check_two_client_aggregate(groups, state, arrays.to_torch_state_dict(), a_state, b_state)
    info = strategy.round_info[1]
    # Node C was asked to train but never answered: recorded as a failed client-round.
    assert info["failures"] == [{"node_id": NODE_C, "id": -1, "reason": "no reply within the round timeout"}]
    assert info["alpha"] == pytest.approx(alpha.tolist())
    assert [row["node_id"] for row in info["clients"]] == [NODE_A, NODE_B]
    assert [row["num_examples"] for row in info["clients"]] == [30, 10]
    assert [row["experts_uploaded"] for row in info["clients"]] == [1, 2]
    assert info["bytes_up"] == sum(row["bytes_up"] for row in info["clients"]) > 0
    assert metrics["clients"] == 2 and metrics["failures"] == 1
    assert metrics["train-loss"] == pytest.approx((30 * 2.0 + 10 * 1.0) / 40)


def test_aggregate_train_keeps_one_copy_of_the_new_model_and_releases_the_replies(tiny):
    """Flower's loop holds the replies while the next round's clients train: merged, their
    arrays go; the server's own tensors of the new model are views of the record it sends."""
    groups, state = tiny
    strategy = make_strategy(groups)
    messages, (a_state, a), (b_state, b) = _round(groups, state, strategy)
    replies = [to_reply(messages[NODE_A], a), to_reply(messages[NODE_B], b)]
    arrays, _ = strategy.aggregate_train(1, replies)

    assert all("arrays" not in r.content and "stats" not in r.content for r in replies)
    assert all("metrics" in r.content for r in replies)  # the small records stay
    own = strategy.state_of(arrays)
    assert own is strategy.last_aggregated_state
    for key, tensor in own.items():  # each tensor's data lies inside the record's bytes of that key
        start = np.frombuffer(arrays[key].data, dtype=np.uint8).ctypes.data
        assert start <= tensor.data_ptr() < start + len(arrays[key].data), key
    _check_two_client_aggregate(groups, state, own, a_state, b_state)


def test_aggregate_train_drops_a_malformed_reply_and_keeps_the_others(tiny):
    groups, state = tiny
    strategy = make_strategy(groups)
    messages, (a_state, a), (b_state, b) = _round(groups, state, strategy)
    bad = reply_content(groups, perturbed(state, 13), [(1, 3)], num_examples=1000)
    bad["arrays"]["classifier.bias"] = torch.full_like(state["classifier.bias"], float("nan"))
    replies = [to_reply(messages[NODE_A], a), to_reply(messages[NODE_C], bad), to_reply(messages[NODE_B], b)]
    arrays, metrics = strategy.aggregate_train(1, replies)

    _check_two_client_aggregate(groups, state, arrays.to_torch_state_dict(), a_state, b_state)
    failures = strategy.round_info[1]["failures"]
    assert len(failures) == 1
    assert failures[0]["node_id"] == NODE_C
    assert "NaN" in failures[0]["reason"] and "classifier.bias" in failures[0]["reason"]
    assert metrics["clients"] == 2 and metrics["failures"] == 1


def test_aggregate_train_with_no_usable_reply_keeps_the_model(tiny):
    groups, state = tiny
    strategy = make_strategy(groups)
    messages, (a_state, a), (b_state, b) = _round(groups, state, strategy)
    del a["metrics"]["num-examples"]
    del b["arrays"][groups.experts[(1, 1)][0]]
    error = Message(Error(code=0, reason="crashed"), reply_to=messages[NODE_C])
    replies = [to_reply(messages[NODE_A], a), to_reply(messages[NODE_B], b), error]
    assert strategy.aggregate_train(1, replies) == (None, None)
    info = strategy.round_info[1]
    assert [f["node_id"] for f in info["failures"]] == [NODE_A, NODE_B, NODE_C]
    assert info["alpha"] == [] and info["clients"] == []
    # the strategy's view of the global model is untouched: a later round still
    # aggregates against the state it sent
    assert all(torch.equal(strategy.global_state[k], state[k]) for k in state)
    messages2, (a2_state, a2), (b2_state, b2) = _round(groups, state, strategy, server_round=2)
    arrays, _ = strategy.aggregate_train(2, [to_reply(messages2[NODE_A], a2), to_reply(messages2[NODE_B], b2)])
    _check_two_client_aggregate(groups, state, arrays.to_torch_state_dict(), a2_state, b2_state)


def _negative_usage(stat):
    stat["usage"] = stat["usage"].clone()
    stat["usage"][0, 0] = -0.5


def _nan_importance(stat):
    stat["importance"] = stat["importance"].clone()
    stat["importance"][:] = float("nan")


@pytest.mark.parametrize(
    "corrupt",
    [
        _negative_usage,
        _nan_importance,
    ],
)
def test_aggregate_train_drops_a_reply_with_invalid_stats(tiny, corrupt):
    groups, state = tiny
    strategy = make_strategy(groups)
    messages, (a_state, a), (b_state, b) = _round(groups, state, strategy)
    bad = reply_content(groups, perturbed(state, 13), [(1, 3)], num_examples=5, stat=stats(23))
    corrupt(bad["stats"])
    replies = [to_reply(messages[NODE_A], a), to_reply(messages[NODE_C], bad), to_reply(messages[NODE_B], b)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert [f["node_id"] for f in strategy.round_info[1]["failures"]] == [NODE_C]
    _check_two_client_aggregate(groups, state, arrays.to_torch_state_dict(), a_state, b_state)


def test_bfloat16_tensors_travel_as_their_bits_and_come_back_identical():
    values = torch.randn(3, 5).to(torch.bfloat16)
    array = tensor_to_array(values)
    assert array.dtype == "bfloat16" and len(array.data) < values.numel() * 2 + 200  # 2 bytes an element
    back = array_to_tensor(array)
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), values.view(torch.int16))
    record = state_to_record({"w": values, "b": torch.ones(2)})
    assert {k: v.dtype for k, v in record_to_state(record).items()} == {"w": torch.bfloat16, "b": torch.float32}


def test_a_bfloat16_array_whose_data_is_not_16_bit_is_refused():
    array = tensor_to_array(torch.ones(4))  # float32 data ...
    array.dtype = "bfloat16"  # ... claiming to be bfloat16
    with pytest.raises(ValueError, match="bfloat16 array must hold int16"):
        array_to_tensor(array)


@pytest.mark.parametrize("kind", ["oversized", "mistyped"])
def test_an_oversized_or_mistyped_tensor_is_refused_without_being_copied(tiny, monkeypatch, kind):
    """The shape and dtype are read from the .npy header and checked against the global
    model while the tensor is still a view of the message's bytes: nothing is copied."""
    groups, state = tiny
    parts = reply_content(groups, perturbed(state, 1), [(0, 0)])
    key = groups.dense[0]
    parts["arrays"][key] = torch.zeros(1000, *state[key].shape) if kind == "oversized" \
        else state[key].to(torch.float64)
    msg = to_reply(instruction(NODE_B), parts)
    views = []
    real = records_module.array_to_tensor

    def watched(array):
        tensor = real(array)
        start = np.frombuffer(array.data, dtype=np.uint8).ctypes.data
        views.append(start <= tensor.data_ptr() < start + len(array.data))
        return tensor

    monkeypatch.setattr(records_module, "array_to_tensor", watched)
    with pytest.raises(ReplyError, match="has shape \\(1000," if kind == "oversized" else "has dtype torch.float64"):
        parse_upload(msg, groups, state)
    assert views and all(views), "a received tensor was copied before it was checked"


def test_a_reply_to_an_earlier_round_or_another_run_is_refused(tiny):
    groups, state = tiny
    strategy = make_strategy(groups)
    round1, (a_state, a), (b_state, b) = _round(groups, state, strategy, server_round=1)
    round2, _, _ = _round(groups, state, strategy, server_round=2)
    late = to_reply(round1[NODE_A], a)  # node A's answer to round 1, arriving in round 2
    saved = TaskIdentity._run_id
    TaskIdentity.run_id = saved + 1  # a client of another run
    try:
        foreign = to_reply(Message(content=RecordDict({}), dst_node_id=NODE_C, message_type=MessageType.TRAIN,
                                   group_id="2"), a)
    finally:
        TaskIdentity.run_id = saved
    strategy.aggregate_train(2, [late, foreign, to_reply(round2[NODE_B], b)])
    failures = strategy.round_info[2]["failures"]
    stale = [f for f in failures if f.get("kind") == "stale-reply"]
    assert [f["node_id"] for f in stale] == [NODE_A, NODE_C]
    assert "answers round 1, not round 2" in stale[0]["reason"]
    assert f"belongs to run {saved + 1}" in stale[1]["reason"]
    assert [c["node_id"] for c in strategy.round_info[2]["clients"]] == [NODE_B]  # only B's update is merged
