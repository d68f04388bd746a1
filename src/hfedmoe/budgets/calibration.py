"""Memory calibration: measure a client's peak training memory at several expert counts
(each in a fresh process), fit M(n) = base + n * per_expert, and cache it where runs
find it; without a calibration, the analytic estimate from the model's shape.

Measurement itself is :mod:`hfedmoe.training.memory`, one measurement in a fresh
process :mod:`hfedmoe.budgets.measure`; turning budgets into C_budget is
:mod:`hfedmoe.budgets.client_budgets`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.core.budget import MemoryModel, analytic_memory_model, fit_memory_model
from hfedmoe.recipe import resolve_model_path
from hfedmoe.training.memory import weight_bytes


def analytic_model_for(access, batch_size: int, max_length: int) -> MemoryModel:
    """First-principles memory model of the run's model (used without a calibration)."""
    model = access.model
    params = dict(model.named_parameters())
    groups = access.param_groups()
    # Dense and router keys are real parameter names in every layout; the experts
    # (separate modules or slices of fused tensors) are everything else.
    shared = set(groups.dense) | set(groups.routers)
    dense = sum(p.numel() * p.element_size() for n, p in params.items() if n in shared)
    # Frozen parameters (LoRA's base weights) are resident but get no gradient or moments:
    # a trained expert costs its trainable tensors only (with full fine-tuning: all of them).
    experts = sum(p.numel() * p.element_size() for n, p in params.items() if n not in shared and p.requires_grad)
    per_expert = experts / max(1, access.num_layers * access.num_experts)
    hidden = getattr(getattr(model, "backbone", model), "config", None)
    width = getattr(hidden, "hidden_size", 384)
    inter = getattr(hidden, "intermediate_size", 4 * width)
    layers = access.num_layers
    tokens = batch_size * max_length
    # Per layer about 16 saved [tokens, width] tensors (attention, norms, residuals).
    activation_base = 16 * tokens * width * 4 * layers
    # A trained expert keeps its [tokens routed, inter] activations (x2: pre/post GELU).
    top_k = access.memory_estimate_top_k()
    activation_per_expert = 2 * (tokens * top_k // access.num_experts) * inter * 4
    # Fused tensors trained by full fine-tuning: full-size gradients, per-slice moments.
    fused = experts if access.optimizer_slices_experts else None
    return analytic_memory_model(weight_bytes(model), dense, int(per_expert), activation_base,
                                 activation_per_expert, fused_expert_bytes=fused)


# --- calibration ------------------------------------------------------------------------

def calibration_key(cfg: RunConfig) -> str:
    """What a memory calibration depends on: model, experts, batch shape."""
    ident = json.dumps({"model": str(resolve_model_path(cfg)), "num_experts": cfg.num_experts,
                        "top_k": cfg.top_k, "batch_size": cfg.batch_size, "max_length": cfg.max_length})
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def default_calibration_path(cfg: RunConfig) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hfedmoe" / "calibration"
    return cache / f"{calibration_key(cfg)}.json"


def load_memory_model(cfg: RunConfig, access) -> MemoryModel:
    """The calibrated model for this run's shape if one exists, else the analytic one."""
    path = Path(cfg.calibration) if cfg.calibration else default_calibration_path(cfg)
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("key") != calibration_key(cfg):
            if cfg.calibration:
                raise ConfigError(f"{path} was calibrated for another model or batch shape: "
                                  "rerun `hfedmoe calibrate` with this run's flags")
        else:
            return MemoryModel(**data["memory_model"])
    elif cfg.calibration:
        raise ConfigError(f"calibration file {path} does not exist: run `hfedmoe calibrate --out {path}`")
    return analytic_model_for(access, cfg.batch_size, cfg.max_length)


# The module a fresh measurement process runs (not imported by this package, so that
# ``python -m`` finds it unloaded).
MEASURE_MODULE = "hfedmoe.budgets.measure"


def run_in_fresh_process(args: list[str]) -> dict:
    """Run ``python -m hfedmoe.budgets.measure ARGS`` and return the JSON it prints last."""
    cmd = [sys.executable, "-m", MEASURE_MODULE, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"measurement {args[1:]} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def calibrate(cfg: RunConfig, counts: list[int], steps: int = 4, log=print) -> dict:
    """Peak memory at each expert count (each in a fresh process, so no allocation of
    one measurement leaks into the next), then step times (one process, interleaved)."""
    points = []
    for n in counts:
        start = time.perf_counter()
        point = run_in_fresh_process(["memory", cfg.to_json(), str(n), str(steps)])
        points.append(point)
        log(f"  {n:>4} experts/batch: peak {point['peak_bytes'] / 1e6:8.1f} MB  ({time.perf_counter() - start:.0f} s)")
    log("  step times (one process, counts interleaved) ...")
    step_s = run_in_fresh_process(["time", cfg.to_json(), ",".join(map(str, counts)), str(steps)])
    for point in points:
        point["step_s"] = step_s[str(point["trained_experts"])]
    model = fit_memory_model([p["trained_experts"] for p in points], [p["peak_bytes"] for p in points])
    for p in points:
        p["predicted_bytes"] = model.predict(p["trained_experts"])
        p["error"] = p["predicted_bytes"] / p["peak_bytes"] - 1.0
    return {"key": calibration_key(cfg), "memory_model": model.to_dict(), "points": points,
            "batch_size": cfg.batch_size, "max_length": cfg.max_length, "num_experts": cfg.num_experts,
            "max_abs_error": max(abs(p["error"]) for p in points)}
