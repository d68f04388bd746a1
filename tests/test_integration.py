"""End to end: real federated runs through Flower's engines, on a shrunken config.

These start real processes (Ray; a local SuperLink for `flwr run`) and check that
none is left behind afterwards. Everything is offline: the embedded MiniLM and
BBC News come from PyPI packages. Each test that starts an engine is marked ``e2e``;
the two that check a rejected config starts nothing are not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# tests/ is on sys.path (pytest's default rootdir-relative import of test modules).
from proc_marker import MARKER, marked_pids, new_marker, stop_marked

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = ["--local-steps", "2", "--batch-size", "4", "--max-length", "16", "--num-experts", "4",
         "--eval-batch-size", "128"]


def _env(marker: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        MARKER: marker,
        "HF_HUB_OFFLINE": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        **extra,
    })
    return env


def _run(cmd: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


# Flower's simulation engine (Ray) explicitly: `--engine auto` would take the in-process one here.
TWO_ROUNDS = ["--rounds", "2", "--clients", "2", "--engine", "simulation", *SMALL]


@pytest.fixture(scope="module")
def two_round_run(tmp_path_factory) -> Path:
    """One uninterrupted 2-round, 2-client run, shared by the tests below."""
    marker = new_marker()
    out = tmp_path_factory.mktemp("two-rounds") / "run"
    try:
        proc = _run([str(BIN / "hfedmoe"), "run", *TWO_ROUNDS, "--out", str(out)], _env(marker), timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        time.sleep(1.0)
        assert marked_pids(marker) == [], "the run left processes behind"
    finally:
        stop_marked(marker)
    return out


@pytest.mark.e2e
def test_hfedmoe_run_two_rounds_two_clients(two_round_run):
    out = two_round_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        for key in ("round", "accuracy", "loss", "bytes_up", "bytes_down", "wall_s", "clients"):
            assert key in row
        assert 0.0 <= row["accuracy"] <= 1.0
    for row in rows[1:]:
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert sorted(c["id"] for c in row["clients"]) == [0, 1]
        for client in row["clients"]:
            for key in ("id", "num_examples", "expert_budget", "experts_trained", "experts_uploaded",
                        "peak_mem_bytes", "train_loss"):
                assert key in client
            # 6 MoE layers x 4 experts; default budgets: client 0 all 24, client 1 half.
            assert client["experts_trained"] <= client["expert_budget"]
            assert client["experts_trained"] >= 6  # at least one expert per layer
            assert client["num_examples"] > 0
            assert client["peak_mem_bytes"] is None  # CPU, no memory budget, no --measure-memory
        assert sorted(c["expert_budget"] for c in row["clients"]) == [12, 24]
        # The constrained client uploads fewer experts than exist.
        constrained = min(row["clients"], key=lambda c: c["expert_budget"])
        assert constrained["experts_uploaded"] < 24
    # Training moves the model: the loss after two rounds differs from the start.
    assert rows[-1]["loss"] != rows[0]["loss"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["final_accuracy"] == rows[-1]["accuracy"]
    config = json.loads((out / "config.json").read_text())
    assert config["clients"] == 2 and config["num_experts"] == 4
    state = load_file(str(out / "final" / "model.safetensors"))
    assert any(".experts.3." in key for key in state) and "classifier.weight" in state


def test_budget_below_one_expert_per_layer_fails_clearly(tmp_path):
    marker = new_marker()
    try:
        proc = _run([str(BIN / "hfedmoe"), "run", "--clients", "2", "--expert-budgets", "3,48",
                     "--out", str(tmp_path / "r")], _env(marker), timeout=120)
    finally:
        stop_marked(marker)
    assert proc.returncode == 2
    assert "minimum budget is 6" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists(), "nothing may be started or written for a rejected config"


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("flwr", path=str(BIN)) is None, reason="flwr CLI not installed")
def test_flwr_run_dot_works_as_a_flower_app(tmp_path):
    """A Flower user's `flwr run .`: local SuperLink, simulation, our ServerApp/ClientApp."""
    marker = new_marker()
    out = tmp_path / "flwr-run"
    env = _env(marker, FLWR_HOME=str(tmp_path / "flwr-home"))
    run_config = (f"num-server-rounds=1 local-steps=1 max-length=16 num-experts=4 "
                  f"eval-batch-size=128 out='{out}'")
    try:
        proc = _run([str(BIN / "flwr"), "run", ".", "--run-config", run_config, "--stream"], env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        deadline = time.monotonic() + 120
        while not (out / "summary.json").exists() and time.monotonic() < deadline:
            time.sleep(1)
        assert (out / "summary.json").exists(), proc.stdout[-3000:]
    finally:
        # `flwr run` leaves a detached local SuperLink running: stop it by PID.
        stop_marked(marker)
    assert marked_pids(marker) == []
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert len(rows[1]["clients"]) >= 1


@pytest.mark.e2e
def test_bench_quick_prints_the_ratios_as_json(tmp_path):
    """`hfedmoe bench --quick --engine both --repeats 1` runs a federated arm on each engine and
    one bare arm, each in a fresh process, and ends with one JSON line (no timing asserted)."""
    marker = new_marker()
    try:
        proc = _run([str(BIN / "hfedmoe"), "bench", "--quick", "--engine", "both", "--repeats", "1",
                     "--out", str(tmp_path / "bench")],
                    _env(marker), timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        time.sleep(1.0)
        assert marked_pids(marker) == [], "the benchmark left processes behind"
    finally:
        stop_marked(marker)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("selection_overhead", "upload_over_floor", "runtime_overhead", "upload_vs_fedavg_full"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    # Uploading can never cost less than the raw bytes uploaded.
    assert result["upload_over_floor"] >= 1.0
    # The bare loop is the same computation as the federated run: same accuracies
    # (bit-identical when both use the same thread count; allow two test articles).
    assert result["bare_accuracy"] == pytest.approx(result["federated_accuracy"], abs=0.005)
    assert result["engine"] == "inprocess" and set(result["engines"]) == {"inprocess", "simulation"}
    for name, figures in result["engines"].items():
        assert figures["federated_accuracy"] == pytest.approx(result["bare_accuracy"], abs=0.005), name
        assert figures["runtime_overhead"] > 0 and [len(r) for r in figures["federated_round_s"]] == [3], name
        assert figures["framework_s_per_client"] > 0, name  # decoding and encoding at least
    assert result["arm_order"] == ["inprocess", "simulation", "bare"]
    assert (tmp_path / "bench" / "federated-simulation" / "metrics.jsonl").exists()


def test_memory_budget_below_the_minimum_fails_clearly_before_anything_starts(tmp_path):
    marker = new_marker()
    try:
        # analytic: the mapping's error, without first measuring a calibration (minutes)
        proc = _run([str(BIN / "hfedmoe"), "run", "--clients", "2", "--mem-budgets", "10MB,4GB",
                     "--calibration", "analytic", "--out", str(tmp_path / "r")],
                    _env(marker, XDG_CACHE_HOME=str(tmp_path / "cache")), timeout=120)
    finally:
        stop_marked(marker)
    assert proc.returncode == 2, proc.stderr
    assert "client 0" in proc.stderr and "the minimum is" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_memory_budgets_map_to_expert_budgets_and_are_reported(tmp_path):
    """Also the first use of a shape: the run measures its memory calibration before Flower
    starts and caches it (the server then finds it)."""
    marker = new_marker()
    out = tmp_path / "run"
    cache = tmp_path / "cache"
    try:
        proc = _run([str(BIN / "hfedmoe"), "run", "--rounds", "1", "--clients", "2",
                     "--mem-budgets", "100GB,100GB", "--out", str(out), *SMALL],
                    _env(marker, XDG_CACHE_HOME=str(cache)), timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        stop_marked(marker)
    assert "hfedmoe: engine inprocess (clients train one at a time here" in proc.stdout  # --engine auto on a CPU
    assert proc.stderr.count("no memory calibration for this model and batch shape yet") == 1, proc.stderr[-3000:]
    assert len(list((cache / "hfedmoe" / "calibration").glob("*.json"))) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for client in rows[1]["clients"]:
        assert client["mem_budget_bytes"] == 100 * 10**9
        assert client["expert_budget"] == 24  # 100 GB holds every expert of 6 layers x 4
        assert client["over_budget"] is False
        assert 0 < client["peak_mem_bytes"] < client["mem_budget_bytes"]


@pytest.mark.e2e
def test_killed_run_resumes_to_a_bit_identical_final_model(two_round_run, tmp_path):
    """SIGKILL after round 1's checkpoint, then --resume: same final model as uninterrupted."""
    marker = new_marker()
    out = tmp_path / "killed"
    # Round 1 is checkpointed only with an interval of 0 (this run takes less than the default 60 s)
    cmd = [str(BIN / "hfedmoe"), "run", *TWO_ROUNDS, "--checkpoint-interval", "0", "--out", str(out)]
    latest = out / "checkpoints" / "latest.json"
    try:
        proc = subprocess.Popen(cmd, env=_env(marker), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.exists() and json.loads(latest.read_text())["round"] == 1:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed after round 1"
        proc.kill()  # SIGKILL: no cleanup runs in the CLI
        proc.wait(timeout=30)
        assert not (out / "summary.json").exists()
    finally:
        stop_marked(marker)  # Ray's processes outlive a SIGKILLed driver: stop them by PID

    marker = new_marker()
    try:
        resumed = _run(cmd + ["--resume"], _env(marker), timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finally:
        stop_marked(marker)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    expected = load_file(str(two_round_run / "final" / "model.safetensors"))
    actual = load_file(str(out / "final" / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


@pytest.mark.e2e
def test_resume_refuses_changed_settings(two_round_run, tmp_path):
    import shutil as _shutil

    copy = tmp_path / "copy"
    _shutil.copytree(two_round_run, copy)
    proc = _run([str(BIN / "hfedmoe"), "run", *TWO_ROUNDS, "--lr", "0.5", "--out", str(copy), "--resume"],
                _env(new_marker()), timeout=120)
    assert proc.returncode == 2
    assert "settings differ" in proc.stderr and "lr" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_a_crashing_client_is_recorded_and_the_round_completes_with_the_others(tmp_path):
    marker = new_marker()
    out = tmp_path / "crash"
    try:
        proc = _run([str(BIN / "hfedmoe"), "run", *TWO_ROUNDS, "--out", str(out)],
                    _env(marker, HFEDMOE_INJECT_CRASH="1@1"), timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        stop_marked(marker)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [c["id"] for c in rows[1]["clients"]] == [0] and len(rows[1]["failures"]) == 1
    assert "injected crash" in rows[1]["failures"][0]["reason"]
    assert sorted(c["id"] for c in rows[2]["clients"]) == [0, 1] and rows[2]["failures"] == []
    assert json.loads((out / "summary.json").read_text())["failed_client_rounds"] == 1


@pytest.mark.e2e
def test_a_run_where_every_client_keeps_failing_stops_with_a_clear_message(tmp_path):
    marker = new_marker()
    out = tmp_path / "all-fail"
    try:
        proc = _run([str(BIN / "hfedmoe"), "run", *TWO_ROUNDS, "--max-empty-rounds", "1", "--out", str(out)],
                    _env(marker, HFEDMOE_INJECT_CRASH="0@*,1@*"), timeout=600)
    finally:
        stop_marked(marker)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no client sent a usable update in 1 consecutive round" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aborted"] and summary["rounds"] == 0
    assert (out / "final" / "model.safetensors").exists()  # the last good (initial) model is kept


@pytest.mark.e2e
def test_one_round_with_local_dp_on_sparse_uploads(tmp_path):
    marker = new_marker()
    out = tmp_path / "dp"
    try:
        # epsilon 0.001 means noise of std ~4,850 on every uploaded value: if the mod
        # acts on what the server receives, the aggregated model is destroyed.
        proc = _run([str(BIN / "hfedmoe"), "run", "--rounds", "1", "--clients", "2", "--dp-epsilon", "0.001",
                     "--dp-clip", "1", "--out", str(out), *SMALL], _env(marker), timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finally:
        stop_marked(marker)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[1]["clients"]) == 2 and rows[1]["failures"] == []
    # The constrained client still uploads only some experts (sparse uploads survive the mod)...
    assert min(c["experts_uploaded"] for c in rows[1]["clients"]) < 24
    # ...and the noise reached the aggregate: the loss explodes from ~1.6.
    assert rows[1]["loss"] > 10 * rows[0]["loss"]
