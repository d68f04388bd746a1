"""`hfedmoe bench`'s arithmetic: the arms' order, the steady round over repeats, and the
framework's own seconds accounted phase by phase (the whole benchmark runs in
tests/test_integration.py)."""

from __future__ import annotations

import pytest

from hfedmoe import bench
from hfedmoe.config import RunConfig


def test_arms_run_in_mirrored_order_so_a_drift_weighs_on_every_arm_alike():
    assert bench.arm_order(["inprocess"], 1) == ["inprocess", "bare"]
    assert bench.arm_order(["inprocess"], 2) == ["inprocess", "bare", "bare", "inprocess"]
    assert bench.arm_order(["inprocess", "simulation"], 3) == [
        "inprocess", "simulation", "bare", "bare", "simulation", "inprocess", "inprocess", "simulation", "bare"]


def test_the_steady_round_is_the_median_of_rounds_two_on_over_every_repeat():
    arms = [{"round_s": [30.0, 10.0, 12.0]}, {"round_s": [25.0, 11.0, 40.0]}]  # one outlier round, two start-ups
    assert bench.steady_round_s(arms) == pytest.approx(11.5)


def _row(wall_s: float, clients: list[dict], **timing) -> dict:
    return {"wall_s": wall_s, "clients": clients, "model_bytes": 100_000_000, "accuracy": 0.5,
            "timing": {"configure_s": 0.0, "clients_s": 0.0, "parse_s": 0.0, "aggregate_s": 0.0, "encode_s": 0.0,
                       "eval_s": 0.0, "checkpoint_s": 0.0, **timing}}


def _client(round_s: float, decode_s: float, encode_s: float) -> dict:
    return {"round_s": round_s, "decode_s": decode_s, "encode_s": encode_s, "bytes_up": 50_000_000}


def test_framework_seconds_are_every_phase_the_bare_loop_does_not_pay():
    # Round 2 (steady): 2 clients of 3 s training each; the server waited 6.5 s for them,
    # so 0.5 s went to decode (0.1 + 0.1), encode (0.1 + 0.1) and the engine's path (0.1).
    clients = [_client(3.0, 0.1, 0.1), _client(3.0, 0.1, 0.1)]
    timing = dict(configure_s=0.05, clients_s=6.5, parse_s=0.2, aggregate_s=0.4, encode_s=0.15, eval_s=2.0,
                  checkpoint_s=0.1, checkpoint_write_cpu_s=0.3)  # the write: in the background, during training
    rows = [_row(5.0, []), _row(15.0, clients, **timing), _row(24.5, clients, **timing)]
    phases = bench.federated_breakdown(rows, model_mb=100.0)
    assert phases["transport_s"] == pytest.approx(0.1)
    assert phases["other_s"] == pytest.approx(9.5 - 9.4)  # the round's seconds no phase accounts for
    # decode + encode + transport + configure + parse + server encode + checkpoint hand-over and write + other
    assert phases["framework_s"] == pytest.approx(0.4 + 0.1 + 0.05 + 0.2 + 0.15 + 0.1 + 0.3 + 0.1)
    fed = [{"rows": rows, "round_s": [15.0, 10.0, 9.5], "loadavg": [0, 0]}]
    bare = [{"round_s": [8.0, 9.0, 9.0]}]
    figures = bench.engine_figures(fed, bare, clients=2)
    assert figures["runtime_overhead"] == pytest.approx(9.75 / 9.0, abs=1e-3)
    assert figures["fixed_cost_per_client_s"] == pytest.approx(0.375, abs=1e-3)
    assert figures["framework_s_per_client"] == pytest.approx(1.4 / 2, abs=1e-3)
    assert figures["accounted_overhead"] == pytest.approx((9.0 + 1.4) / 9.0, abs=1e-3)


def test_the_overhead_per_repeat_pairs_each_federated_process_with_the_bare_one_of_its_repeat():
    fed = [{"round_s": [5.0, 10.0, 10.0]}, {"round_s": [5.0, 12.0, 13.0]}]
    bare = [{"round_s": [4.0, 8.0, 8.0]}, {"round_s": [4.0, 12.0, 12.0]}, {"round_s": [4.0, 1.0, 1.0]}]
    # the third bare process has no federated partner: left out
    assert bench.runtime_overhead_per_repeat(fed, bare) == [1.25, pytest.approx(12.5 / 12.0, abs=1e-3)]


def test_a_failing_arm_is_reported_with_its_name(tmp_path):
    with pytest.raises(RuntimeError, match="the bare arm of the benchmark failed"):
        bench.arm_in_fresh_process("bare", RunConfig(model="no-such-model", out=str(tmp_path)))


@pytest.mark.parametrize("value", ["-1", "x", "inf"])
def test_a_bad_checkpoint_interval_is_refused_before_any_arm_runs(value, capsys):
    from hfedmoe.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["bench", "--quick", "--checkpoint-interval", value])
    assert exited.value.code == 2
    assert "--checkpoint-interval" in capsys.readouterr().err


def test_the_checkpoint_interval_reaches_the_federated_arm(tmp_path, monkeypatch):
    seen = []

    def fake_arms(cfg, engines, repeats, out_dir, log):
        seen.append(cfg.checkpoint_interval)
        raise RuntimeError("stop here")

    monkeypatch.setattr(bench, "measure_arms", fake_arms)
    for interval in (0.0, None):
        with pytest.raises(RuntimeError, match="stop here"):
            bench.run_bench(quick=True, out_dir=tmp_path, engine="inprocess", repeats=1,
                            checkpoint_interval=interval)
    assert seen == [0.0, RunConfig().checkpoint_interval]  # None: the run's default


def test_a_warm_up_process_runs_first_and_is_not_measured(tmp_path, monkeypatch):
    calls = []

    def fake_arm(kind, cfg):
        calls.append((kind, cfg.rounds))
        return {"round_s": [1.0, 1.0], "rows": []}

    monkeypatch.setattr(bench, "arm_in_fresh_process", fake_arm)
    runs = bench.measure_arms(RunConfig(rounds=3), ["inprocess"], 2, tmp_path, log=lambda text: None)
    assert calls == [("bare", 1), ("inprocess", 3), ("bare", 3), ("bare", 3), ("inprocess", 3)]
    assert [len(runs[kind]) for kind in ("inprocess", "bare")] == [2, 2]  # the warm-up is in neither
