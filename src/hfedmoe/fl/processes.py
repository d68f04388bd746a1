"""Leave no process behind: find and stop every descendant of this process by PID.

Flower's simulation engine starts Ray (a GCS server, a raylet, worker processes).
``ray.shutdown()`` normally ends them; if a run is interrupted or fails, this
module stops whatever is left, by PID, from /proc (Linux) so no tool is needed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


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
    a snapshot taken while the tree was intact still names it.
    """
    pids = list(dict.fromkeys([*descendants(), *(p for p in also if is_alive(p))]))
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
