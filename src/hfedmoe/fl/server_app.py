"""Flower ServerApp: build the global model, discover clients, run HFedMoE rounds.

``app`` is what ``flwr run .`` loads (its configuration comes from
``[tool.flwr.app.config]``); ``hfedmoe run`` builds its own with
:func:`make_server_app` and a ready :class:`~hfedmoe.config.RunConfig`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Protocol

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.fl.ray_transport import use_out_of_band_arrays
from hfedmoe.fl.records import record_nbytes, state_to_record
from hfedmoe.fl.strategy import HFedMoE, RunAborted
from hfedmoe.budgets import client_budgets
from hfedmoe.methods import server_merges
from hfedmoe.moe import make_access
from hfedmoe.export import export_model
from hfedmoe.rundir import RunRecorder, default_run_dir
from hfedmoe.recipe import (
    build_model,
    label_names,
    load_test_batches,
    model_spec,
    resolve_evaluation,
    union_label_names,
)
from hfedmoe.recipe.device import agreed_dtype
from hfedmoe.training import evaluate, set_torch_threads


class Reporter(Protocol):
    """Progress sink (the CLI's rich display, or Flower's log)."""

    def on_start(self, info: dict) -> None: ...
    def on_round(self, row: dict) -> None: ...
    def on_end(self, summary: dict) -> None: ...


class LogReporter:
    def on_start(self, info: dict) -> None:
        log(INFO, "hfedmoe: %s", info)

    def on_round(self, row: dict) -> None:
        log(INFO, "hfedmoe round %s: accuracy %.4f loss %.4f", row["round"], row["accuracy"], row["loss"])

    def on_end(self, summary: dict) -> None:
        log(INFO, "hfedmoe summary: %s", summary)


@dataclass
class NodeReport:
    """What a client node states about itself before round 1 (from its node config)."""

    partition_id: int
    num_partitions: int
    mem_budget_bytes: int = 0  # 0: the node states none
    own_data: bool = False  # it trains on its own file, not a partition of the shared dataset
    label_names: list[str] = field(default_factory=list)  # the classes in its own file


def discover_nodes(grid: Grid, expected: int | None, timeout_s: float = 600.0,
                   run_config_json: str = "") -> dict[int, NodeReport]:
    """Wait for the client nodes; ask each for its partition id, memory budget and,
    when it holds its own data, the label names in it.

    Returns node id -> :class:`NodeReport`.

    ``expected=None`` (``flwr run``: the federation decides how many SuperNodes
    exist) takes the count from the first node's ``num-partitions``.
    """
    deadline = time.monotonic() + timeout_s

    def wait_for(count: int) -> list[int]:
        while len(nodes := list(grid.get_node_ids())) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {count} client nodes connected within {timeout_s:.0f}s")
            time.sleep(0.5)
        return nodes

    if expected is None:
        expected = next(iter(_query(grid, wait_for(1)[:1], timeout_s, run_config_json).values())).num_partitions

    replies = _query(grid, wait_for(expected), timeout_s, run_config_json)
    counts = {r.num_partitions for r in replies.values()}
    if counts != {expected}:
        raise ConfigError(f"client nodes report num-partitions {sorted(counts)}; this run needs {expected}")
    ids = sorted(r.partition_id for r in replies.values())
    if ids != list(range(expected)):
        raise ConfigError(f"client nodes report partition ids {ids}; expected each of 0..{expected - 1} once")
    own = sorted(r.partition_id for r in replies.values() if r.own_data)
    if own and len(own) != expected:
        raise ConfigError(f"partitions {own} hold their own data (data-path) and the others a partition of the "
                          "shared dataset: give every SuperNode a data-path, or none")
    return replies


def _query(grid: Grid, nodes: list[int], timeout_s: float, run_config_json: str) -> dict[int, NodeReport]:
    """node id -> its :class:`NodeReport`, from each node's node config (and own data)."""
    messages = [
        Message(content=RecordDict({"config": ConfigRecord({"run-config": run_config_json} if run_config_json
                                                           else {})}),
                dst_node_id=n, message_type=MessageType.QUERY)
        for n in nodes
    ]
    found = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to report its partition: "
                               f"{reply.error.reason}")
        config = reply.content["config"]
        found[reply.metadata.src_node_id] = NodeReport(
            partition_id=int(config["partition-id"]), num_partitions=int(config["num-partitions"]),
            mem_budget_bytes=int(config["mem-budget-bytes"]) if "mem-budget-bytes" in config else 0,
            own_data=bool(config["own-data"]) if "own-data" in config else False,
            label_names=[str(x) for x in config["label-names"]] if "label-names" in config else [])
    if len(found) != len(nodes):
        raise RuntimeError(f"{len(nodes) - len(found)} client node(s) did not answer the partition query")
    return found


def run_server(grid: Grid, cfg: RunConfig, reporter: Reporter | None = None, clients_from_nodes: bool = False) -> dict:
    """The whole federated run on the server side; returns the summary.

    ``clients_from_nodes``: take the number of clients from the connected
    SuperNodes (``flwr run``) instead of ``cfg.clients`` (``hfedmoe run``).
    """
    reporter = reporter or LogReporter()
    reports = discover_nodes(grid, None if clients_from_nodes else cfg.clients, run_config_json=cfg.to_json())
    cfg.clients = len(reports)
    cfg.validate()
    cfg.dtype = agreed_dtype(cfg)  # every client trains, and every message travels, in this dtype
    sites = any(r.own_data for r in reports.values())
    if sites:  # recorded (config.json, exports): `hfedmoe eval` then knows the data stayed on the sites
        cfg.extra["own_data"] = True
    agree_labels(cfg, reports)
    evaluation = resolve_evaluation(cfg, sites)
    cfg.evaluation = evaluation
    set_torch_threads()
    model = build_model(cfg, pretrained=True)
    access = make_access(model)
    test = load_test_batches(cfg) if evaluation in ("server", "both") else None
    partitions = {node: (r.partition_id, r.mem_budget_bytes) for node, r in reports.items()}
    node_memory = {pid: mem for pid, mem in partitions.values() if mem}
    budgets = client_budgets(cfg, access, node_memory)
    recorder = RunRecorder(cfg.out or default_run_dir(), cfg)

    by_partition = sorted(partitions.items(), key=lambda kv: kv[1][0])
    expert_merge, router_weights = server_merges(cfg.method, cfg.expert_agg, cfg.gate_agg)  # baselines: their own
    strategy = HFedMoE(
        access.param_groups(),
        {node: budgets[pid].expert_budget for node, (pid, _) in by_partition},
        cfg.to_json(), cfg.tau, cfg.gate_normalize,
        node_config={node: budgets[pid].message_config() for node, (pid, _) in by_partition},
        expert_merge=expert_merge, router_weights=router_weights, max_empty_rounds=cfg.max_empty_rounds,
        node_partitions={node: pid for node, (pid, _) in by_partition}, participants=cfg.round_participants,
        norm_screen=cfg.norm_screen, robust_agg=cfg.robust_agg, trim_fraction=cfg.trim_fraction,
        identify_nodes=lambda g, nodes: identify_nodes(g, nodes, cfg),
    )
    reporter.on_start({
        "run_dir": str(recorder.dir), "clients": cfg.clients, "clients_per_round": cfg.participants_per_round(),
        "rounds": cfg.rounds,
        "budgets": [b.expert_budget for b in budgets], "mem_budgets": [b.mem_budget_bytes for b in budgets],
        "moe_layers": access.num_layers, "experts_per_layer": access.num_experts,
        "evaluation": evaluation, "client_data": "own files" if sites else "shared dataset",
    })

    start_round = recorder.resume_round
    strategy.round_offset = start_round
    checkpoint_s: list[float] = []  # time the server spent handing over the last checkpoint (the write runs
    # in the background; this includes waiting for the previous one), reported in the next row
    write_cpu_s: list[float] = []  # CPU seconds of the background write finished at that hand-over

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if start_round and server_round == 0:
            # Resuming: the checkpointed model was evaluated and logged before.
            last = recorder.rows[-1]
            return MetricRecord({"accuracy": last["accuracy"], "loss": last["loss"]})
        server_round += start_round
        started = time.perf_counter()
        state = strategy.state_of(arrays)
        federated = None
        if evaluation in ("federated", "both"):
            federated = federated_evaluate(grid, dict(strategy.node_partitions), arrays, cfg.to_json(), server_round,
                                           cfg.round_timeout)
        access.load_state_dict(state, strict=True)
        if test is not None:
            scores = evaluate(model, test, task=cfg.task)
        elif federated["examples"]:
            scores = federated
        else:
            raise RunAborted(f"round {server_round}: no client returned an evaluation "
                             f"({'; '.join(federated['failures']) or 'none holds evaluation data'})")
        info = strategy.round_info.get(server_round, {})
        # Seconds spent in this row's wall-time window (from the previous row's log to
        # this one's): the strategy's phases, this evaluation, the previous checkpoint.
        timing = {**info.get("timing", {}), "eval_s": time.perf_counter() - started,
                  "checkpoint_s": checkpoint_s.pop() if checkpoint_s else 0.0,
                  "checkpoint_write_cpu_s": write_cpu_s.pop() if write_cpu_s else 0.0}
        row = {
            "round": server_round,
            "accuracy": scores["accuracy"],
            "loss": scores["loss"],
            **({"perplexity": scores["perplexity"]} if "perplexity" in scores else {}),
            "bytes_up": info.get("bytes_up", 0),
            "bytes_down": info.get("bytes_down", 0),
            "model_bytes": info.get("model_bytes", 0),
            "gate_alpha": info.get("alpha", []),
            "participants": info.get("participants", []),  # partition ids sampled for the round
            "failures": info.get("failures", []),
            "clients": info.get("clients", []),
            "timing": {k: round(v, 4) for k, v in timing.items()},
            **({"federated": federated} if federated is not None else {}),
        }
        reporter.on_round(recorder.log_round(row))
        if server_round > 0 and recorder.checkpoint_due(server_round, cfg.rounds):
            started = time.perf_counter()
            recorder.save_checkpoint(server_round, state)
            checkpoint_s.append(time.perf_counter() - started)
            # The hand-over waited for the previous write: its CPU seconds, spent in the
            # background while this round's clients trained (on this machine's cores)
            write_cpu_s.append(recorder.last_write_cpu_s)
        if server_round > 0 and cfg.export_every and server_round % cfg.export_every == 0:
            # the model is loaded with `state`
            export_model(cfg, model, recorder.dir / "exports" / f"round-{server_round}", label_names(cfg))
        return MetricRecord({"accuracy": scores["accuracy"], "loss": scores["loss"]})

    # On the host: messages and checkpoints are built from it (a no-op for a CPU model).
    initial = recorder.resume_state if recorder.resume_state is not None else \
        {k: v.detach().cpu() for k, v in access.state_dict().items()}
    aborted = None
    if start_round < cfg.rounds:
        try:
            result = strategy.start(grid, state_to_record(initial), num_rounds=cfg.rounds - start_round,
                                    timeout=cfg.round_timeout, evaluate_fn=evaluate_fn)
            final_state = strategy.state_of(result.arrays) if len(result.arrays) else initial
        except RunAborted as err:
            aborted = str(err)
            final_state = strategy.last_aggregated_state or initial
    else:  # the checkpoint already holds every requested round
        final_state = initial
    model_info = {"spec": model_spec(cfg), "label_names": label_names(cfg)}

    def write_model(state, directory):  # final/: a Hugging Face (or PEFT) directory, see hfedmoe.export
        access.load_state_dict(state, strict=True)
        export_model(cfg, model, directory, model_info["label_names"])

    summary = recorder.finish(final_state, model_info, {"aborted": aborted} if aborted else None, write_model)
    reporter.on_end(summary)
    return summary


def agree_labels(cfg: RunConfig, reports: dict[int, NodeReport]) -> None:
    """Fix the classification label set before round 1 when the clients hold their own
    data: ``--labels`` when given (every name a node reports must be in it), else the
    union of the names the nodes report. Only names cross the wire, never data."""
    reported = {r.partition_id: r.label_names for r in reports.values() if r.own_data}
    if not reported or cfg.task != "classification":
        return
    if cfg.labels:
        for pid, names in sorted(reported.items()):
            unknown = sorted(set(names) - set(cfg.labels))
            if unknown:
                raise ConfigError(f"partition {pid}'s data holds label(s) {unknown[:5]} outside --labels "
                                  f"{cfg.labels}: add them to labels (run config) or drop those rows")
        return
    agreed = union_label_names(list(reported.values()))
    if len(agreed) < 2:
        raise ConfigError(f"the clients' data together holds the single label {agreed}; classification needs "
                          "at least two")
    cfg.labels = agreed


def identify_nodes(grid: Grid, nodes: list[int], cfg: RunConfig) -> dict[int, int]:
    """Node id -> partition id of nodes that connected after the start (a restarted
    SuperNode); a node that does not answer within a minute, or reports another
    federation's num-partitions, is left out (asked again next round)."""
    try:
        reports = _query(grid, nodes, min(60.0, cfg.round_timeout), cfg.to_json())
    except RuntimeError as err:
        log(WARNING, "hfedmoe: a new node did not identify itself: %s", err)
        return {}
    return {node: r.partition_id for node, r in reports.items()
            if r.num_partitions == cfg.clients and 0 <= r.partition_id < cfg.clients}


def federated_evaluate(grid: Grid, node_partitions: dict[int, int], arrays: ArrayRecord,
                       run_config_json: str, server_round: int, timeout_s: float) -> dict:
    """Every client scores the global model on its held-out data; the server pools the
    scores, weighted by what each client scored (examples; response tokens for causal-lm).

    Returns accuracy, loss, examples, the partition ids that answered (``clients``),
    each one's own accuracy and examples (``per_client``, keyed by partition id), the
    failures (a client that errs or times out is left out, not fatal) and the bytes
    sent (``bytes_down``; not in the row's training ``bytes_down``).
    """
    config = ConfigRecord({"run-config": run_config_json, "server-round": server_round})
    messages = [Message(content=RecordDict({"arrays": arrays, "config": config}), dst_node_id=node,
                        message_type=MessageType.EVALUATE) for node in sorted(node_partitions)]
    answered, failures = [], []
    per_client: dict[str, dict] = {}
    weight = correct = loss = 0.0
    examples = 0
    replies = list(grid.send_and_receive(messages, timeout=timeout_s))
    for reply in replies:
        pid = node_partitions[reply.metadata.src_node_id]
        if reply.has_error():
            failures.append(f"partition {pid}: {reply.error.reason}"[:300])
            continue
        metrics = reply.content["metrics"]
        if int(metrics["num-examples"]) == 0:
            continue  # nothing held out there
        w = float(metrics["scored"])
        weight += w
        correct += float(metrics["accuracy"]) * w
        loss += float(metrics["loss"]) * w
        examples += int(metrics["num-examples"])
        answered.append(pid)
        per_client[str(pid)] = {"accuracy": float(metrics["accuracy"]), "examples": int(metrics["num-examples"])}
    missing = len(messages) - len(replies)
    if missing:
        failures.append(f"{missing} client(s) did not answer within {timeout_s:.0f}s")
    return {"accuracy": correct / weight if weight else 0.0, "loss": loss / weight if weight else 0.0,
            "examples": examples, "clients": sorted(answered), "failures": failures,
            "per_client": dict(sorted(per_client.items(), key=lambda kv: int(kv[0]))),
            "bytes_down": record_nbytes(arrays) * len(messages)}  # the model, once to every client


def make_server_app(cfg: RunConfig | None = None, reporter: Reporter | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` (or, when None, to Flower's run config)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        if "ray" in sys.modules:  # the simulation engine: the model crosses to each client through Ray,
            use_out_of_band_arrays("view")  # which reads it in place
        if cfg is not None:
            run_server(grid, cfg, reporter)
        else:
            run_server(grid, RunConfig.from_flower_run_config(dict(context.run_config)), reporter,
                       clients_from_nodes=True)

    return server


app = make_server_app()
