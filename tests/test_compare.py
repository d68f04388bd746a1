"""`hfedmoe compare`: planning, the results it writes, resuming, and one real Flower run.

The multi-method test runs in this process (hfedmoe.fl.inprocess: the real
ServerApp/ClientApp code without Ray) on a shrunken config; one test goes through
the command line and Flower's simulation engine, and checks that no process it
started is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hfedmoe import cli
from hfedmoe.compare import parse_methods, parse_sweep, plan_runs, run_compare
from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.methods import METHODS

from proc_marker import MARKER, marked_pids, new_marker, stop_marked

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = dict(rounds=1, clients=2, local_steps=1, batch_size=4, max_length=16, num_experts=4, eval_batch_size=128,
             test_fraction=0.05)
SMALL_FLAGS = ["--rounds", "1", "--clients", "2", "--local-steps", "1", "--batch-size", "4", "--max-length", "16",
               "--num-experts", "4", "--eval-batch-size", "128", "--test-fraction", "0.05"]


def test_methods_and_sweeps_parse_with_one_line_errors():
    assert parse_methods("hfedmoe, fedavg") == ["hfedmoe", "fedavg"]
    sweep = parse_sweep("lam=1.0,0.9,0.8")
    assert (sweep.key, sweep.values, sweep.labels) == ("lam", (1.0, 0.9, 0.8), ("lam=1.0", "lam=0.9", "lam=0.8"))
    assert parse_sweep("tau=0,0.05").values == (0.0, 0.05)
    assert parse_sweep("select-by=ib,importance").key == "select_by"
    for bad, message in [("fedsgd", "unknown method 'fedsgd'"), ("hfedmoe,hfedmoe", "twice"), ("", "no method")]:
        with pytest.raises(ConfigError, match=message):
            parse_methods(bad)
    for bad, message in [("lam", "KEY=V1,V2"), ("lam=", "KEY=V1,V2"), ("nope=1", "not a setting"),
                         ("seed=1,2", "not a setting"), ("rounds=1.5", "not a valid int"), ("lam=1,1.0", "twice")]:
        with pytest.raises(ConfigError, match=message):
            parse_sweep(bad)


def test_plan_runs_one_run_per_method_and_seed_validated_up_front(tmp_path):
    base = RunConfig(**SMALL, seed=5)
    runs = plan_runs(base, tmp_path, ["hfedmoe", "fedavg"], seeds=2)
    assert [(r.label, r.seed, r.cfg.method) for r in runs] == [
        ("hfedmoe", 5, "hfedmoe"), ("hfedmoe", 6, "hfedmoe"), ("fedavg", 5, "fedavg"), ("fedavg", 6, "fedavg")]
    assert runs[3].run_dir == tmp_path / "runs" / "fedavg" / "seed-6"
    swept = plan_runs(base, tmp_path, None, seeds=1, sweep=parse_sweep("tau=0,0.1"))
    assert [(r.label, r.cfg.method, r.cfg.tau) for r in swept] == [("tau=0", "hfedmoe", 0.0),
                                                                     ("tau=0.1", "hfedmoe", 0.1)]
    assert len(plan_runs(base, tmp_path, None, seeds=1)) == len(METHODS) == 8  # every method by default
    with pytest.raises(ConfigError, match="lam=2: --lam must lie in"):
        plan_runs(base, tmp_path, None, seeds=1, sweep=parse_sweep("lam=0.5,2"))
    with pytest.raises(ConfigError, match="either --sweep or --methods"):
        plan_runs(base, tmp_path, ["hfedmoe"], seeds=1, sweep=parse_sweep("lam=1"))
    with pytest.raises(ConfigError, match="--seeds must be a positive integer"):
        plan_runs(base, tmp_path, ["hfedmoe"], seeds=0)
    with pytest.raises(ConfigError, match="minimum budget is 6"):
        plan_runs(RunConfig(**{**SMALL, "expert_budgets": [24, 3]}), tmp_path, ["random"], seeds=1)
    assert not any(tmp_path.iterdir()), "planning writes nothing"


def test_cli_compare_rejects_mistakes_in_one_line(tmp_path, capsys):
    for argv in (["--methods", "hfedmoe,nope"], ["--sweep", "lam:1"], ["--method", "fedavg"],
                 ["--methods", "pfl-moe", "--gate-agg", "fedavg"], ["--target-accuracy", "1.5"]):
        assert cli.main(["compare", "--out", str(tmp_path / "c"), *SMALL_FLAGS, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hfedmoe: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "c").exists()


@pytest.fixture
def one_thread(monkeypatch):
    """The in-process engine sets torch's threads from OMP_NUM_THREADS: one is fastest on a busy
    2-core machine, and the process's setting is restored for the tests that follow."""
    import torch

    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def test_compare_in_process_writes_results_and_resumes(tmp_path, one_thread):
    out = tmp_path / "cmp"
    base = RunConfig(**SMALL, expert_budgets=[24, 12])
    # A run that stopped before its first checkpoint is started again, not reused.
    partial = out / "runs" / "hfedmoe" / "seed-0"
    partial.mkdir(parents=True)
    (partial / "metrics.jsonl").write_text('{"round": 0}\n')
    lines: list[str] = []
    # engine auto (the default): the in-process engine where clients train one at a time
    results = run_compare(base, out, methods=["hfedmoe", "fedavg"], seeds=1, target_accuracy=0.2, log=lines.append)

    assert results["settings"]["engine"] == "inprocess"
    assert any("removing the unfinished run" in line for line in lines)
    assert sum("final accuracy" in line for line in lines) == 2, "one progress line per finished run"
    saved = json.loads((out / "results.json").read_text())
    assert [e["label"] for e in saved["results"]] == ["hfedmoe", "fedavg"]
    by_label = {e["label"]: e for e in saved["results"]}
    for e in saved["results"]:
        assert 0.0 <= e["final_accuracy"]["mean"] <= 1.0 and e["final_accuracy"]["std"] == 0.0
        assert e["best_accuracy"]["mean"] >= e["final_accuracy"]["mean"] - 1e-12
        assert e["wall_s"]["mean"] > 0 and e["bytes_up"]["mean"] > 0
        assert e["rounds_to_target"]["runs"] == 1
        assert len(e["runs"][0]["accuracy"]) == 2  # rounds 0 and 1
        assert len(e["selected_fraction_per_layer"]) == 6
    hfedmoe, fedavg = by_label["hfedmoe"], by_label["fedavg"]
    assert hfedmoe["failed_client_rounds"]["total"] == 0 and hfedmoe["budget_violations"]["total"] == 0
    assert 6 <= hfedmoe["experts_trained_mean"]["mean"] <= 18  # (24 + 12) / 2 at most
    # FedAvg under budgets: the 12-expert client cannot train all 24 experts and fails its round.
    assert fedavg["failed_client_rounds"]["total"] == 1 and fedavg["experts_trained_mean"]["mean"] == 24
    assert fedavg["selected_fraction_per_layer"] == [1.0] * 6
    assert (hfedmoe["expert_agg"], hfedmoe["gate_agg"], fedavg["gate_agg"]) == ("hfedmoe", "hfedmoe", "fedavg")
    assert results["failed_runs"] == []

    md = (out / "results.md").read_text()
    assert "| hfedmoe | " in md and "| fedavg | " in md and "rounds to 0.2" in md and "1 / 2" in md
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "expert_usage_hfedmoe.png",
                 "experts_per_layer.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"]({name})" in md

    # Rerun: every (method, seed) already has summary.json, nothing runs again.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed-*/summary.json")}
    lines.clear()
    start = time.perf_counter()
    again = run_compare(base, out, methods=["hfedmoe", "fedavg"], seeds=1, target_accuracy=0.2,
                        engine="inprocess", log=lines.append)
    assert time.perf_counter() - start < 20
    assert sum("done before, reusing" in line for line in lines) == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["results"][0]["final_accuracy"] == saved["results"][0]["final_accuracy"]
    # Other settings in the same directory: refused, not silently mixed.
    with pytest.raises(ConfigError, match="--engine must be one of auto, inprocess, simulation"):
        run_compare(base, out, methods=["hfedmoe"], seeds=1, engine="ray", log=lines.append)
    with pytest.raises(ConfigError, match="other settings"):
        run_compare(RunConfig(**{**SMALL, "lr": 1e-3}, expert_budgets=[24, 12]), out, methods=["hfedmoe"],
                    seeds=1, engine="inprocess", log=lines.append)


@pytest.mark.e2e
def test_cli_compare_on_flowers_simulation_engine(tmp_path):
    """Flower's simulation engine end to end: FedAvg's training failure crosses Flower's wire; no
    process is left. (`--engine auto`, the default, takes the in-process engine on this CPU.)"""
    marker = new_marker()
    out = tmp_path / "flower"
    env = {**os.environ, MARKER: marker, "HF_HUB_OFFLINE": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        proc = subprocess.run(
            [str(BIN / "hfedmoe"), "compare", "--methods", "fedavg", "--seeds", "1", "--expert-budgets", "24,12",
             "--engine", "simulation", "--out", str(out), *SMALL_FLAGS],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        time.sleep(1.0)
        assert marked_pids(marker) == [], "the comparison left processes behind"
    finally:
        stop_marked(marker)
    assert "[1/1] fedavg seed 0: final accuracy" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["engine"] == "simulation"
    fedavg = results["results"][0]
    assert fedavg["failed_client_rounds"]["total"] == 1
    metrics = out / "runs" / "fedavg" / "seed-0" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[1]["failures"][0]["kind"] == "training-failure" and rows[1]["failures"][0]["id"] == 1
    assert [c["id"] for c in rows[1]["clients"]] == [0]
