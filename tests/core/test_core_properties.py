"""Property-based tests (hypothesis) for hfedmoe.core."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hfedmoe.core import (
    aggregate_experts,
    aggregate_gates,
    fedavg,
    gate_weights,
    ib_kl,
    ib_score,
    pool_token_scores,
    select_experts,
)

FAST = settings(max_examples=100, deadline=None)
dims = st.integers(1, 4)
unit = st.floats(0.0, 1.0, allow_nan=False, width=32)
# Zeros and repeated values on purpose: they exercise the 0*log 0 and tie paths.
gate_value = st.one_of(st.just(0.0), st.just(0.5), unit)


@st.composite
def tensors(draw, shape: tuple[int, ...], elements=unit, dtype=torch.float64) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    values = draw(st.lists(elements, min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


@st.composite
def selection_cases(draw):
    L, S = draw(dims), draw(st.integers(1, 5))
    scores = draw(tensors((L, S), st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0]) | unit))
    cand = draw(tensors((L, S), st.booleans(), torch.bool))
    covered = int(cand.any(dim=1).sum())
    budget = draw(st.integers(max(covered, 1), L * S + 2))
    return scores, cand, budget


@FAST
@given(selection_cases())
def test_selection_invariants(case) -> None:
    scores, cand, budget = case
    chosen = select_experts(scores, cand, budget)
    assert chosen.dtype == torch.bool and chosen.shape == cand.shape
    assert not (chosen & ~cand).any()  # only candidates
    assert int(chosen.sum()) == min(budget, int(cand.sum()))  # never exceeds the budget
    assert torch.equal(chosen.any(dim=1), cand.any(dim=1))  # every active layer covered
    # Every selected expert that is not its layer's coverage pick beats every unselected one.
    unselected = scores[cand & ~chosen]
    for layer in range(scores.shape[0]):
        if not cand[layer].any():
            continue
        cover = int(torch.where(cand[layer], scores[layer], -torch.inf).argmax())
        assert chosen[layer, cover]
        fill = chosen[layer].clone()
        fill[cover] = False
        if fill.any() and unselected.numel():
            assert scores[layer][fill].min() >= unselected.max()


@FAST
@given(selection_cases())
def test_selection_budget_below_layers_raises(case) -> None:
    scores, cand, _ = case
    covered = int(cand.any(dim=1).sum())
    if covered >= 2:
        with pytest.raises(ValueError, match=f"minimum budget is {covered}"):
            select_experts(scores, cand, covered - 1)


@st.composite
def gate_weight_cases(draw):
    shape = (draw(dims), draw(dims), draw(dims))
    return draw(tensors(shape, gate_value)), draw(tensors(shape, gate_value)), draw(unit)


@FAST
@given(gate_weight_cases())
def test_gate_weights_normalized_sum_to_one(case) -> None:
    usage, imp, tau = case
    alpha = gate_weights(usage, imp, tau=tau)
    assert (alpha >= 0).all()
    torch.testing.assert_close(alpha.sum(), torch.tensor(1.0, dtype=alpha.dtype))
    assert (gate_weights(usage, imp, tau=tau, normalize=False) >= 0).all()


@FAST
@given(st.data())
def test_ib_terms_finite_and_kl_nonnegative(data) -> None:
    gates = data.draw(tensors((data.draw(dims), data.draw(dims), data.draw(dims)), gate_value))
    for dtype in (torch.float32, torch.float64):
        kl = ib_kl(gates.to(dtype))
        assert torch.isfinite(kl).all()
        assert (kl >= -1e-6).all()
        assert torch.isfinite(ib_score(gates.to(dtype))).all()


@st.composite
def state_dicts(draw):
    keys = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True))
    values = st.floats(-10, 10, width=32)
    return {k: draw(tensors((draw(dims), draw(dims)), values, torch.float32)) for k in keys}


counts = st.lists(st.integers(0, 50), min_size=1, max_size=4).filter(lambda c: sum(c) > 0)


@FAST
@given(state_dicts(), state_dicts(), counts)
def test_identical_updates_are_fixed_points(previous, update, num_examples) -> None:
    update = {k: v for k, v in update.items() if k not in previous or v.shape == previous[k].shape}
    previous = {**update, **{k: v for k, v in previous.items() if k not in update}}
    update = {k: v + 1.0 for k, v in update.items()}  # differ from previous where uploaded
    C = len(num_examples)

    out = aggregate_experts(previous, [update] * C, num_examples)
    for key, value in out.items():
        torch.testing.assert_close(value, update.get(key, previous[key]))

    for key, value in fedavg([update] * C, num_examples).items():
        torch.testing.assert_close(value, update[key])

    alpha = torch.tensor(num_examples, dtype=torch.float64)
    for key, value in aggregate_gates([update] * C, alpha / alpha.sum()).items():
        torch.testing.assert_close(value, update[key])


@FAST
@given(st.data())
def test_pooling_ignores_padding(data) -> None:
    B, T, L, S = (data.draw(dims) for _ in range(4))
    scores = data.draw(tensors((B, T, L, S)))
    mask = data.draw(tensors((B, T), st.booleans(), torch.bool))
    mask[:, 0] = True  # every sample keeps at least one real token
    garbage = data.draw(tensors((B, T, L, S), st.floats(-1e6, 1e6)))
    mixed = torch.where(mask[:, :, None, None], scores, garbage)
    for mode in ("mean", "max"):
        torch.testing.assert_close(
            pool_token_scores(mixed, mask, mode), pool_token_scores(scores, mask, mode)
        )
