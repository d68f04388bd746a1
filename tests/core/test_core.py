"""Hand-worked examples for hfedmoe.core: every expected number is derived in a comment."""

import math

import pytest
import torch

from hfedmoe.core import (
    aggregate_experts,
    aggregate_gates,
    expert_usage,
    fedavg,
    gate_weights,
    ib_kl,
    ib_score,
    importance,
    pool_token_scores,
    select_experts,
)

t = torch.tensor


def close(actual: torch.Tensor, expected: list | float) -> None:
    torch.testing.assert_close(actual, t(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-7)


# --- pool_token_scores -----------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
# B=2, T=3, L=1, S=2; sample 0's last token is padding holding garbage.
TOKENS = t(
    [
        [[[0.2, 0.8]], [[0.4, 0.6]], [[NAN, INF]]],
        [[[0.1, 0.9]], [[0.3, 0.7]], [[0.5, 0.5]]],
    ]
)
MASK = t([[1, 1, 0], [1, 1, 1]])


def test_pool_mean_ignores_padding() -> None:
    # sample 0: ((0.2+0.4)/2, (0.8+0.6)/2) = (0.3, 0.7); sample 1: (0.9/3, 2.1/3) = (0.3, 0.7)
    close(pool_token_scores(TOKENS, MASK), [[[0.3, 0.7]], [[0.3, 0.7]]])
    close(pool_token_scores(TOKENS, MASK.bool()), [[[0.3, 0.7]], [[0.3, 0.7]]])


def test_pool_max_ignores_padding() -> None:
    # sample 0: (max(0.2, 0.4), max(0.8, 0.6)) = (0.4, 0.8); sample 1: (0.5, 0.9)
    close(pool_token_scores(TOKENS, MASK, mode="max"), [[[0.4, 0.8]], [[0.5, 0.9]]])


def test_pool_padding_values_do_not_matter() -> None:
    other = TOKENS.clone()
    other[0, 2] = -123.0
    for mode in ("mean", "max"):
        torch.testing.assert_close(
            pool_token_scores(TOKENS, MASK, mode), pool_token_scores(other, MASK, mode)
        )


def test_pool_without_mask_uses_all_tokens() -> None:
    # sample 1 of TOKENS: mean (0.3, 0.7)
    close(pool_token_scores(TOKENS[1:]), [[[0.3, 0.7]]])


def test_pool_keeps_dtype_and_inputs() -> None:
    tokens, mask = TOKENS.double(), MASK.clone()
    before = tokens.clone()
    assert pool_token_scores(tokens, mask).dtype == torch.float64
    torch.testing.assert_close(tokens, before, equal_nan=True)
    assert torch.equal(mask, MASK)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((TOKENS[0], None, "mean"), "4 dims"),
        ((TOKENS.long(), None, "mean"), "floating"),
        ((TOKENS, MASK, "sum"), "pooling mode"),
        ((TOKENS, MASK[:, :2], "mean"), "attention_mask must be a tensor of shape"),
        ((TOKENS, t([[1, 2, 0], [1, 1, 1]]), "mean"), "0/1"),
        ((TOKENS, t([[0, 0, 0], [1, 1, 1]]), "mean"), r"samples \[0\] have no non-padding"),
    ],
)
def test_pool_errors(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pool_token_scores(*args)


# --- importance (Eq. 3-5) ---------------------------------------------------------------

GATES = t([[[0.2, 0.8]], [[0.6, 0.4]]])  # B=2, L=1, S=2


def test_importance() -> None:
    # mean = (0.4, 0.6), max = (0.6, 0.8)
    # e0: 0.9*0.4 + 0.1*0.6 = 0.42; e1: 0.9*0.6 + 0.1*0.8 = 0.62
    close(importance(GATES, lam=0.9), [[0.42, 0.62]])
    close(importance(GATES, lam=1.0), [[0.4, 0.6]])  # cumulative only (Eq. 3)
    close(importance(GATES, lam=0.0), [[0.6, 0.8]])  # specific only (Eq. 4)


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_importance_bad_lam(lam: float) -> None:
    with pytest.raises(ValueError, match="lam must be in"):
        importance(GATES, lam)


def test_importance_bad_gates() -> None:
    with pytest.raises(ValueError, match="3 dims"):
        importance(GATES[0])
    with pytest.raises(ValueError, match="B = 0"):
        importance(GATES[:0])


# --- expert_usage (Eq. 16) --------------------------------------------------------------


def test_expert_usage() -> None:
    # (1, 3) / 4 = (0.25, 0.75)
    close(expert_usage(t([[1.0, 3.0]]), 4), [[0.25, 0.75]])


@pytest.mark.parametrize("n", [0, -2])
def test_expert_usage_bad_num_samples(n: int) -> None:
    with pytest.raises(ValueError, match="num_samples must be > 0"):
        expert_usage(t([[1.0]]), n)


def test_expert_usage_bad_ndim() -> None:
    with pytest.raises(ValueError, match="2 dims"):
        expert_usage(t([1.0]), 1)


# --- ib_kl (Eq. 10-11), ib_score (Eq. 14) ------------------------------------------------

# B=2, L=1, S=3: e0 has a zero gate, e1 is never routed to, e2 is uniform over samples.
ZGATES = t([[[0.0, 0.0, 0.5]], [[0.5, 0.0, 0.5]]])


def test_ib_kl_with_zero_gates() -> None:
    # e0: p = 0.25; KL = (1/2)(0 + 0.5*ln(0.5/0.25)) = 0.25*ln2
    # e1: all zero -> 0 (not NaN); e2: G = p -> ln 1 = 0
    close(ib_kl(ZGATES), [[0.25 * math.log(2), 0.0, 0.0]])


def test_ib_kl_nonuniform() -> None:
    # GATES e0: p = 0.4; KL = (0.2 ln(0.5) + 0.6 ln(1.5)) / 2
    expected = (0.2 * math.log(0.5) + 0.6 * math.log(1.5)) / 2
    close(ib_kl(GATES.double())[0, 0], expected)


def test_ib_kl_negative_gates() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        ib_kl(-ZGATES)


def test_ib_score() -> None:
    # lam=0.5: s_b = (0.5*0.25 + 0.5*0.5, 0, 0.5*0.5 + 0.5*0.5) = (0.375, 0, 0.5)
    # beta=0.1: I_b = s_b - 0.1*KL = (0.375 - 0.025 ln2, 0, 0.5)
    close(ib_score(ZGATES, lam=0.5, beta=0.1), [[0.375 - 0.025 * math.log(2), 0.0, 0.5]])
    # beta = 0 reduces to importance
    close(ib_score(ZGATES, lam=0.5, beta=0.0), [[0.375, 0.0, 0.5]])


def test_ib_score_errors() -> None:
    with pytest.raises(ValueError, match="beta must be >= 0"):
        ib_score(ZGATES, beta=-0.1)
    with pytest.raises(ValueError, match="lam must be in"):
        ib_score(ZGATES, lam=2.0)


# --- select_experts (Eq. 15) ------------------------------------------------------------

ALL = torch.ones(2, 3, dtype=torch.bool)


def test_select_covers_weak_layer_before_strong_second() -> None:
    # layer 1's best (0.1) is below layer 0's second (0.8), yet coverage takes it first:
    # cover (0,0)=0.9 and (1,0)=0.1, then fill with the best remaining, (0,1)=0.8.
    scores = t([[0.9, 0.8, 0.7], [0.1, 0.05, 0.0]])
    assert select_experts(scores, ALL, 3).tolist() == [[True, True, False], [True, False, False]]
    # budget 4: fill continues with (0,2)=0.7 before (1,1)=0.05
    assert select_experts(scores, ALL, 4).tolist() == [[True, True, True], [True, False, False]]


def test_select_only_candidates() -> None:
    scores = t([[0.9, 0.8, 0.7], [0.1, 0.05, 0.0]])
    cand = t([[False, True, False], [False, False, True]])
    # best candidate per layer: (0,1) and (1,2); nothing else is a candidate
    assert select_experts(scores, cand, 5).tolist() == [[False, True, False], [False, False, True]]


def test_select_skips_layers_without_candidates() -> None:
    scores = t([[0.3, 0.2], [0.9, 0.1], [1.0, 1.0]])
    cand = t([[True, True], [True, True], [False, False]])
    # two layers to cover -> budget 2 is enough; layer 2 (no tokens) gets nothing
    expected = [[True, False], [True, False], [False, False]]
    assert select_experts(scores, cand, 2).tolist() == expected


def test_select_no_candidates() -> None:
    assert not select_experts(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), 1).any()


def test_select_ties_lower_index_first() -> None:
    # coverage tie inside a layer: e=0 wins
    one = torch.ones(1, 2, dtype=torch.bool)
    assert select_experts(t([[0.5, 0.5]]), one, 1).tolist() == [[True, False]]
    # fill tie across layers: (0,1) has flat index 1 < (1,1) flat index 3
    scores = t([[1.0, 0.3], [1.0, 0.3]])
    both = torch.ones(2, 2, dtype=torch.bool)
    assert select_experts(scores, both, 3).tolist() == [[True, True], [True, False]]
    # fill tie inside a layer: (0,1) before (0,2)
    scores = t([[1.0, 0.3, 0.3]])
    assert select_experts(scores, torch.ones(1, 3, dtype=torch.bool), 2).tolist() == [
        [True, True, False]
    ]


def test_select_budget_too_small_names_minimum() -> None:
    cand = torch.ones(6, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="the minimum budget is 6") as err:
        select_experts(torch.rand(6, 2), cand, 3)
    assert "expert budget 3 cannot cover the 6 MoE layers" in str(err.value)


def test_select_does_not_modify_inputs() -> None:
    scores, cand = t([[0.1, 0.9]]), t([[True, True]])
    select_experts(scores, cand, 1)
    assert torch.equal(scores, t([[0.1, 0.9]])) and torch.equal(cand, t([[True, True]]))


@pytest.mark.parametrize(
    ("scores", "cand", "budget", "match"),
    [
        (t([0.1, 0.2]), t([True, True]), 1, "shape"),
        (t([[0.1, 0.2]]), t([[1, 1]]), 1, "bool tensor"),
        (t([[0.1, 0.2]]), t([[True, True, True]]), 1, "does not match"),
        (t([[0.1, 0.2]]), t([[True, True]]), 0, "budget must be an int >= 1"),
        (t([[0.1, 0.2]]), t([[True, True]]), True, "budget must be an int >= 1"),
        (t([[0.1, 0.2]]), t([[True, True]]), 1.5, "budget must be an int >= 1"),
        (t([[NAN, 0.2]]), t([[True, True]]), 1, "NaN"),
    ],
)
def test_select_errors(scores, cand, budget, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        select_experts(scores, cand, budget)


# --- aggregate_experts (Eq. 17) ---------------------------------------------------------


def test_aggregate_experts() -> None:
    previous = {"a": t([0.0, 0.0]), "b": t([1.0, 1.0]), "c": t([5.0])}
    updates = [{"a": t([1.0, 2.0]), "b": t([3.0, 3.0])}, {"a": t([4.0, 8.0])}]
    out = aggregate_experts(previous, updates, [1, 3])
    # a: (1*(1, 2) + 3*(4, 8)) / 4 = (13/4, 26/4) = (3.25, 6.5)
    close(out["a"], [3.25, 6.5])
    # b: only client 0 uploaded it -> its value
    close(out["b"], [3.0, 3.0])
    # c: nobody uploaded it -> previous, same tensor
    assert out["c"] is previous["c"]
    assert out is not previous and set(out) == {"a", "b", "c"}
    # inputs untouched
    assert previous["a"].tolist() == [0.0, 0.0] and updates[1]["a"].tolist() == [4.0, 8.0]
    assert out["a"].dtype == torch.float32


def test_aggregate_experts_zero_count_uploaders_get_plain_mean() -> None:
    previous = {"a": t([0.0]), "b": t([0.0])}
    updates = [{"b": t([2.0])}, {"b": t([4.0])}, {"a": t([1.0])}]
    out = aggregate_experts(previous, updates, [0, 0, 5])
    close(out["b"], [3.0])  # (2 + 4) / 2, both uploaders have 0 examples
    close(out["a"], [1.0])


def test_aggregate_experts_integer_tensor_takes_first_uploader() -> None:
    previous = {"n": t([0])}
    out = aggregate_experts(previous, [{}, {"n": t([7])}, {"n": t([9])}], [1, 1, 1])
    assert out["n"].tolist() == [7] and out["n"].dtype == torch.int64


def test_aggregate_experts_keeps_float64_precision_and_dtype() -> None:
    previous = {"w": torch.zeros(1, dtype=torch.float64)}
    updates = [{"w": t([1.0 + 1e-12], dtype=torch.float64)}, {"w": t([1.0], dtype=torch.float64)}]
    out = aggregate_experts(previous, updates, [1, 1])
    assert out["w"].dtype == torch.float64
    close(out["w"], [1.0 + 0.5e-12])


def test_bfloat16_experts_are_averaged_in_float64_and_written_in_bfloat16() -> None:
    """Many clients' bf16 copies averaged in bf16 arithmetic would drift by a rounding
    error per addition; accumulated in float64 the mean is exact before the one final
    rounding to the model's dtype."""
    g = torch.Generator().manual_seed(0)
    copies = [torch.randn(64, generator=g).to(torch.bfloat16) for _ in range(16)]
    previous = {"w": torch.zeros(64, dtype=torch.bfloat16)}
    out = aggregate_experts(previous, [{"w": c} for c in copies], [1] * 16)
    assert out["w"].dtype == torch.bfloat16
    exact = torch.stack([c.double() for c in copies]).mean(dim=0)
    assert torch.equal(out["w"], exact.to(torch.bfloat16))


@pytest.mark.parametrize(
    ("updates", "counts", "match"),
    [
        ([], [], "empty"),
        ([{"a": t([1.0])}], [1, 2], "one count per client"),
        ([{"a": t([1.0])}], [-1], "negative for clients"),
        ([{"a": t([1.0])}, {}], [0, 0], "all 0"),
        ([{"a": t([1.0])}, {"zz": t([1.0])}], [1, 1], "client 1 uploaded 'zz'"),
        ([{"a": t([1.0, 2.0])}], [1], r"client 0 uploaded 'a' with shape \(2,\)"),
    ],
)
def test_aggregate_experts_errors(updates: list, counts: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aggregate_experts({"a": t([0.0])}, updates, counts)


# --- gate_weights (Eq. 18-20) -----------------------------------------------------------

# C=2, L=1, S=2
USAGE = t([[[0.5, 0.01]], [[0.2, 0.3]]])
IMPORT = t([[[0.4, 0.9]], [[0.5, 0.2]]])


def test_gate_weights_literal() -> None:
    # tau=0.05: S_0 = {e0} (0.01 < tau), S_1 = {e0, e1}, |S_global| = 2
    # alpha_0 = 0.5*0.4 / 2 = 0.1; alpha_1 = (0.2*0.5 + 0.3*0.2) / 2 = 0.16 / 2 = 0.08
    close(gate_weights(USAGE, IMPORT, tau=0.05, normalize=False), [0.1, 0.08])


def test_gate_weights_normalized() -> None:
    # (0.1, 0.08) / 0.18 = (5/9, 4/9)
    close(gate_weights(USAGE, IMPORT, tau=0.05), [5 / 9, 4 / 9])


def test_gate_weights_nothing_reaches_tau() -> None:
    usage = torch.full((2, 1, 2), 0.01)
    close(gate_weights(usage, IMPORT, tau=0.05), [0.5, 0.5])
    close(gate_weights(usage, IMPORT, tau=0.05, normalize=False), [0.0, 0.0])


def test_gate_weights_zero_importance() -> None:
    # experts reach tau but p_c = u * 0 = 0 everywhere, so sum alpha = 0
    zero = torch.zeros(2, 1, 2)
    close(gate_weights(USAGE, zero, tau=0.05), [0.5, 0.5])
    close(gate_weights(USAGE, zero, tau=0.05, normalize=False), [0.0, 0.0])


def test_gate_weights_float64() -> None:
    assert gate_weights(USAGE.double(), IMPORT.double()).dtype == torch.float64


@pytest.mark.parametrize(
    ("usage", "imp", "tau", "match"),
    [
        (USAGE[0], IMPORT[0], 0.05, "3 dims"),
        (USAGE, IMPORT[:, :, :1], 0.05, "must match"),
        (USAGE[:0], IMPORT[:0], 0.05, "C = 0"),
        (-USAGE, IMPORT, 0.05, ">= 0"),
        (USAGE, -IMPORT, 0.05, ">= 0"),
        (USAGE, IMPORT, -0.1, "tau must be >= 0"),
    ],
)
def test_gate_weights_errors(usage, imp, tau: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gate_weights(usage, imp, tau=tau)


# --- aggregate_gates (Eq. 21) -----------------------------------------------------------


def test_aggregate_gates() -> None:
    gates = [{"w": t([1.0, 2.0])}, {"w": t([3.0, 6.0])}]
    out = aggregate_gates(gates, t([0.25, 0.75]))
    # 0.25*(1, 2) + 0.75*(3, 6) = (0.25 + 2.25, 0.5 + 4.5) = (2.5, 5.0)
    close(out["w"], [2.5, 5.0])
    assert gates[0]["w"].tolist() == [1.0, 2.0]


def test_aggregate_gates_literal_alpha_rescales() -> None:
    # literal alphas (0.1, 0.08): 0.1*2 + 0.08*2 = 0.36, i.e. the router shrinks
    close(aggregate_gates([{"w": t([2.0])}, {"w": t([2.0])}], t([0.1, 0.08]))["w"], [0.36])


@pytest.mark.parametrize(
    ("gates", "alpha", "match"),
    [
        ([], t([]), "empty"),
        ([{"w": t([1.0])}], t([0.5, 0.5]), r"shape \[C\]"),
        ([{"w": t([1.0])}], t([NAN]), "NaN"),
        ([{"w": t([1.0])}, {"v": t([1.0])}], t([0.5, 0.5]), "client 1 have different keys"),
        ([{"w": t([1.0])}, {"w": t([1.0, 2.0])}], t([0.5, 0.5]), "client 1: 'w' has shape"),
    ],
)
def test_aggregate_gates_errors(gates: list, alpha, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aggregate_gates(gates, alpha)


# --- fedavg (dense parameters) ----------------------------------------------------------


def test_fedavg() -> None:
    ids = torch.arange(3)
    states = [{"w": t([2.0, 4.0]), "ids": ids}, {"w": t([4.0, 8.0]), "ids": ids + 7}]
    out = fedavg(states, [1, 3])
    # (1*(2, 4) + 3*(4, 8)) / 4 = (14/4, 28/4) = (3.5, 7.0)
    close(out["w"], [3.5, 7.0])
    # integer buffers: first client's value, unchanged dtype
    assert out["ids"].tolist() == [0, 1, 2] and out["ids"].dtype == torch.int64
    assert states[1]["w"].tolist() == [4.0, 8.0]


def test_fedavg_ignores_zero_count_client() -> None:
    close(fedavg([{"w": t([1.0])}, {"w": t([9.0])}], [2, 0])["w"], [1.0])


@pytest.mark.parametrize(
    ("states", "counts", "match"),
    [
        ([], [], "empty"),
        ([{"w": t([1.0])}], [1, 1], "one count per client"),
        ([{"w": t([1.0])}], [-3], "negative"),
        ([{"w": t([1.0])}], [0], "all 0"),
        ([{"w": t([1.0])}, {"w": t([1.0]), "v": t([1.0])}], [1, 1], r"extra \['v'\]"),
        ([{"w": t([1.0])}, {"w": t([[1.0]])}], [1, 1], "'w' has shape"),
    ],
)
def test_fedavg_errors(states: list, counts: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fedavg(states, counts)
