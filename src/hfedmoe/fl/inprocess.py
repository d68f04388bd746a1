"""The federated run in this one process: the same ServerApp and ClientApp code, no Ray.

:class:`InProcessGrid` is a Flower ``Grid`` that hands every message straight to
the project's ClientApp (``hfedmoe.fl.client_app.app``) and returns its reply, so
:func:`~hfedmoe.fl.server_app.run_server` runs unchanged: node discovery, the
strategy's messages, reply validation, failure handling, aggregation, evaluation
and the run directory are all the real code paths. Clients run one after another.

A run starts in about a second instead of Ray's ~20 s, and messages pass by
reference. ``hfedmoe run``, ``compare`` and ``bench`` with ``--engine auto`` (their
default) take this engine when clients train one at a time on one device
(:func:`hfedmoe.fl.simulation.pick_engine`).
A reply that took a node longer than the round timeout is dropped, as Flower's
engines drop late replies (each node on its own clock).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from hfedmoe.config import RunConfig
from hfedmoe.fl.client_app import app as client_app
from hfedmoe.fl.server_app import run_server

SERVER_NODE_ID = 0
_RUN_ID = 1
# Flower reports a ClientApp exception to the server as an error reply with this code.
CLIENT_APP_RAISED_EXCEPTION = 300


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    Parameters
    ----------
    client_app : flwr ClientApp
        The app that answers every message.
    num_nodes : int
        Virtual SuperNodes; node i holds partition i of ``num_nodes``.
    """

    def __init__(self, client_app, num_nodes: int):
        self.client_app = client_app
        self._run = Run.create_empty(_RUN_ID)
        # Node ids unlike partition ids, as with Flower's engine, so nothing may confuse the two.
        self.contexts = {
            1000 + pid: Context(run_id=_RUN_ID, node_id=1000 + pid,
                                node_config={"partition-id": pid, "num-partitions": num_nodes},
                                state=RecordDict(), run_config={})
            for pid in range(num_nodes)
        }
        self._pending: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def deliver(self, msg: Message) -> Message:
        """The node's reply; an exception becomes an error reply, as on Flower's engine."""
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as err:  # noqa: BLE001 - the server must see it as that node's failure
            return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                           reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for i, msg in enumerate(messages):
            key = f"{len(self._pending)}-{i}"
            self._pending[key] = self.deliver(msg)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(key) for key in message_ids if key in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Every node's reply, except those that took longer than ``timeout`` (each node
        on its own clock, as nodes working in parallel would): Flower's engines return
        only the replies that arrived in time."""
        replies = []
        for msg in messages:
            started = time.monotonic()
            reply = self.deliver(msg)
            if timeout is None or time.monotonic() - started <= timeout:
                replies.append(reply)
        return replies


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """Flower reads the current process's run/node/task ids to create a message."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = _RUN_ID, SERVER_NODE_ID, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_inprocess(cfg: RunConfig, reporter=None, verbose: bool = False) -> dict:
    """Run ``cfg`` with ``cfg.clients`` in-process nodes; return the run summary."""
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    with server_identity():
        return run_server(InProcessGrid(client_app, cfg.clients), cfg, reporter)
