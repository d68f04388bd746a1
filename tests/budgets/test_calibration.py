"""hfedmoe.budgets.calibration: the fit and the cache entry calibrate() writes, with the
fresh-process measurements stubbed (each real one loads the model: minutes here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from hfedmoe.budgets import calibration
from hfedmoe.config import RunConfig


def test_calibrate_fits_the_points_it_measured(monkeypatch):
    calls = []

    def measured(args):
        calls.append(args[0])
        if args[0] == "memory":
            n = int(args[2])
            return {"trained_experts": n, "peak_bytes": 500_000_000 + n * 10_000_000, "weights_bytes": 1}
        return {"6": 0.5, "48": 1.0}

    monkeypatch.setattr(calibration, "run_in_fresh_process", measured)
    cfg = RunConfig(batch_size=4, max_length=16)
    result = calibration.calibrate(cfg, [6, 48], steps=1, log=lambda text: None)
    assert calls == ["memory", "memory", "time"], "one fresh process per peak, one for all step times"
    assert result["key"] == calibration.calibration_key(cfg)
    assert result["memory_model"]["base_bytes"] == pytest.approx(500_000_000)
    assert result["memory_model"]["per_expert_bytes"] == pytest.approx(10_000_000)
    assert [p["step_s"] for p in result["points"]] == [0.5, 1.0]
    assert result["max_abs_error"] == pytest.approx(0.0, abs=1e-9)


def test_the_fresh_process_runs_this_module(monkeypatch):
    seen = {}

    class Done:
        returncode, stdout, stderr = 0, '{"ok": 1}\n', ""

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        return Done()

    monkeypatch.setattr(calibration.subprocess, "run", run)
    assert calibration.run_in_fresh_process(["memory", "{}", "6", "1"]) == {"ok": 1}
    module = seen["cmd"][seen["cmd"].index("-m") + 1]
    assert module == calibration.MEASURE_MODULE and importlib.util.find_spec(module) is not None


def test_the_measurement_module_runs_unloaded_by_its_package():
    """`python -m` warns (and runs a second copy) when the package already imported the module."""
    code = "import sys, hfedmoe.budgets; print(hfedmoe.budgets.calibration.MEASURE_MODULE in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
