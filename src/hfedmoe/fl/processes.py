"""Leave no process behind: find and stop every process a run started, by PID.

Flower's simulation engine starts Ray (a GCS server, a raylet, worker processes).
``ray.shutdown()`` normally ends them; if a run is interrupted or fails, this
module stops whatever is left, by PID, from /proc (Linux) so no tool is needed.
Two ways to find them: the process tree (:func:`descendants`), and a token in the
environment every process of the run inherits (:func:`run_token`, :func:`marked`),
which also finds a worker the raylet forked while it was being stopped: re-parented
to init, such a process is in no tree (seen on a loaded machine, 1 in ~3 runs).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

RUN_TOKEN = "HFEDMOE_RUN_TOKEN"  # environment variable every process of a run inherits


def new_run_token() -> str:
    """A fresh token for one run, put in this process's environment (so every process
    started from now on inherits it); it replaces any inherited one, so a run never
    mistakes another run's processes for its own. Drop it with :func:`clear_run_token`."""
    token = uuid.uuid4().hex
    os.environ[RUN_TOKEN] = token
    return token


def clear_run_token() -> None:
    os.environ.pop(RUN_TOKEN, None)


def marked(token: str) -> list[int]:
    """Live processes other than this one whose environment carries ``RUN_TOKEN=token``."""
    needle = f"{RUN_TOKEN}={token}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0") and is_alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def descendants(pid: int | None = None) -> list[int]:
    """PIDs of all live descendants of ``pid`` (default: this process)."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        state, ppid = fields[0], int(fields[1])
        if state != "Z":
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def stop_descendants(grace_s: float = 5.0, also: list[int] | tuple[int, ...] = ()) -> list[int]:
    """SIGTERM every descendant, then SIGKILL those still alive after ``grace_s``.

    ``also``: PIDs seen in the tree earlier (see :func:`descendants`). A Ray worker
    whose raylet exits first is re-parented to init and is no longer our descendant;
    a snapshot taken while the tree was intact still names it. Processes carrying this
    process's run token (:func:`run_token`) are stopped too, wherever they hang.
    """
    pids = list(dict.fromkeys([*descendants(), *(p for p in also if is_alive(p))]))
    token = os.environ.get(RUN_TOKEN)
    if token:
        pids = list(dict.fromkeys([*pids, *marked(token)]))
    for pid in pids:
        send_signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(is_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if is_alive(pid):
            send_signal(pid, signal.SIGKILL)
    # A killed process takes a few ms to exit; wait so it can be reaped below.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(is_alive(p) for p in pids):
        time.sleep(0.01)
    # Reap our direct children so they do not linger as zombies.
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass
    return pids


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def send_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
