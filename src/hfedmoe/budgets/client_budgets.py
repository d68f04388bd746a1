"""The budgets of a run: C_budget per client, from expert counts, memory budgets (through
the calibrated or analytic memory model) or time budgets."""

from __future__ import annotations

import random

from hfedmoe.budgets.calibration import load_memory_model
from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.core.budget import expert_budget_for_memory, parse_bytes


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
    if cfg.mem_budgets:
        return [parse_bytes(m) for m in cfg.mem_budgets]
    if cfg.mem_budget_range:
        low, high = cfg.mem_budget_bounds()
        rng = random.Random(cfg.seed)  # seeded: the same draw for every method and rerun
        return [int(rng.uniform(low, high)) for _ in range(cfg.clients)]
    return None


def client_budgets(cfg: RunConfig, access, node_memory: dict[int, int] | None = None,
                   log=None) -> list[ClientBudget]:
    """C_budget (and memory/time budgets) of every client, by partition id.

    ``node_memory`` (partition id -> bytes) are memory budgets reported by the
    SuperNodes themselves (deployment: ``--node-config 'mem-budget=...'``); they
    take precedence over the run's flags. Memory budgets go through
    :func:`~hfedmoe.budgets.calibration.load_memory_model`, which measures a
    calibration first when this shape has none cached (progress to ``log``, default
    stderr).
    """
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
        model = load_memory_model(cfg, access, log)
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
