"""Memory calibration: measure a client's peak training memory at several expert counts
(each in a fresh process), fit M(n) = base + n * per_expert, raise it to cover every
measured peak, and cache it where runs find it. A run with memory budgets and no
calibration for its shape measures one on first use (:func:`auto_calibrate`); the
analytic estimate from the model's shape (``--calibration analytic``) measures nothing
and may lie below the real peak.

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
from dataclasses import replace
from pathlib import Path

from hfedmoe.config import ANALYTIC_CALIBRATION, ConfigError, RunConfig
from hfedmoe.core.budget import MemoryModel, analytic_memory_model, cover_measurements, fit_memory_model
from hfedmoe.recipe import resolve_model_path
from hfedmoe.recipe.device import dtype_name, resolve_dtype, run_device, run_dtype
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

def calibration_identity(cfg: RunConfig) -> dict:
    """Everything a memory calibration depends on: the model and how it is trained
    (experts, LoRA, 4-bit, gradient checkpointing, task), the batch shape, and the
    device type and dtype this process resolves (a CPU and a GPU measure different
    memories; bfloat16 halves the weights)."""
    device = run_device(cfg)
    return {"model": str(resolve_model_path(cfg)), "num_experts": cfg.num_experts, "top_k": cfg.top_k,
            "batch_size": cfg.batch_size, "max_length": cfg.max_length, "task": cfg.task,
            "classifier": cfg.classifier, "device": device.type,
            "dtype": dtype_name(resolve_dtype(cfg.dtype, device)), "lora_rank": cfg.lora_rank,
            "lora_targets": cfg.lora_targets if cfg.lora_rank else "", "load_in_4bit": cfg.load_in_4bit,
            "gradient_checkpointing": cfg.gradient_checkpointing}


def calibration_key(cfg: RunConfig) -> str:
    """A short hash of :func:`calibration_identity`: the cache file's name."""
    ident = json.dumps(calibration_identity(cfg), sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def default_calibration_path(cfg: RunConfig) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hfedmoe" / "calibration"
    return cache / f"{calibration_key(cfg)}.json"


def default_counts(num_layers: int, total: int) -> list[int]:
    """Expert counts a calibration measures: 1/8, 1/4, 1/2 and all of the experts, never
    below one per MoE layer (the least a client trains)."""
    return sorted({max(num_layers, total // 8), max(num_layers, total // 4), max(num_layers, total // 2), total})


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _read_cache(path: Path, key: str) -> dict | None:
    """The cached calibration at ``path`` if it is readable and for ``key``, else None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or "memory_model" not in data:
        return None
    return data


def write_calibration(path: Path, result: dict) -> None:
    """Write a calibration atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def auto_calibrate(cfg: RunConfig, access, log=_stderr) -> dict:
    """Measure the memory model of this run's shape (first use) and cache it.

    The peaks are measured as ``hfedmoe calibrate`` measures them (each count in a
    fresh process, ``--local-steps`` steps each, the default counts); the step-time
    pass of ``hfedmoe calibrate`` is left out, budgets need memory only.
    """
    path = default_calibration_path(cfg)
    layers, total = access.num_layers, access.num_layers * access.num_experts
    counts = default_counts(layers, total)
    steps = cfg.local_steps
    log(f"no memory calibration for this model and batch shape yet: measuring {len(counts)} points "
        f"({', '.join(map(str, counts))} of {total} experts trained per batch, batch {cfg.batch_size} x "
        f"{cfg.max_length} tokens, {steps} steps each, on {calibration_identity(cfg)['device']}), each in a fresh "
        f"process (first use only; cached in {path}) ...")
    start = time.perf_counter()
    try:
        result = calibrate(cfg, counts, steps=steps, log=log, times=False)
    except RuntimeError as err:  # a measurement process failed: say what to do instead of a traceback
        raise ConfigError(f"measuring the memory calibration failed: {err}\nfix the cause above, or pass "
                          "--calibration analytic (the unmeasured estimate, which may lie below the real peak)") from None
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["auto"] = True
    write_calibration(path, result)
    model = result["memory_model"]
    log(f"memory model: {model['base_bytes'] / 1e6:.1f} MB + {model['per_expert_bytes'] / 1e6:.2f} MB per trained "
        f"expert (covers every measured peak; least-squares fit within {result['max_abs_error']:.1%}), "
        f"measured in {result['wall_s']:.0f} s; written to {path}")
    return result


def load_memory_model(cfg: RunConfig, access, log=None) -> MemoryModel:
    """The memory model budgets are planned on.

    ``--calibration analytic``: the first-principles estimate (no measurement; it may lie
    below the real peak). ``--calibration FILE``: that file (ConfigError if missing or
    for another shape). Unset: the cached calibration of this run's shape, measured now
    (:func:`auto_calibrate`, progress to ``log``, default stderr) if there is none yet,
    or if the cached one measured fewer steps per point than this run's ``--local-steps``.
    """
    if cfg.calibration == ANALYTIC_CALIBRATION:
        return analytic_model_for(access, cfg.batch_size, cfg.max_length)
    key = calibration_key(cfg)
    if cfg.calibration:
        path = Path(cfg.calibration)
        if not path.is_file():
            raise ConfigError(f"calibration file {path} does not exist: run `hfedmoe calibrate "
                              f"--calibration-out {path}` with this run's flags, or drop --calibration (the run then "
                              "measures on first use)")
        data = _read_cache(path, key)
        if data is None:
            raise ConfigError(f"{path} was calibrated for another model, batch shape, device or dtype (or is not a "
                              "calibration): rerun `hfedmoe calibrate` with this run's flags")
        return MemoryModel(**data["memory_model"])
    log = log or _stderr
    path = default_calibration_path(cfg)
    data = _read_cache(path, key)
    if data is not None and int(data.get("steps", 0)) < cfg.local_steps:
        # Peaks creep up over a round's steps (measured: about 1% per step on the CPU), so a
        # calibration over fewer steps than this run trains is no upper bound for it.
        log(f"the cached memory calibration ({path}) was measured over {data.get('steps', '?')} steps per point; "
            f"this run trains {cfg.local_steps} per round: measuring again")
        data = None
    if data is None:
        data = auto_calibrate(cfg, access, log)
    return MemoryModel(**data["memory_model"])


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


def calibrate(cfg: RunConfig, counts: list[int], steps: int = 4, log=print, times: bool = True) -> dict:
    """Peak memory at each expert count (each in a fresh process, so no allocation of
    one measurement leaks into the next), then (``times``) step times (one process,
    interleaved).

    The memory model is the least-squares line through the peaks, raised so that it
    covers every one of them (:func:`hfedmoe.core.budget.cover_measurements`); the
    result records the fit's own base and by how much it was raised.
    """
    # The measurement processes train in the dtype this process resolves (the key's).
    cfg = replace(cfg, dtype=dtype_name(run_dtype(cfg)))
    points = []
    for n in counts:
        start = time.perf_counter()
        point = run_in_fresh_process(["memory", cfg.to_json(), str(n), str(steps)])
        points.append(point)
        log(f"  {n:>4} experts/batch: peak {point['peak_bytes'] / 1e6:8.1f} MB  ({time.perf_counter() - start:.0f} s)")
    if times:
        log("  step times (one process, counts interleaved) ...")
        step_s = run_in_fresh_process(["time", cfg.to_json(), ",".join(map(str, counts)), str(steps)])
        for point in points:
            point["step_s"] = step_s[str(point["trained_experts"])]
    xs, ys = [p["trained_experts"] for p in points], [p["peak_bytes"] for p in points]
    fit = fit_memory_model(xs, ys)
    model = cover_measurements(fit, xs, ys)
    for p in points:
        p["fit_bytes"] = fit.predict(p["trained_experts"])
        p["predicted_bytes"] = model.predict(p["trained_experts"])
        p["error"] = p["fit_bytes"] / p["peak_bytes"] - 1.0
        p["margin"] = p["predicted_bytes"] / p["peak_bytes"] - 1.0
    return {"key": calibration_key(cfg), "identity": calibration_identity(cfg), "memory_model": model.to_dict(),
            "upper_bound": {"fit_base_bytes": fit.base_bytes, "raised_by_bytes": model.base_bytes - fit.base_bytes,
                            "covers_every_point": all(p["predicted_bytes"] >= p["peak_bytes"] for p in points)},
            "points": points, "steps": steps,
            "batch_size": cfg.batch_size, "max_length": cfg.max_length, "num_experts": cfg.num_experts,
            "max_abs_error": max(abs(p["error"]) for p in points)}
