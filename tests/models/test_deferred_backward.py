"""Deferred expert backward: gradients only through the experts selected after the forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from hfedmoe.models.moe_block import ACTIVATIONS, ExpertFFN, expert_backward
from hfedmoe.moe.modular import ModularMoEAccess

from builders import L, S, batch, tiny_moe


def _model_with_distinct_experts():
    model = tiny_moe()
    with torch.no_grad():  # upcycled experts start equal; make them differ
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


def _grads(model, deferred: bool, selection: torch.Tensor,
           unselected: str = "detach") -> dict[str, torch.Tensor | None]:
    model = copy.deepcopy(model)
    access = ModularMoEAccess(model)
    access.enable_deferred_backward(deferred, unselected)
    ids, mask = batch()
    torch.manual_seed(0)  # same dropout in both passes
    loss = F.cross_entropy(model(ids, mask), torch.tensor([0, 1, 2]))
    params = access.trainable_parameters(selection)
    access.set_selection(selection)
    loss.backward(inputs=params)
    return {n: p.grad for n, p in model.named_parameters()}


def test_all_experts_selected_gives_exactly_the_plain_autograd_gradients():
    model = _model_with_distinct_experts()
    everything = torch.ones(L, S, dtype=torch.bool)
    plain, deferred = _grads(model, False, everything), _grads(model, True, everything)
    assert plain.keys() == deferred.keys()
    for name in plain:
        assert (plain[name] is None) == (deferred[name] is None), name
        if plain[name] is not None:
            torch.testing.assert_close(deferred[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_partial_selection_trains_only_selected_experts_and_detaches_the_rest():
    model = _model_with_distinct_experts()
    selection = torch.zeros(L, S, dtype=torch.bool)
    selection[:, 0] = True
    selection[L - 1, 2] = True
    plain, deferred = _grads(model, False, selection), _grads(model, True, selection)
    access = ModularMoEAccess(model)
    for l in range(L):
        for e in range(S):
            for name in access.expert_param_names(l, e):
                if selection[l, e]:
                    assert deferred[name] is not None and deferred[name].abs().sum() > 0, name
                else:
                    assert deferred[name] is None, name
    # Above the last MoE layer nothing is detached, so the last layer's selected
    # experts, its router and the head get exactly the plain-autograd gradients.
    last = [n for e in (0, 2) for n in access.expert_param_names(L - 1, e)]
    last += [n for n in access.router_param_names() if f"layer.{L - 1}." in n] + ["classifier.weight"]
    for name in last:
        torch.testing.assert_close(deferred[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    # Below it, unselected experts no longer pass input gradients: earlier layers'
    # gradients change (this is the "run them detached" approximation).
    first = access.expert_param_names(0, 0)[0]
    assert not torch.allclose(deferred[first], plain[first])


def test_freeze_passes_input_gradients_through_unselected_experts_as_plain_autograd_does():
    """--unselected-experts freeze: the unselected experts get no weight gradient, and every
    other parameter, in every layer, gets exactly the gradient of plain autograd."""
    model = _model_with_distinct_experts()
    selection = torch.zeros(L, S, dtype=torch.bool)
    selection[:, 0] = True
    selection[L - 1, 2] = True
    plain = _grads(model, False, selection)
    frozen = _grads(model, True, selection, unselected="freeze")
    detached = _grads(model, True, selection, unselected="detach")
    access = ModularMoEAccess(model)
    unselected = {n for l, e in (~selection).nonzero().tolist() for n in access.expert_param_names(l, e)}
    for name in plain:
        if name in unselected:
            assert frozen[name] is None and plain[name] is None, name
        else:
            torch.testing.assert_close(frozen[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    first = access.expert_param_names(0, 0)[0]
    assert not torch.allclose(detached[first], frozen[first])  # the two modes really differ


def test_an_unknown_unselected_mode_is_refused():
    with pytest.raises(ValueError, match="detach, freeze"):
        ModularMoEAccess(tiny_moe()).enable_deferred_backward(True, "drop")


def test_backward_without_a_selection_fails_clearly():
    model = _model_with_distinct_experts()
    access = ModularMoEAccess(model)
    access.enable_deferred_backward(True)
    ids, mask = batch()
    loss = F.cross_entropy(model(ids, mask), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="selection"):
        loss.backward()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("existing_grads", [False, True])
def test_expert_backward_equals_autograd_through_the_recomputed_expert(activation, existing_grads):
    """The deferred backward skips recomputing fc2's output; gradients must not change."""
    torch.manual_seed(0)
    expert = ExpertFFN(12, 20, activation)
    x, grad_y = torch.randn(7, 12), torch.randn(7, 12)
    reference = copy.deepcopy(expert)
    if existing_grads:  # accumulation onto earlier gradients, as autograd does
        for a, b in zip(expert.parameters(), reference.parameters()):
            a.grad = torch.full_like(a, 0.5)
            b.grad = torch.full_like(b, 0.5)
    x_ref = x.clone().requires_grad_(True)
    torch.autograd.backward(reference(x_ref), grad_y)
    grad_x = expert_backward(expert, x, grad_y)
    torch.testing.assert_close(grad_x, x_ref.grad, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(expert.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)
