"""Flower's deployment engine: a SuperLink and 3 SuperNodes on 127.0.0.1 (TLS), `flwr run`.

Everything goes through ``scripts/local_deployment.py`` (the launcher a user runs):
free ports, a self-signed CA (``scripts/gen_certs.sh``), a fresh FLWR_HOME, no
runtime dependency installation, nothing downloaded. Each test puts a unique
``HFEDMOE_TEST_MARKER`` in the launcher's environment, which every process it starts
inherits; the launcher must have stopped all of them itself, and ``stop_marked``
cleans up in ``finally`` whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# tests/ is on sys.path (pytest's default rootdir-relative import of test modules).
from safetensors.torch import load_file

from hfedmoe.config import RunConfig
from hfedmoe.fl.inprocess import run_inprocess
from proc_marker import MARKER, marked_pids, new_marker, stop_marked
from builders import write_sites

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHER = ROOT / "scripts" / "local_deployment.py"
# The shrunken HFedMoE config of the integration tests; test-fraction 0.05 keeps the
# server's three evaluations of the global model short on a shared 2-core CPU.
SMALL = "local-steps=1 batch-size=4 max-length=16 num-experts=4 eval-batch-size=128 test-fraction=0.05"

pytestmark = [
    pytest.mark.skipif(not (BIN / "flower-superlink").exists() or not (BIN / "flower-supernode").exists(),
                       reason="Flower's deployment commands are not installed"),
    pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("ssh-keygen") is None,
                       reason="openssl and ssh-keygen are needed for certificates and SuperNode keys"),
]


def _env(marker: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({MARKER: marker, "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    return env


def _launch(tmp_path: Path, marker: str, *flags: str, nodes: int = 3, rounds: int = 2,
            timeout: float = 900, run_config: str = SMALL) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(LAUNCHER), "--nodes", str(nodes), "--rounds", str(rounds),
           "--run-config", run_config, "--out", str(tmp_path / "run"), "--workdir", str(tmp_path / "work"),
           "--timeout", str(timeout - 120), *flags]
    return subprocess.run(cmd, env=_env(marker), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _deploy(tmp_path: Path, *flags: str, **launch) -> subprocess.CompletedProcess:
    """A successful launch that left no process behind (cleaned up whatever happens)."""
    marker = new_marker()
    try:
        proc = _launch(tmp_path, marker, *flags, **launch)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        time.sleep(0.5)
        assert marked_pids(marker) == [], "the launcher left processes behind"
    finally:
        stop_marked(marker)
    assert marked_pids(marker) == []
    return proc


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _check_run(out: Path, nodes: int, rounds: int) -> None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for row in rows:
        assert isinstance(row["accuracy"], float) and 0.0 <= row["accuracy"] <= 1.0
        assert isinstance(row["loss"], float)
    for row in rows[1:]:
        # Every SuperNode took part in every round, each with its own partition.
        assert sorted(c["id"] for c in row["clients"]) == list(range(nodes))
        assert row["failures"] == []
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        for client in row["clients"]:
            assert client["num_examples"] > 0
            assert 6 <= client["experts_trained"] <= client["expert_budget"]
    assert len({c["num_examples"] for c in rows[1]["clients"]}) > 1, "the nodes hold different partitions"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == rounds
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["failed_client_rounds"] == 0
    config = json.loads((out / "config.json").read_text())
    assert config["clients"] == nodes and config["num_experts"] == 4 and config["rounds"] == rounds


@pytest.mark.e2e
def test_three_supernodes_each_on_its_own_csv_over_tls(tmp_path):
    """Each SuperNode trains on its own csv (node config data-path); the server reads none
    of them: it agrees the label set from the names the nodes report and scores the
    model by federated evaluation on the nodes' held-out rows."""
    (tmp_path / "sites").mkdir()
    files = write_sites(tmp_path / "sites", ".csv")
    # The launcher stops every process it started (SuperLink, SuperExecs, SuperNodes,
    # ServerApp/ClientApp processes, flwr CLI) by itself: _deploy checks.
    proc = _deploy(tmp_path, "--tls", "--node-data", ",".join(files),
                   "--node-columns", "text-column=body label-column=topic")
    out = proc.stdout
    assert "SuperLink ready at https://127.0.0.1:" in out
    assert "TLS verified" in out and "3/3 SuperNodes online" in out
    assert "run finished" in out and "stopped " in out
    # Flower's own view: the SuperNodes talked to a TLS SuperLink.
    link_log = (tmp_path / "work" / "logs" / "superlink.log").read_text()
    assert "Uvicorn running on https://127.0.0.1:" in link_log
    _check_run(tmp_path / "run", nodes=3, rounds=2)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["labels"] == ["business", "sport", "tech"] and config["evaluation"] == "federated"
    assert config["client_data"] is None and config["dataset"] == "bbc-news"  # the server got no paths
    rows = _rows(tmp_path / "run")
    for row in rows:
        assert row["federated"]["clients"] == [0, 1, 2] and row["federated"]["failures"] == []
        assert row["federated"]["examples"] == 8  # one row per class of each site held out (test-fraction 0.05)
    # Each node trained on the rest of its own file (15, 16 and 12 rows).
    assert {c["id"]: c["num_examples"] for c in rows[1]["clients"]} == {0: 12, 1: 13, 2: 10}


@pytest.mark.e2e
def test_supernode_authentication(tmp_path):
    """--auth: only SuperNodes whose public key was registered (`flwr supernode register`) may join."""
    out = _deploy(tmp_path, "--auth", rounds=1).stdout
    assert out.count("registered SuperNode") == 3
    # The launcher proves enforcement: a SuperNode with an unregistered key is refused.
    assert "SuperNode authentication verified" in out
    assert "3/3 SuperNodes online" in out
    _check_run(tmp_path / "run", nodes=3, rounds=1)


@pytest.mark.e2e
def test_a_supernode_killed_mid_round_is_survived_and_picked_up_again(tmp_path):
    """SIGKILL of SuperNode 1 (and its ClientApp) a few seconds into round 1: the round
    completes with the other two within round-timeout, the loss is in metrics.jsonl;
    the node, restarted at once, gets a new node id and its partition back in round 2."""
    proc = _deploy(tmp_path, "--kill-node", "1@1", "--restart-killed", run_config=SMALL + " round-timeout=150")
    assert "killed SuperNode 1 (SIGKILL" in proc.stdout and "restarted SuperNode 1" in proc.stdout
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [f["id"] for f in rows[1]["failures"]] == [1]
    assert sorted(c["id"] for c in rows[1]["clients"]) == [0, 2]
    assert sorted(c["id"] for c in rows[2]["clients"]) == [0, 1, 2] and rows[2]["failures"] == []
    lost_node = rows[1]["failures"][0]["node_id"]
    assert {c["id"]: c["node_id"] for c in rows[2]["clients"]}[1] != lost_node  # a new node id, same partition
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["failed_client_rounds"] == 1


@pytest.mark.e2e
def test_the_superlink_and_serverapp_killed_after_round_1_resume_to_the_same_model(tmp_path):
    """SIGKILL of the SuperLink (with its SuperExec and the ServerApp) once round 1 is
    checkpointed; the SuperLink restarts on the same port and database, the SuperNodes
    reconnect, `flwr run ... resume=true` finishes the run. The final model is the one an
    uninterrupted run of the same settings ends with (here: the in-process engine's)."""
    proc = _deploy(tmp_path, "--kill-server-after", "1")
    assert "killed the SuperLink and the ServerApp" in proc.stdout and "restarted the SuperLink" in proc.stdout
    rows = _rows(tmp_path / "run")
    assert [r["round"] for r in rows] == [0, 1, 2]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    reference = RunConfig.from_dict({**saved, "out": str(tmp_path / "reference"), "resume": False})
    run_inprocess(reference)
    deployed = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    expected = load_file(str(tmp_path / "reference" / "final" / "model.safetensors"))
    assert deployed.keys() == expected.keys()
    worst = max(float((deployed[k].double() - expected[k].double()).abs().max()) for k in deployed)
    assert worst == 0.0, f"largest difference from the uninterrupted run: {worst}"


@pytest.mark.e2e
def test_interrupted_deployment_stops_every_process(tmp_path):
    """Ctrl-C (SIGINT) in the middle of a run: the launcher stops everything it started and exits 130."""
    marker = new_marker()
    cmd = [sys.executable, str(LAUNCHER), "--nodes", "2", "--rounds", "3", "--run-config", SMALL,
           "--out", str(tmp_path / "run"), "--workdir", str(tmp_path / "work")]
    proc = subprocess.Popen(cmd, env=_env(marker), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            lines.append(line)
            if "Successfully started run" in line or time.monotonic() > deadline:
                break
        assert any("Successfully started run" in line for line in lines), "".join(lines)[-4000:]
        time.sleep(8)  # the ServerApp and the first ClientApp processes are running by now
        assert len(marked_pids(marker)) > 6  # launcher, SuperLink (+SuperExec), 2 SuperNodes (+2), flwr, apps
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
        assert proc.returncode == 130, "".join(lines)[-4000:]
        assert marked_pids(marker) == [], "the interrupted launcher left processes behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_marked(marker)
    assert marked_pids(marker) == []
    assert "interrupted (SIGINT)" in "".join(lines)


def test_invalid_arguments_start_nothing(tmp_path):
    marker = new_marker()
    try:
        for flags, message in [(["--auth", "--insecure"], "--auth needs TLS"),
                               (["--run-config", "out='/x'"], "must not set out"),
                               (["--nodes", "2", "--mem-budgets", "1GB"], "--mem-budgets needs 2")]:
            proc = subprocess.run([sys.executable, str(LAUNCHER), *flags, "--out", str(tmp_path / "r")],
                                  env=_env(marker), cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert proc.returncode == 2 and message in proc.stderr, proc.stderr
            assert marked_pids(marker) == []
    finally:
        stop_marked(marker)
    assert not (tmp_path / "r").exists()
