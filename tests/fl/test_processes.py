"""hfedmoe.fl.processes: find and stop this process's descendants by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hfedmoe.fl import processes
from hfedmoe.fl.processes import is_alive, descendants, stop_descendants

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _children_of(pid: int, timeout: float = 5.0) -> list[int]:
    """Wait until ``pid`` has a child (bash starting its background sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = descendants(pid)
        if kids:
            return kids
        time.sleep(0.05)
    return []


def _kill(procs: list[subprocess.Popen], extra: list[int]) -> None:
    """Clean up only what this test started, by PID."""
    for pid in extra:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass


def test_descendants_lists_children_and_grandchildren():
    procs, grandchildren = [], []
    try:
        sleeper = subprocess.Popen(["sleep", "60"])
        procs.append(sleeper)
        shell = subprocess.Popen(["bash", "-c", "sleep 60 & wait"])
        procs.append(shell)
        grandchildren = _children_of(shell.pid)
        assert len(grandchildren) == 1, "bash should have started one background sleep"

        found = descendants()
        assert {sleeper.pid, shell.pid, *grandchildren} <= set(found)
        assert os.getpid() not in found
        assert descendants(shell.pid) == grandchildren
        assert descendants(sleeper.pid) == []
        assert all(is_alive(p) for p in [sleeper.pid, shell.pid, *grandchildren])
    finally:
        _kill(procs, grandchildren)
    # killed and reaped: no longer listed
    assert not {p.pid for p in procs} & set(descendants())


def test_stop_descendants_stops_children_and_grandchildren():
    # stop_descendants stops *every* descendant of this process; only run it when
    # the test process has none of its own, so it cannot stop anything it did not start.
    if descendants():
        pytest.skip("the test process already has child processes")
    procs, grandchildren = [], []
    try:
        sleeper = subprocess.Popen(["sleep", "60"])
        procs.append(sleeper)
        shell = subprocess.Popen(["bash", "-c", "sleep 60 & wait"])
        procs.append(shell)
        grandchildren = _children_of(shell.pid)
        assert len(grandchildren) == 1
        ours = {sleeper.pid, shell.pid, *grandchildren}

        start = time.monotonic()
        stopped = stop_descendants(grace_s=3.0)
        assert time.monotonic() - start < 3.0, "sleep/bash exit on SIGTERM; no SIGKILL wait expected"
        assert set(stopped) == ours
        assert not any(is_alive(p) for p in ours)
        assert descendants() == []
        # the direct children were reaped by stop_descendants: no zombie left behind
        for pid in (sleeper.pid, shell.pid):
            assert not Path(f"/proc/{pid}").exists() or not is_alive(pid)
    finally:
        _kill(procs, grandchildren)


def _start_stubborn(procs: list[subprocess.Popen]) -> subprocess.Popen:
    """A child that ignores SIGTERM, so stop_descendants must escalate to SIGKILL."""
    stubborn = subprocess.Popen(
        [sys.executable, "-c",
         "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    procs.append(stubborn)
    assert stubborn.stdout.readline().strip() == "ready"
    return stubborn


def _wait_dead(pid: int, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.02)
    return not is_alive(pid)


def test_stop_descendants_kills_a_process_that_ignores_sigterm():
    if descendants():
        pytest.skip("the test process already has child processes")
    procs: list[subprocess.Popen] = []
    try:
        stubborn = _start_stubborn(procs)
        start = time.monotonic()
        assert stop_descendants(grace_s=0.5) == [stubborn.pid]
        assert time.monotonic() - start >= 0.5  # waited the grace period, then SIGKILL
        assert _wait_dead(stubborn.pid)
    finally:
        _kill(procs, [])


def test_stop_descendants_waits_for_sigkilled_children_and_reaps_them(monkeypatch):
    """A process takes a few ms to exit after SIGKILL (memory teardown); whether
    stop_descendants' WNOHANG reap sees it dead is a race. Make the exit take 50 ms,
    deterministically, by delivering the SIGKILL from a timer."""
    if descendants():
        pytest.skip("the test process already has child processes")
    real_signal = processes.send_signal
    timers: list[threading.Timer] = []

    def slow_exit_signal(pid: int, sig: int) -> None:
        if sig == signal.SIGKILL:
            timer = threading.Timer(0.05, real_signal, (pid, sig))
            timers.append(timer)
            timer.start()
        else:
            real_signal(pid, sig)

    monkeypatch.setattr(processes, "send_signal", slow_exit_signal)
    procs: list[subprocess.Popen] = []
    try:
        stubborn = _start_stubborn(procs)
        stop_descendants(grace_s=0.3)
        assert timers, "stop_descendants should have escalated to SIGKILL"
        alive_on_return = is_alive(stubborn.pid)
        for timer in timers:
            timer.join()
        time.sleep(0.2)
        assert not alive_on_return, "still running when stop_descendants returned"
        assert not Path(f"/proc/{stubborn.pid}").exists(), "left as an unreaped zombie"
    finally:
        for timer in timers:
            timer.cancel()
        _kill(procs, [])


def test_a_process_orphaned_before_the_stop_is_stopped_through_the_snapshot():
    """Ray's raylet can exit before its workers: they are re-parented to init and leave
    our tree. A snapshot taken while the tree was intact still gets them stopped."""
    if descendants():
        pytest.skip("the test process already has child processes")
    procs: list[subprocess.Popen] = []
    orphan: list[int] = []
    try:
        shell = subprocess.Popen(["bash", "-c", "sleep 60 & wait"])
        procs.append(shell)
        orphan = _children_of(shell.pid)
        assert len(orphan) == 1
        snapshot = descendants()
        shell.kill()  # the parent dies; its sleep is orphaned
        shell.wait(timeout=5)
        assert orphan[0] not in descendants(), "the orphan should have left our process tree"
        assert is_alive(orphan[0])
        assert orphan[0] in stop_descendants(grace_s=1.0, also=snapshot)
        assert _wait_dead(orphan[0])
    finally:
        _kill(procs, orphan)


def test_a_process_outside_the_tree_that_carries_the_run_token_is_stopped(tmp_path):
    """A Ray worker forked while Ray is being stopped ends up re-parented to init: in no
    process tree, but it inherited the run's token, so the final pass finds it."""
    import os
    import subprocess
    import sys

    from hfedmoe.fl.processes import clear_run_token, is_alive, marked, new_run_token, stop_descendants

    token = new_run_token()
    try:
        # A grandchild whose parent exits at once: re-parented, not our descendant any more.
        pid_file = tmp_path / "pid"
        subprocess.run([sys.executable, "-c",
                        "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', "
                        "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid))",
                        str(pid_file)], check=True)
        orphan = int(pid_file.read_text())
        assert is_alive(orphan) and orphan in marked(token)
        stopped = stop_descendants(grace_s=2.0)
        assert orphan in stopped and not is_alive(orphan)
    finally:
        clear_run_token()
        assert "HFEDMOE_RUN_TOKEN" not in os.environ
