"""Deferred expert backward on transformers 5.x fused experts (hfedmoe.moe.fused_deferred)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hfedmoe.moe import fused_deferred
from hfedmoe.moe import make_access
from hfedmoe.moe.state_keys import split_expert_key

from builders import FAMILIES, inputs, sharp_causal_lm

families = pytest.mark.parametrize("name", list(FAMILIES))


def tiny_model(name: str) -> nn.Module:
    return sharp_causal_lm(name).train()


def loss_of(model: nn.Module) -> torch.Tensor:
    ids, mask = inputs()
    return model(input_ids=ids, attention_mask=mask, labels=ids).loss


def grads(model: nn.Module, deferred: bool, selection: torch.Tensor | None,
          unselected: str = "detach") -> dict[str, torch.Tensor | None]:
    """Gradients of every parameter after one backward, with or without the deferred path."""
    model = copy.deepcopy(model)
    access = make_access(model)
    assert access.enable_deferred_backward(deferred, unselected) is True
    selection = torch.ones(access.num_layers, access.num_experts, dtype=torch.bool) if selection is None else selection
    loss = loss_of(model)
    params = access.trainable_parameters(selection)
    access.set_selection(selection)
    loss.backward(inputs=params)
    return {n: p.grad for n, p in model.named_parameters()}


def partial_selection(num_layers: int, num_experts: int) -> torch.Tensor:
    """Expert 1 of every layer, plus the last expert of the last layer."""
    selection = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    selection[:, 1] = True
    selection[num_layers - 1, num_experts - 1] = True
    return selection


@families
def test_the_deferred_forward_gives_the_models_own_output(name):
    model = tiny_model(name).eval()
    access = make_access(model)
    ids, mask = inputs()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        access.enable_deferred_backward(True)
        deferred = model(input_ids=ids, attention_mask=mask).logits
        access.enable_deferred_backward(False)
        restored = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(deferred, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(restored, plain)  # disabling puts the model's own forward back


@families
def test_all_experts_selected_gives_the_plain_autograd_gradients(name):
    model = tiny_model(name)
    plain, deferred = grads(model, False, None), grads(model, True, None)
    assert plain.keys() == deferred.keys()
    checked = 0
    for n in plain:
        assert (plain[n] is None) == (deferred[n] is None), n
        if plain[n] is not None:
            torch.testing.assert_close(deferred[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)
            checked += "experts" in n
    assert checked >= 2  # the fused expert tensors were compared, not only dense ones


@families
def test_partial_selection_trains_only_the_selected_slices(name):
    model = tiny_model(name)
    access = make_access(model)
    L, E = access.num_layers, access.num_experts
    selection = partial_selection(L, E)
    plain, deferred = grads(model, False, selection), grads(model, True, selection)
    for (layer, expert), keys in access.param_groups().experts.items():
        for key in keys:
            real, e = split_expert_key(key)
            g = deferred[real][e]
            if not selection[layer, expert]:
                assert torch.equal(g, torch.zeros_like(g)), key  # no weight gradient at all
            elif layer == L - 1:
                # the last MoE layer's upstream gradient does not pass through any
                # detached expert: the selected slices get exactly autograd's gradient
                torch.testing.assert_close(g, plain[real][e], rtol=1e-4, atol=1e-6, msg=key)
    for n in access.router_param_names():
        if n in deferred and deferred[n] is not None:  # routers keep their gradient
            assert deferred[n].abs().sum() > 0, n
    assert any(deferred[n] is not None and deferred[n].abs().sum() > 0 for n in access.router_param_names())


@families
def test_freeze_gives_plain_autograds_gradients_except_on_unselected_slices(name):
    """--unselected-experts freeze: input gradients pass through routed but unselected
    experts, so every trained tensor, in every layer, gets plain autograd's gradient."""
    model = tiny_model(name)
    access = make_access(model)
    L, E = access.num_layers, access.num_experts
    selection = partial_selection(L, E)
    plain = grads(model, False, selection)
    frozen = grads(model, True, selection, unselected="freeze")
    detached = grads(model, True, selection, unselected="detach")
    compared = 0
    for (layer, expert), keys in access.param_groups().experts.items():
        for key in keys:
            real, e = split_expert_key(key)
            g = frozen[real][e]
            if selection[layer, expert]:
                torch.testing.assert_close(g, plain[real][e], rtol=1e-4, atol=1e-6, msg=key)
                compared += layer == 0
            else:
                assert torch.equal(g, torch.zeros_like(g)), key
    assert compared  # the first layer's slices: below every unselected expert
    for n in plain:
        if plain[n] is not None and n not in access.fused_parameters:
            torch.testing.assert_close(frozen[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)
    real, e = split_expert_key(access.param_groups().experts[(0, 1)][0])
    assert not torch.allclose(detached[real][e], frozen[real][e])  # the modes differ below the top layer


def test_backward_without_a_selection_fails_clearly():
    model = tiny_model("mixtral")
    access = make_access(model)
    access.enable_deferred_backward(True)
    loss = loss_of(model)
    with pytest.raises(RuntimeError, match="selection"):
        loss.backward()


def test_layouts_other_than_the_eager_gated_mlp_keep_plain_autograd():
    model = tiny_model("mixtral")
    access = make_access(model)
    module = access.experts_modules()[0]
    assert fused_deferred.supports_deferred(module)
    module.has_bias = True  # what use_experts_implementation sets for e.g. gpt-oss
    assert not fused_deferred.supports_deferred(module)
    assert access.enable_deferred_backward(True) is False
    assert not any(fused_deferred.installed(m) for m in access.experts_modules())


def test_a_constrained_local_round_runs_deferred_and_keeps_unselected_slices(monkeypatch):
    """train_local switches the deferred path on for a constrained budget (and off after)."""
    from hfedmoe.models.hf_wrappers import HFCausalLM
    from hfedmoe.training import LocalTrainConfig, train_local

    model = HFCausalLM(tiny_model("qwen2_moe"))
    access = make_access(model)
    calls = []
    original = fused_deferred.DeferredFusedExperts.apply
    monkeypatch.setattr(fused_deferred.DeferredFusedExperts, "apply",
                        lambda *args: calls.append(1) or original(*args))
    ids, mask = inputs()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    before = {k: v.clone() for k, v in access.state_dict().items()}
    cfg = LocalTrainConfig(local_steps=2, lr=1e-2, task="causal-lm")
    result = train_local(model, iter([batch, batch]), access.num_layers, cfg)  # one expert per layer
    assert calls, "the deferred path was not used"
    assert not any(fused_deferred.installed(m) for m in access.experts_modules())
    after = access.state_dict()
    for (layer, expert), keys in access.param_groups().experts.items():
        moved = any(not torch.equal(before[k], after[k]) for k in keys)
        assert moved == bool(result.trained[layer, expert]), (layer, expert)
    assert int(result.trained.sum()) >= access.num_layers


def test_one_experts_module_against_autograd_with_unselected_experts_detached():
    """The exact definition: selected experts as in autograd, unselected ones as constants
    (no weight and no input gradient), router weights with their full gradient."""
    module = make_access(tiny_model("mixtral")).experts_modules()[0]
    E, H = module.gate_up_proj.shape[0], module.gate_up_proj.shape[2]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, H, generator=g, requires_grad=True)
    top_idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(7)])
    weights = torch.rand(7, 2, generator=g, requires_grad=True)
    upstream = torch.randn(7, H, generator=g)
    selected = torch.tensor([True, False, True, False])

    w1 = module.gate_up_proj.detach().clone().requires_grad_(True)
    w2 = module.down_proj.detach().clone().requires_grad_(True)
    x_ref, weights_ref = x.detach().clone().requires_grad_(True), weights.detach().clone().requires_grad_(True)
    reference = torch.zeros(7, H)
    for row in range(7):
        for slot in range(2):
            e = int(top_idx[row, slot])
            gate, up = torch.nn.functional.linear(x_ref[row], w1[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(module.act_fn(gate) * up, w2[e])
            reference = reference.index_add(0, torch.tensor([row]), (weights_ref[row, slot] * (y if selected[e] else y.detach()))[None])
    (reference * upstream).sum().backward()

    fused_deferred.install(module, True)
    setattr(module, fused_deferred.SELECTION_ATTR, selected)
    out = module(x, top_idx, weights)
    torch.testing.assert_close(out, reference.detach(), rtol=1e-5, atol=1e-6)
    (out * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.grad, weights_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.gate_up_proj.grad, w1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.down_proj.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(module.down_proj.grad[~selected], torch.zeros_like(module.down_proj.grad[~selected]))
