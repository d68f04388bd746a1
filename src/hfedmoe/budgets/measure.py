"""One calibration measurement, run in a fresh process by
:func:`hfedmoe.budgets.calibration.calibrate` (so no allocation of one measurement leaks
into the next)::

    python -m hfedmoe.budgets.measure memory RUN_CONFIG_JSON EXPERTS STEPS
    python -m hfedmoe.budgets.measure time RUN_CONFIG_JSON EXPERTS,EXPERTS,... STEPS

Prints one JSON line.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace

import torch

from hfedmoe.config import RunConfig
from hfedmoe.recipe import build_model, endless, load_client_data, local_train_config
from hfedmoe.training import set_torch_threads, train_local
from hfedmoe.training.memory import bound_allocator, weight_bytes


def measure_step(cfg: RunConfig, trained_experts: int, steps: int) -> dict:
    """Peak training memory and step time with ``trained_experts`` experts per batch.

    Runs in the calling process (use a fresh one: see :func:`calibrate`).
    """
    set_torch_threads()
    bound_allocator()  # as on the clients this calibration is for (those with a memory budget)
    model = build_model(cfg, pretrained=False)
    data = load_client_data(cfg, 0)
    # The run's task loss and settings; the exact peak is what this measures
    local = replace(local_train_config(cfg), local_steps=steps, measure_memory=True)
    torch.manual_seed(cfg.seed)
    result = train_local(model, endless(data.batches), trained_experts, local)
    return {"trained_experts": trained_experts, "peak_bytes": result.peak_mem_bytes,
            "weights_bytes": weight_bytes(model)}


def measure_step_times(cfg: RunConfig, counts: list[int], repeats: int = 3, steps: int = 3) -> dict[int, float]:
    """Median step time per expert count, measured in ONE process with the counts
    interleaved (n1, n2, ..., n1, n2, ...) so machine noise hits all of them alike."""
    set_torch_threads()
    bound_allocator()
    model = build_model(cfg, pretrained=False)
    batches = endless(load_client_data(cfg, 0).batches)
    local = replace(local_train_config(cfg), local_steps=steps)  # the run's task loss and settings
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(repeats):
        for n in counts:
            times[n].append(train_local(model, batches, n, local).extra["step_s"])
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv: list[str]) -> None:
    kind, config = argv[0], RunConfig.from_json(argv[1])
    if kind == "memory":
        print(json.dumps(measure_step(config, int(argv[2]), int(argv[3]))))
    else:
        print(json.dumps(measure_step_times(config, [int(n) for n in argv[2].split(",")], steps=int(argv[3]))))


if __name__ == "__main__":
    main(sys.argv[1:])
