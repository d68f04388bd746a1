"""Client resources made real: measured peak memory, calibration, memory -> C_budget.

Peak memory on CPU is the kernel's high-water mark of resident memory (``VmHWM``),
reset when a local round starts. A client's *training memory* is reported as

    weights + (VmHWM during local training - VmRSS just before it)

which is what :class:`hfedmoe.core.budget.MemoryModel` predicts: the model's
weights plus everything training adds (gradients, optimizer state, activations),
and nothing the process held for other reasons (libraries, message buffers). Freed
memory is trimmed back to the kernel before the baseline is read, so earlier
rounds' garbage does not hide this round's peak.
On CUDA the figure would be ``torch.cuda.max_memory_allocated`` (not wired: no GPU
here).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.core.budget import MemoryModel, analytic_memory_model, fit_memory_model


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    """Hand memory that is already freed back to the kernel (glibc ``malloc_trim``), so
    a baseline taken next is not inflated by earlier garbage. (Forcing every large
    block onto its own mmap would make RSS exact, but measured 1.7x slower steps.)
    A no-op where glibc is not the allocator."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def bound_allocator(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of ``threshold_bytes`` or more from its own mmap (glibc).

    Why: glibc raises its mmap threshold as large blocks are freed (up to 32 MB), so
    in a long-lived process -- a simulation worker serving client after client --
    tensors of 1-32 MB move onto the heap, which fragments and does not shrink. The
    same local round then peaks higher round after round, whatever its expert budget
    (measured, 4 clients x 3 rounds of the default run: 1516 -> 1853 MB for the same
    client; 7 of 12 client rounds over their memory budget). With a fixed threshold
    each such block is its own mapping, returned to the kernel when freed: the peaks
    stayed flat across rounds and ~30% lower (1093 -> 1119 MB), for ~30% longer local
    rounds (page faults on fresh mappings). So clients with a memory budget (and
    ``hfedmoe calibrate``, which measures for them) use it; others keep glibc's
    default. Process-wide and permanent; returns False where mallopt is unavailable.
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def memtrace(point: str, **extra) -> None:
    """Diagnostics: append this process's memory counters (MB) to the jsonl file named by
    $HFEDMOE_MEMTRACE; a no-op when it is unset. The client app and the trainer call it
    at a round's entry, around the state conversion, at the baseline and after every
    step, which is how the memory of a long-lived simulation worker was traced (issue 5)."""
    path = os.environ.get("HFEDMOE_MEMTRACE")
    if not path:
        return
    row = {"pid": os.getpid(), "t": time.time(), "point": point, **extra}
    for field in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
        value = _status_bytes(field)
        row[field] = None if value is None else round(value / 1e6, 1)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class PeakMemory:
    """Peak resident memory added by a block of code (Linux /proc; CPU runs).

    ``added_bytes``: VmHWM at the end minus VmRSS at the start, with the high-water
    mark reset on entry. Where /proc is unavailable it falls back to the process's
    lifetime ``ru_maxrss`` (an over-estimate) and says so in ``exact``.
    """

    def __enter__(self) -> "PeakMemory":
        gc.collect()  # garbage held only by reference cycles is freed now, not mid-training
        _release_free_memory()
        self.exact = True
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            self.exact = False
        self.start_rss = _status_bytes("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        peak = _status_bytes("VmHWM") if self.exact else None
        if peak is None:
            import resource

            self.exact = False
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_rss = peak
        self.added_bytes = max(0, peak - self.start_rss)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
    from hfedmoe.task import resolve_model_path

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


def measure_step(cfg: RunConfig, trained_experts: int, steps: int) -> dict:
    """Peak training memory and step time with ``trained_experts`` experts per batch.

    Runs in the calling process (use a fresh one: see :func:`calibrate`).
    """
    from hfedmoe.task import build_model, endless, load_client_data
    from hfedmoe.train import LocalTrainConfig, set_torch_threads, train_local

    set_torch_threads()
    bound_allocator()  # as on the clients this calibration is for (those with a memory budget)
    model = build_model(cfg, pretrained=False)
    data = load_client_data(cfg, 0)
    local = LocalTrainConfig(local_steps=steps, lr=cfg.lr, lam=cfg.lam, beta=cfg.beta)
    torch.manual_seed(cfg.seed)
    result = train_local(model, endless(data.batches), trained_experts, local)
    return {"trained_experts": trained_experts, "peak_bytes": result.peak_mem_bytes,
            "weights_bytes": weight_bytes(model)}


def measure_step_times(cfg: RunConfig, counts: list[int], repeats: int = 3, steps: int = 3) -> dict[int, float]:
    """Median step time per expert count, measured in ONE process with the counts
    interleaved (n1, n2, ..., n1, n2, ...) so machine noise hits all of them alike."""
    from hfedmoe.task import build_model, endless, load_client_data
    from hfedmoe.train import LocalTrainConfig, set_torch_threads, train_local

    set_torch_threads()
    bound_allocator()
    model = build_model(cfg, pretrained=False)
    batches = endless(load_client_data(cfg, 0).batches)
    local = LocalTrainConfig(local_steps=steps, lr=cfg.lr, lam=cfg.lam, beta=cfg.beta)
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(repeats):
        for n in counts:
            times[n].append(train_local(model, batches, n, local).extra["step_s"])
    return {n: statistics.median(t) for n, t in times.items()}


def _fresh_process(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "hfedmoe.resources", *args]
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
        point = _fresh_process(["memory", cfg.to_json(), str(n), str(steps)])
        points.append(point)
        log(f"  {n:>4} experts/batch: peak {point['peak_bytes'] / 1e6:8.1f} MB  ({time.perf_counter() - start:.0f} s)")
    log("  step times (one process, counts interleaved) ...")
    step_s = _fresh_process(["time", cfg.to_json(), ",".join(map(str, counts)), str(steps)])
    for point in points:
        point["step_s"] = step_s[str(point["trained_experts"])]
    model = fit_memory_model([p["trained_experts"] for p in points], [p["peak_bytes"] for p in points])
    for p in points:
        p["predicted_bytes"] = model.predict(p["trained_experts"])
        p["error"] = p["predicted_bytes"] / p["peak_bytes"] - 1.0
    return {"key": calibration_key(cfg), "memory_model": model.to_dict(), "points": points,
            "batch_size": cfg.batch_size, "max_length": cfg.max_length, "num_experts": cfg.num_experts,
            "max_abs_error": max(abs(p["error"]) for p in points)}


if __name__ == "__main__":  # one measurement, in a fresh process (see calibrate)
    kind, config = sys.argv[1], RunConfig.from_json(sys.argv[2])
    if kind == "memory":
        print(json.dumps(measure_step(config, int(sys.argv[3]), int(sys.argv[4]))))
    else:
        print(json.dumps(measure_step_times(config, [int(n) for n in sys.argv[3].split(",")], steps=int(sys.argv[4]))))


# --- budgets of a run ---------------------------------------------------------------------

class ClientBudget:
    """One client's resources: C_budget, and the memory/time budgets behind it."""

    def __init__(self, expert_budget: int, mem_budget_bytes: int | None = None, time_budget_s: float | None = None):
        self.expert_budget = expert_budget
        self.mem_budget_bytes = mem_budget_bytes
        self.time_budget_s = time_budget_s

    def message_config(self) -> dict:
        """The entries of this client's training message (ConfigRecord values)."""
        config: dict = {"expert-budget": self.expert_budget}
        if self.mem_budget_bytes is not None:
            config["mem-budget-bytes"] = self.mem_budget_bytes
        if self.time_budget_s is not None:
            config["time-budget-s"] = float(self.time_budget_s)
        return config

    def __repr__(self) -> str:
        mem = f", {self.mem_budget_bytes / 1e6:.0f} MB" if self.mem_budget_bytes else ""
        return f"{self.expert_budget}{mem}"


def memory_budgets(cfg: RunConfig) -> list[int] | None:
    """Per-client memory budgets in bytes from --mem-budgets or --mem-budget-range."""
    import random

    from hfedmoe.core.budget import parse_bytes

    if cfg.mem_budgets:
        return [parse_bytes(m) for m in cfg.mem_budgets]
    if cfg.mem_budget_range:
        low, high = cfg.mem_budget_bounds()
        rng = random.Random(cfg.seed)  # seeded: the same draw for every method and rerun
        return [int(rng.uniform(low, high)) for _ in range(cfg.clients)]
    return None


def client_budgets(cfg: RunConfig, access, node_memory: dict[int, int] | None = None) -> list[ClientBudget]:
    """C_budget (and memory/time budgets) of every client, by partition id.

    ``node_memory`` (partition id -> bytes) are memory budgets reported by the
    SuperNodes themselves (deployment: ``--node-config 'mem-budget=...'``); they
    take precedence over the run's flags.
    """
    from hfedmoe.core.budget import expert_budget_for_memory

    total = access.num_layers * access.num_experts
    mems = memory_budgets(cfg)
    if node_memory:
        mems = list(mems or [None] * cfg.clients)
        for pid, value in node_memory.items():
            mems[pid] = value
    if mems is None or all(m is None for m in mems):
        experts = cfg.budgets_for(access.num_layers, access.num_experts)
        mems = [None] * cfg.clients
    else:
        model = load_memory_model(cfg, access)
        default = cfg.budgets_for(access.num_layers, access.num_experts)
        experts = []
        for i, mem in enumerate(mems):
            if mem is None:
                experts.append(default[i])
                continue
            try:
                experts.append(expert_budget_for_memory(mem, model, access.num_layers, total, cfg.mem_headroom))
            except ValueError as err:
                raise ConfigError(f"client {i}: {err}; raise its memory budget") from None
    times = cfg.time_budgets or [None] * cfg.clients
    return [ClientBudget(e, m, t) for e, m, t in zip(experts, mems, times)]
