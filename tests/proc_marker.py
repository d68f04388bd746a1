"""Find and stop, by PID, every process a test started (marked through its environment).

Each test that starts Flower/Ray puts a unique ``HFEDMOE_TEST_MARKER`` in the
environment of the command it runs; every descendant (SuperLink, SuperExec,
Ray's GCS, raylet and workers) inherits it, even after being re-parented.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

MARKER = "HFEDMOE_TEST_MARKER"


def new_marker() -> str:
    return uuid.uuid4().hex


def marked_pids(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``marker``."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            found.append(int(proc.name))
    return found


def stop_marked(marker: str, grace_s: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, every marked process; returns the PIDs it had to stop."""
    pids = marked_pids(marker)
    for pid in pids:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and marked_pids(marker):
        time.sleep(0.2)
    for pid in marked_pids(marker):
        _kill(pid, signal.SIGKILL)
    return pids


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
