"""Resources: memory model, memory -> C_budget, budgets of a run, peak memory, time budget."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.core.budget import (
    MemoryModel,
    analytic_memory_model,
    expert_budget_for_memory,
    fit_memory_model,
    parse_bytes,
)
from hfedmoe.budgets import client_budgets, memory_budgets
from hfedmoe.moe.modular import ModularMoEAccess
from hfedmoe.training import LocalTrainConfig, train_local
from hfedmoe.training.memory import PeakMemory

from builders import L, S, tiny_moe


@pytest.mark.parametrize("text, expected", [
    ("600MB", 600_000_000), ("1.2GB", 1_200_000_000), ("512MiB", 512 * 2**20), ("2e9", 2_000_000_000),
    ("100", 100), (" 3 kb ", 3000), (2048, 2048),
])
def test_parse_bytes_reads_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "12 parsecs", "-5MB", "0", "nan"])
def test_parse_bytes_rejects_nonsense_with_the_fix(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


def test_fit_recovers_an_exact_line_and_predicts():
    model = fit_memory_model([6, 12, 24, 48], [100 + 6 * 3, 100 + 12 * 3, 100 + 24 * 3, 100 + 48 * 3])
    assert model.base_bytes == pytest.approx(100) and model.per_expert_bytes == pytest.approx(3)
    assert model.predict(10) == pytest.approx(130)
    with pytest.raises(ValueError, match="two or more"):
        fit_memory_model([6, 6], [1, 2])


def test_analytic_model_counts_three_copies_of_trained_parameters():
    # weights 1000 + (dense 100 x 3 = grads + 2 AdamW moments) + activations 50
    model = analytic_memory_model(1000, 100, 10, 50, 5)
    assert model.base_bytes == 1000 + 300 + 50
    assert model.per_expert_bytes == 30 + 5


def test_analytic_model_of_fused_experts_puts_their_gradient_in_the_base():
    # 8 experts of 10 bytes in fused tensors: one full-size gradient (80) always, and a
    # trained expert adds its two AdamW moments (2 x 10) plus its activations
    model = analytic_memory_model(1000, 100, 10, 50, 5, fused_expert_bytes=80)
    assert model.base_bytes == 1000 + 300 + 50 + 80
    assert model.per_expert_bytes == 20 + 5


def test_expert_budget_for_memory_and_its_errors():
    model = MemoryModel(base_bytes=1_000_000, per_expert_bytes=100_000)
    # (2.0 MB - 1.0 MB) / 0.1 MB = 10 experts
    assert expert_budget_for_memory(2_000_000, model, num_layers=6, num_experts_total=48) == 10
    assert expert_budget_for_memory(10**12, model, num_layers=6, num_experts_total=48) == 48  # capped
    with pytest.raises(ValueError, match=r"fewer than one per MoE layer.*minimum is 2 MB"):
        expert_budget_for_memory(1_500_000, model, num_layers=6, num_experts_total=48)  # fits 5 < 6
    with pytest.raises(ValueError, match=r"below the dense part's own need"):
        expert_budget_for_memory(900_000, model, num_layers=6, num_experts_total=48)


def test_headroom_plans_for_a_share_of_the_budget_and_the_minimum_says_so():
    model = MemoryModel(base_bytes=1_000_000, per_expert_bytes=100_000)
    # 10% headroom: plan for 1.8 MB of 2.0 MB -> (1.8 - 1.0) / 0.1 = 8 experts
    assert expert_budget_for_memory(2_000_000, model, num_layers=6, num_experts_total=48, headroom=0.1) == 8
    # one expert per layer needs 1.6 MB predicted, i.e. a 1.6 / 0.9 = 1.78 MB budget (shown rounded)
    with pytest.raises(ValueError, match=r"minimum is 2 MB .*keeping 10% headroom"):
        expert_budget_for_memory(1_700_000, model, num_layers=6, num_experts_total=48, headroom=0.1)
    with pytest.raises(ConfigError, match="--mem-headroom"):
        RunConfig(mem_headroom=0.5).validate()
    with pytest.raises(ConfigError, match="--mem-headroom"):
        RunConfig(mem_headroom=-0.01).validate()


def test_config_rejects_conflicting_or_malformed_budgets():
    with pytest.raises(ConfigError, match="give only one"):
        RunConfig(clients=2, expert_budgets=[6, 6], mem_budgets=["1GB", "2GB"]).validate()
    with pytest.raises(ConfigError, match="one per client"):
        RunConfig(clients=2, mem_budgets=["1GB"]).validate()
    with pytest.raises(ConfigError, match="--mem-budgets"):
        RunConfig(clients=1, mem_budgets=["lots"]).validate()
    with pytest.raises(ConfigError, match="600MB:2GB"):
        RunConfig(mem_budget_range="600MB-2GB").validate()
    with pytest.raises(ConfigError, match="low end exceeds"):
        RunConfig(mem_budget_range="2GB:600MB").validate()
    with pytest.raises(ConfigError, match="--time-budgets"):
        RunConfig(clients=2, time_budgets=[10.0, -1.0]).validate()


def test_memory_budget_range_is_seeded_uniform_within_bounds():
    cfg = RunConfig(clients=16, mem_budget_range="600MB:2GB", seed=3)
    first, again = memory_budgets(cfg), memory_budgets(cfg)
    assert first == again and len(first) == 16
    assert all(600_000_000 <= b <= 2_000_000_000 for b in first)
    assert memory_budgets(RunConfig(clients=16, mem_budget_range="600MB:2GB", seed=4)) != first


def _access():
    return ModularMoEAccess(tiny_moe())


def test_client_budgets_map_memory_through_the_memory_model(tmp_path):
    access = _access()
    cfg = RunConfig(clients=2, num_experts=S, mem_budgets=["100GB", "1KB"], calibration="analytic")
    with pytest.raises(ConfigError, match=r"client 1: .*minimum is"):
        client_budgets(cfg, access)
    cfg.mem_budgets = ["100GB", "100GB"]
    budgets = client_budgets(cfg, access)
    assert [b.expert_budget for b in budgets] == [L * S, L * S]
    assert budgets[0].message_config() == {"expert-budget": L * S, "mem-budget-bytes": 100 * 10**9}


def test_node_reported_memory_overrides_the_flags():
    access = _access()
    cfg = RunConfig(clients=2, num_experts=S, expert_budgets=[L * S, L * S], calibration="analytic")
    budgets = client_budgets(cfg, access, node_memory={1: 100 * 10**9})
    assert budgets[0].mem_budget_bytes is None and budgets[1].mem_budget_bytes == 100 * 10**9


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory() as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block += 1
    del block
    assert peak.exact
    assert peak.added_bytes >= 60 * 2**20


def test_peak_memory_on_the_cpu_refuses_a_baseline_it_cannot_trust():
    # Without the collection, memory freed earlier is reused unseen by RSS: the peak would be low.
    with pytest.raises(ValueError, match="collect=True"):
        PeakMemory("cpu", collect=False)


def _batches():
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(1, 100, (4, 8), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones(4, 8, dtype=torch.long),
               "labels": torch.randint(0, 3, (4,), generator=g)}


def test_time_budget_ends_the_local_round_early_after_at_least_one_step():
    model = tiny_moe()
    result = train_local(model, _batches(), L * S, LocalTrainConfig(local_steps=50, time_budget_s=1e-9))
    assert result.steps == 1  # the budget is spent after the first step
    full = train_local(model, _batches(), L * S, LocalTrainConfig(local_steps=3))
    assert full.steps == 3


def test_training_memory_report_includes_the_weights():
    model = tiny_moe()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result = train_local(model, itertools.islice(_batches(), 2), L * S, LocalTrainConfig(local_steps=2))
    assert result.peak_mem_bytes >= weights


def test_memtrace_appends_this_process_counters_only_when_asked(tmp_path, monkeypatch):
    import json as _json

    from hfedmoe.training.memory import memtrace

    path = tmp_path / "trace.jsonl"
    monkeypatch.delenv("HFEDMOE_MEMTRACE", raising=False)
    memtrace("nothing")
    assert not path.exists()
    monkeypatch.setenv("HFEDMOE_MEMTRACE", str(path))
    memtrace("here", step=3)
    row = _json.loads(path.read_text().splitlines()[-1])
    assert row["point"] == "here" and row["step"] == 3 and row["VmRSS"] > 0


ALLOCATION_PROBE = """
import ctypes, sys
from hfedmoe.training.memory import bound_allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "bound":
    assert bound_allocator()
big = libc.malloc(16 << 20)
libc.free(big)  # in glibc's default mode this raises its mmap threshold to 16 MB
block = libc.malloc(2 << 20)
lo, hi = (int(x, 16) for x in next(l for l in open("/proc/self/maps") if "[heap]" in l).split()[0].split("-"))
print("heap" if lo <= block < hi else "mmap")
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc and glibc")
def test_bound_allocator_keeps_megabyte_blocks_off_the_heap():
    """The long-lived-worker fix: after a large block is freed, glibc's default puts the
    next 2 MB block on the (fragmenting) heap; with bound_allocator it gets its own mmap."""
    where = {mode: subprocess.run([sys.executable, "-c", ALLOCATION_PROBE, mode], capture_output=True,
                                  text=True, check=True).stdout.strip() for mode in ("default", "bound")}
    assert where == {"default": "heap", "bound": "mmap"}


def test_a_client_with_a_memory_budget_bounds_the_allocator(monkeypatch):
    from hfedmoe import client_round as client

    calls = []
    monkeypatch.setattr(client, "bound_allocator", lambda: calls.append(1) or True)

    class Stop(Exception):
        pass

    class Access:
        model = torch.nn.Linear(1, 1)  # on the CPU, where the allocator bound applies

        def load_state_dict(self, state, strict=True):
            raise Stop

    for budget, expected in ((None, 0), (10**9, 1)):
        with pytest.raises(Stop):
            client.client_round(RunConfig(), Access(), None, {}, 12, 1, mem_budget_bytes=budget)
        assert len(calls) == expected
