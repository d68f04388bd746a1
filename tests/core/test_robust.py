"""hfedmoe.core.robust: the median-based norm screen and the coordinate-wise merges."""

from __future__ import annotations

import math

import pytest
import torch

from hfedmoe.config import ROBUST_MERGES as CONFIG_NAMES
from hfedmoe.core.robust import (
    ROBUST_MERGES,
    coordinate_median,
    robust_experts,
    robust_merge,
    screen_by_norm,
    trimmed_mean,
    update_norm,
)


def test_the_config_and_the_core_name_the_same_merges():
    assert CONFIG_NAMES == ROBUST_MERGES


def test_update_norm_is_the_l2_norm_of_the_delta_over_floating_tensors():
    prev = {"a": torch.zeros(2), "b": torch.ones(1), "i": torch.tensor([3])}
    upd = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([5.0]), "i": torch.tensor([100])}
    assert update_norm(upd, prev) == pytest.approx(5.0)  # sqrt(9 + 16); the integer tensor is skipped


def test_screen_rejects_the_client_far_above_the_median_only():
    norms = {"dense": {0: 1.0, 1: 1.3, 2: 0.8, 3: 1300.0}, "expert 0 of layer 0": {0: 0.2, 3: 900.0}}
    rejected = screen_by_norm(norms, threshold=10.0)
    assert list(rejected) == [3]
    assert "dense" in rejected[3] and "4 clients that changed it" in rejected[3] and "limit 10x" in rejected[3]
    # Two holders: the median cannot single one out, so the group is not judged.
    assert screen_by_norm({"expert 0 of layer 0": {0: 0.2, 3: 900.0}}, 10.0) == {}
    assert screen_by_norm(norms, threshold=0) == {}  # off
    assert list(screen_by_norm({"g": {0: 1.0, 1: 1.0, 2: math.inf}}, 10.0)) == [2]


def test_clients_that_left_a_group_unchanged_neither_set_the_median_nor_fail():
    """An expert most clients' tokens never reach (a specialised router) comes back
    unchanged from them: norm 0. The few that trained it must not read as infinitely far
    above a median of 0 (measured on the specialised start: every such client was rejected)."""
    norms = {"expert 1 of layer 2": {0: 0.0, 1: 0.0, 2: 0.0, 3: 0.0, 4: 0.9, 5: 1.1, 6: 0.0}}
    assert screen_by_norm(norms, threshold=10.0) == {}
    norms["expert 1 of layer 2"].update({7: 1.0, 8: 500.0})  # 4 changed it: judged among those
    rejected = screen_by_norm(norms, threshold=10.0)
    assert list(rejected) == [8] and "4 clients that changed it" in rejected[8]


def test_honest_spread_passes_the_screen():
    torch.manual_seed(0)
    norms = {"dense": {c: float(n) for c, n in enumerate(torch.rand(8) * 3 + 0.5)}}  # within 7x of each other
    assert screen_by_norm(norms, threshold=10.0) == {}


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    values = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, 20.0]), torch.tensor([3.0, 30.0]),
              torch.tensor([1e6, -1e6])]
    # per coordinate, drop one value at each end of the sorted four
    assert torch.equal(trimmed_mean(values, 0.25), torch.tensor([2.5, 15.0]))
    assert torch.equal(trimmed_mean(values[:3], 0.25), torch.tensor([2.0, 20.0]))  # 3 clients: nothing dropped
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        trimmed_mean(values, 0.5)


def test_coordinate_median_odd_and_even():
    values = [torch.tensor([1.0, 5.0]), torch.tensor([9.0, 1.0]), torch.tensor([4.0, 2.0])]
    assert torch.equal(coordinate_median(values), torch.tensor([4.0, 2.0]))
    assert torch.equal(coordinate_median(values + [torch.tensor([1e9, 1e9])]), torch.tensor([6.5, 3.5]))
    assert coordinate_median([torch.ones(2, dtype=torch.bfloat16)]).dtype == torch.bfloat16


def test_robust_experts_merge_over_uploaders_and_keep_the_rest():
    prev = {"e00.w": torch.zeros(2), "e00.b": torch.zeros(1), "e01.w": torch.full((2,), 7.0)}
    expert_of = {"e00.w": (0, 0), "e00.b": (0, 0), "e01.w": (0, 1)}
    updates = [{"e00.w": torch.tensor([1.0, 1.0]), "e00.b": torch.tensor([1.0])},
               {"e00.w": torch.tensor([3.0, 3.0]), "e00.b": torch.tensor([3.0])},
               {"e00.w": torch.tensor([1e9, 1e9]), "e00.b": torch.tensor([1e9])}]
    merged = robust_experts(prev, updates, expert_of, "median")
    assert torch.equal(merged["e00.w"], torch.tensor([3.0, 3.0])) and torch.equal(merged["e00.b"], torch.tensor([3.0]))
    assert merged["e01.w"] is prev["e01.w"]  # nobody uploaded it
    with pytest.raises(ValueError, match="must be one of"):
        robust_merge(updates, "krum")
