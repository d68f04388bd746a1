"""HFedMoE as a Flower ``Strategy``: per-client budgets, sparse replies, Eq. 17-21.

Flower's FedAvg sends one message to all and insists every reply carries the same
keys. HFedMoE needs neither: each client gets its own expert budget, and each
uploads a different subset of experts. The server then
- averages every expert over the clients that uploaded it (Eq. 17),
- merges the routers with weights from each client's expert preference (Eq. 18-21),
- FedAvg-merges the dense parameters,
all through :mod:`hfedmoe.core`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from hfedmoe.fl.records import (
    ReceivedUpload,
    ReplyError,
    drop_arrays,
    parse_upload,
    raw_nbytes,
    record_nbytes,
    record_to_state,
    state_to_record,
)
from hfedmoe.methods.merging import (
    ExpertMerge,
    RouterWeights,
    merge_over_uploaders,
    merge_round,
    preference_weights,
)
from hfedmoe.core.robust import MIN_HOLDERS_TO_SCREEN, screen_by_norm, update_norm
from hfedmoe.moe import ParamGroups


class RunAborted(RuntimeError):
    """The run cannot make progress (e.g. every client failed several rounds running)."""


class HFedMoE(Strategy):
    """Resource-aware heterogeneous FL for MoE models (Fang et al., arXiv 2601.00583).

    Parameters
    ----------
    groups : ParamGroups
        Which state-dict keys are experts, routers and dense parameters.
    node_budgets : dict[int, int]
        Expert budget C_budget of every participating node (node id -> budget).
    run_config_json : str
        The run configuration, sent to clients inside every message.
    tau : float
        Usage threshold of Eq. 18 (default 0.05).
    gate_normalize : bool
        Normalise the gate weights alpha to sum to one (the project's default);
        False uses the paper's literal Eq. 20.
    node_config : dict[int, dict], optional
        Further per-node message entries (memory / time budgets).
    max_empty_rounds : int
        Stop the run (:class:`RunAborted`) after this many consecutive rounds in
        which no client sent a usable update; 0 never stops.
    expert_merge : ExpertMerge
        How uploaded experts are merged (default Eq. 17: each expert averaged over the
        clients that uploaded it); the run's method supplies it
        (:func:`hfedmoe.methods.server_merges`).
    router_weights : RouterWeights
        Each client's weight alpha_c in the router merge (default Eq. 18-20).
    node_partitions : dict[int, int], optional
        Partition id of every node (node id -> partition id); needed with ``participants``.
    participants : callable, optional
        Absolute round -> the partition ids that take part in it
        (:meth:`hfedmoe.config.RunConfig.round_participants`); None: every node, every round.
        Only sampled nodes get a message; an unsampled node is not a failure.
    """

    def __init__(
        self,
        groups: ParamGroups,
        node_budgets: dict[int, int],
        run_config_json: str,
        tau: float = 0.05,
        gate_normalize: bool = True,
        node_config: dict[int, dict] | None = None,
        max_empty_rounds: int = 0,
        expert_merge: ExpertMerge = merge_over_uploaders,
        router_weights: RouterWeights = preference_weights,
        node_partitions: dict[int, int] | None = None,
        participants: Callable[[int], Sequence[int]] | None = None,
        norm_screen: float = 0.0,
        robust_agg: str = "none",
        trim_fraction: float = 0.25,
        identify_nodes: Callable[[Grid, list[int]], dict[int, int]] | None = None,
    ) -> None:
        if not node_budgets:
            raise ValueError("HFedMoE needs at least one client node")
        if participants is not None and set(node_partitions or {}) != set(node_budgets):
            raise ValueError("sampling participants needs the partition id of every node (node_partitions)")
        self.node_partitions = dict(node_partitions or {})
        self.participants = participants
        self._sampled: list[int] = list(node_budgets)  # the nodes sent a message this round
        self.expert_merge, self.router_weights = expert_merge, router_weights
        self.groups = groups
        self.node_budgets = dict(node_budgets)
        self.run_config_json = run_config_json
        self.tau = tau
        self.gate_normalize = gate_normalize
        self.node_config = {node: dict(entries) for node, entries in (node_config or {}).items()}
        self._current: dict[str, torch.Tensor] = {}
        # The last ArrayRecord this strategy produced and the tensors it was built
        # from: converting a 300 MB record back to tensors costs ~0.25 s a time.
        self._last_record: ArrayRecord | None = None
        self._last_state: dict[str, torch.Tensor] = {}
        self._round_started = self._configured = 0.0
        self._run_id: int | None = None  # of the messages this strategy sends
        self._sent: list[Message] = []
        # Per-round facts the run recorder reads after aggregation.
        self.round_info: dict[int, dict] = {}
        # A resumed run continues after checkpointed round k: Flower counts from 1
        # again, clients and records must see the run's absolute round numbers.
        self.round_offset = 0
        self.max_empty_rounds = max_empty_rounds
        self._empty_streak = 0
        self.norm_screen, self.robust_agg, self.trim_fraction = norm_screen, robust_agg, trim_fraction
        self.local_steps = max(1, int(json.loads(run_config_json).get("local_steps", 1)))
        # new node id -> its partition id, for nodes that connect after the start (a
        # restarted SuperNode gets a new node id); None: the nodes never change
        self.identify_nodes = identify_nodes

    # --- training --------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per sampled node, each carrying the node's own expert budget."""
        server_round += self.round_offset
        self._round_started = time.perf_counter()
        self.set_global_state(self.state_of(arrays))
        if self.identify_nodes is not None:
            self.pick_up_returning_nodes(grid, server_round)
        self._sampled = self.sampled_nodes(server_round)
        messages = []
        for node_id in self._sampled:
            budget = self.node_budgets[node_id]
            node_config = ConfigRecord(dict(config))
            node_config["server-round"] = server_round
            node_config["expert-budget"] = budget
            for key, value in self.node_config.get(node_id, {}).items():
                node_config[key] = value
            node_config["run-config"] = self.run_config_json
            content = RecordDict({"arrays": arrays, "config": node_config})
            # group id = the round: a reply carries it back, so one to an earlier round is recognised
            messages.append(Message(content=content, dst_node_id=node_id, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
        self._run_id = messages[0].metadata.run_id if messages else None
        self._sent = messages  # the grid gives each its message id when it sends them
        self._configured = time.perf_counter()
        self.round_info[server_round] = {
            "bytes_down": record_nbytes(arrays) * len(messages),
            "model_bytes": raw_nbytes(self._current),  # what one FedAvg-full upload would cost
        }
        if self.participants is not None:
            self.round_info[server_round]["participants"] = sorted(self.node_partitions[n] for n in self._sampled)
        log(INFO, "configure_train: %d clients, budgets %s", len(messages),
            [self.node_budgets[n] for n in self._sampled])
        return messages

    def pick_up_returning_nodes(self, grid: Grid, server_round: int) -> None:
        """A SuperNode that was lost and restarted connects under a new node id: ask every
        unknown node for its partition and give it that partition's place (budget, node
        config, sampling), so it trains again from this round on."""
        unknown = sorted(set(grid.get_node_ids()) - set(self.node_budgets))
        if not unknown:
            return
        by_partition = {pid: node for node, pid in self.node_partitions.items()}
        for new, pid in sorted(self.identify_nodes(grid, unknown).items()):
            old = by_partition.get(pid)
            if old is None:
                log(WARNING, "round %d: node %d reports partition %d, which this run does not have; ignored",
                    server_round, new, pid)
                continue
            self.rebind_node(old, new)
            by_partition[pid] = new
            log(INFO, "round %d: partition %d is back on node %d (was node %d)", server_round, pid, new, old)

    def rebind_node(self, old: int, new: int) -> None:
        """Give node ``new`` everything node ``old`` had (its place in node_budgets' order)."""
        self.node_budgets = {new if n == old else n: b for n, b in self.node_budgets.items()}
        if old in self.node_config:
            self.node_config[new] = self.node_config.pop(old)
        if old in self.node_partitions:
            self.node_partitions[new] = self.node_partitions.pop(old)

    def sampled_nodes(self, server_round: int) -> list[int]:
        """The node ids that take part in (absolute) ``server_round``, in node_budgets' order."""
        if self.participants is None:
            return list(self.node_budgets)
        chosen = set(self.participants(server_round))
        return [n for n in self.node_budgets if self.node_partitions[n] in chosen]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, then aggregate experts, routers and dense parameters."""
        server_round += self.round_offset
        if not self._current:
            raise RuntimeError("aggregate_train called before configure_train: the strategy has no global model")
        replied = time.perf_counter()
        updates: list[ReceivedUpload] = []
        failures: list[dict] = []
        replies = list(replies)
        stale = [msg for msg in replies if self._stale_reason(msg, server_round)]
        for msg in stale:  # for an earlier round or another run: never merged, never counted as this round's
            reason = self._stale_reason(msg, server_round)
            log(WARNING, "round %d: refusing a reply of node %d: %s", server_round, msg.metadata.src_node_id, reason)
            failures.append({"node_id": msg.metadata.src_node_id, "id": self.node_partitions.get(msg.metadata.src_node_id, -1),
                             "kind": "stale-reply", "reason": reason})
        replies = [msg for msg in replies if not self._stale_reason(msg, server_round)]
        # An error reply the SuperLink writes for a node (e.g. "Node Unavailable" after missed
        # heartbeats) comes from the SuperLink: find the node from the message it answers.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent if m.metadata.message_id}
        node_of = {id(msg): sent_to.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
                   for msg in replies}
        answered = set(node_of.values())
        for node in self._sampled:  # an unsampled node was sent nothing: not a failure
            if node not in answered:  # crashed, or slower than the round timeout
                failures.append({"node_id": node, "id": self.node_partitions.get(node, -1),
                                 "reason": "no reply within the round timeout"})
                log(WARNING, "round %d: node %d sent no reply in time", server_round, node)
        for msg in replies:
            if msg.has_error():
                node = node_of[id(msg)]
                failures.append({"node_id": node, "id": self.node_partitions.get(node, -1),
                                 "reason": f"client on node {node} failed: {msg.error.reason}"})
                log(WARNING, "round %d: %s", server_round, failures[-1]["reason"])
                continue
            if "failure" in msg.content:  # the client could not train (e.g. FedAvg over budget)
                failures.append(self._training_failure(msg))
                log(INFO, "round %d: %s", server_round, failures[-1]["reason"])  # expected under this method
                continue
            try:
                updates.append(parse_upload(msg, self.groups, self._current))
            except ReplyError as err:
                log(WARNING, "round %d: dropping a reply: %s", server_round, err)
                failures.append({"node_id": msg.metadata.src_node_id,
                                 "id": self.node_partitions.get(msg.metadata.src_node_id, -1), "reason": str(err)})
        rejected = self.screen(updates)  # finite but destructive updates: out of proportion with the others
        for c, reason in sorted(rejected.items()):
            r = updates[c]
            log(WARNING, "round %d: rejecting the update of node %d: %s", server_round, r.node_id, reason)
            failures.append({"node_id": r.node_id, "id": r.upload.partition_id, "kind": "rejected-update",
                             "reason": f"update rejected: {reason}"})
        updates = [r for c, r in enumerate(updates) if c not in rejected]
        # Replies come in arrival order; floating-point sums depend on the order: merging in
        # partition order makes the new model independent of which client finished first
        # (a resumed run, or another engine, reproduces it bit for bit).
        updates.sort(key=lambda r: (r.upload.partition_id, r.node_id))
        info = self.round_info.setdefault(server_round, {})
        parsed = time.perf_counter()
        # Where the server's time went in this round (seconds); see hfedmoe.bench.
        info["timing"] = {"configure_s": self._configured - self._round_started,
                          "clients_s": replied - self._configured, "parse_s": parsed - replied}
        info["failures"] = failures
        info["clients"] = [self._client_row(u) for u in updates]
        info["bytes_up"] = sum(u.bytes_up for u in updates)
        if not updates:
            log(WARNING, "round %d: no usable reply; the global model is unchanged", server_round)
            info["alpha"] = []
            self._empty_streak += 1
            if self.max_empty_rounds and self._empty_streak >= self.max_empty_rounds:
                reasons = sorted({f["reason"] for f in failures})
                raise RunAborted(
                    f"no client sent a usable update in {self._empty_streak} consecutive round(s) (last: round "
                    f"{server_round}; {'; '.join(reasons)[:500]}); the last good model is kept"
                )
            drop_arrays(replies)
            return None, None
        self._empty_streak = 0

        state = self.aggregate(updates)
        info["alpha"] = state.pop("__alpha__").tolist()
        aggregated = time.perf_counter()
        n = [u.upload.num_examples for u in updates]
        loss = sum(u.upload.metrics.get("train-loss", 0.0) * k for u, k in zip(updates, n)) / max(sum(n), 1)
        metrics = MetricRecord({"train-loss": float(loss), "clients": len(updates), "failures": len(failures)})
        # Built once; Flower sends this same record to every client next round. The server
        # keeps the new model in that one form (its own tensors are read-only views of the
        # record's bytes): one copy resident while the next round's clients train, not two.
        self._last_record = state_to_record(state)
        self._last_state = record_to_state(self._last_record)
        del state
        # Flower's loop holds this round's replies until the next round's replies replace
        # them, i.e. while the next round's clients train: up to a model per client. Merged
        # now, their arrays go (measured on the embedded model: ~0.4 GB for 2 clients).
        drop_arrays(replies)
        info["timing"].update(aggregate_s=aggregated - parsed, encode_s=time.perf_counter() - aggregated)
        return self._last_record, metrics

    def set_global_state(self, state: dict[str, torch.Tensor]) -> None:
        """The global model this round's replies are validated against and merged into
        (configure_train sets it; in-process loops call it directly)."""
        self._current = state

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model of the current round ({} before the first)."""
        return self._current

    @property
    def last_aggregated_state(self) -> dict[str, torch.Tensor]:
        """The newest global state this strategy aggregated ({} before the first)."""
        return self._last_state

    def state_of(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """Tensors of ``arrays``; free when it is the record this strategy built last."""
        if arrays is self._last_record:
            return self._last_state
        # Read-only views of the record's bytes (no copy); nothing here modifies them.
        return record_to_state(arrays)

    def screen(self, received: list[ReceivedUpload]) -> dict[int, str]:
        """Index -> reason of the uploads to reject: an update norm, per expert or for the
        routers or the dense parameters, above ``norm_screen`` x the median of the round's
        holders (:func:`hfedmoe.core.robust.screen_by_norm`; groups with < 3 holders unjudged).

        Each norm is per local step that trained the group (the batches that selected the
        expert; the round's steps for routers and dense), because AdamW moves a weight by
        about the learning rate per step: an expert trained in 10 batches by one client
        and in 1 by another is not an anomaly. The step counts a client reports are
        capped at the run's ``local_steps``, so claiming more cannot hide a large update.
        """
        if self.norm_screen <= 0 or len(received) < MIN_HOLDERS_TO_SCREEN:
            return {}
        groups, norms = self.groups, {}
        for c, r in enumerate(received):
            u = r.upload
            steps = min(self.local_steps, max(1, int(u.metrics.get("local-steps", self.local_steps))))
            norms.setdefault("the dense parameters", {})[c] = update_norm(u.dense(groups), self._current) / steps
            norms.setdefault("the routers", {})[c] = update_norm(u.routers(groups), self._current) / steps
            by_expert: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
            for key, value in u.experts(groups).items():
                by_expert.setdefault(groups.expert_of[key], {})[key] = value
            for (layer, expert), tensors in by_expert.items():
                trained = min(self.local_steps, max(1, int(u.selection_counts[layer, expert])))
                norms.setdefault(f"expert {expert} of layer {layer}", {})[c] = \
                    update_norm(tensors, self._current) / trained
        return screen_by_norm(norms, self.norm_screen)

    def aggregate(self, received: list[ReceivedUpload]) -> dict[str, torch.Tensor]:
        """The new global state from validated uploads: experts by the method's merge
        (Eq. 17 for HFedMoE), routers weighted by its alpha (Eq. 18-21), dense FedAvg."""
        groups = self.groups
        uploads = [r.upload for r in received]
        state, alpha = merge_round(
            {k: self._current[k] for k in groups.all_expert_keys},
            [u.experts(groups) for u in uploads], [u.routers(groups) for u in uploads],
            [u.dense(groups) for u in uploads],
            torch.stack([u.usage for u in uploads]), torch.stack([u.importance for u in uploads]),
            [u.num_examples for u in uploads], self.expert_merge, self.router_weights, self.tau, self.gate_normalize,
            robust=self.robust_agg, expert_of=groups.expert_of, trim_fraction=self.trim_fraction,
            frequency=torch.stack([self._frequency(u) for u in uploads]),
        )
        return {**state, "__alpha__": alpha}

    def _frequency(self, upload) -> torch.Tensor:
        """The client's activation frequency f_c [L, S]; zeros when it sent none (an
        activation-aware merge then gives it no weight)."""
        if upload.activation is not None:
            return upload.activation.double()
        return torch.zeros(self.groups.num_layers, self.groups.num_experts, dtype=torch.float64)

    def _stale_reason(self, msg: Message, server_round: int) -> str | None:
        """Why ``msg`` is no reply to this round's instructions (None: it is one)."""
        if self._run_id is not None and msg.metadata.run_id != self._run_id:
            return f"the reply belongs to run {msg.metadata.run_id}, not this run {self._run_id}"
        if msg.metadata.group_id != str(server_round):
            return f"the reply answers round {msg.metadata.group_id or '?'}, not round {server_round}"
        return None

    @staticmethod
    def _training_failure(msg: Message) -> dict:
        """The failure row of a flagged reply (the client ran but could not train)."""
        metrics = dict(msg.content["metrics"]) if "metrics" in msg.content else {}
        return {
            "node_id": msg.metadata.src_node_id,
            "id": int(metrics.get("partition-id", -1)),
            "kind": "out-of-memory" if metrics.get("out-of-memory") else "training-failure",
            "expert_budget": int(metrics.get("expert-budget", -1)),
            "reason": str(msg.content["failure"].get("reason", "training failure")),
        }

    @staticmethod
    def _client_row(r: ReceivedUpload) -> dict:
        u, m = r.upload, r.upload.metrics
        return {
            "id": u.partition_id,
            "node_id": r.node_id,
            "num_examples": u.num_examples,
            "expert_budget": int(m.get("expert-budget", -1)),
            "experts_trained": float(m.get("experts-trained-mean", 0.0)),
            "experts_uploaded": int(m.get("experts-uploaded", 0)),
            # None: not measured (a CPU client without a memory budget or --measure-memory)
            "peak_mem_bytes": int(m["peak-mem-bytes"]) if "peak-mem-bytes" in m else None,
            "mem_budget_bytes": int(m["mem-budget-bytes"]) if m.get("mem-budget-bytes") else None,
            "over_budget": bool(m.get("over-budget", 0)),
            "resident_after_bytes": int(m.get("resident-after-bytes", 0)),
            "local_steps": int(m.get("local-steps", 0)),
            "train_loss": float(m.get("train-loss", float("nan"))),
            "train_s": float(m.get("wall-s", 0.0)),
            "select_s": float(m.get("select-s", 0.0)),
            "decode_s": float(m.get("decode-s", 0.0)),
            "round_s": float(m.get("round-s", 0.0)),
            "encode_s": float(m.get("encode-s", 0.0)),
            "bytes_up": r.bytes_up,
            "bytes_up_floor": r.bytes_up_floor,
            "usage": [[round(x, 5) for x in row] for row in u.usage.tolist()],
            "selection_counts": u.selection_counts.tolist(),
            # share of the client's routed tokens each expert processed (rows sum to its top-k)
            "activation": None if u.activation is None else [[round(x, 5) for x in row]
                                                             for row in u.activation.tolist()],
        }

    # --- evaluation happens centrally on the server (held-out test set) ------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No client-side evaluation: the global model is scored on the server."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log(
            INFO,
            "\t├── HFedMoE: %d MoE layers x %d experts, tau=%s, gate weights %s",
            self.groups.num_layers,
            self.groups.num_experts,
            self.tau,
            "normalised" if self.gate_normalize else "literal (Eq. 20)",
        )
        log(INFO, "\t├── aggregation: experts %s, routers %s", self.expert_merge.__name__,
            self.router_weights.__name__)
        log(INFO, "\t└── expert budgets per node: %s", self.node_budgets)
