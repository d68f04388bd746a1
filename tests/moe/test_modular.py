"""The model-access layer for modules of separate experts (hfedmoe.moe.modular): parameter
groups, routing records and trainable parameters on a tiny upcycled BERT."""

from __future__ import annotations

import pytest
import torch

from hfedmoe.models.moe_block import MoEFeedForward
from hfedmoe.models.upcycled import upcycle_bert_layers
from hfedmoe.moe import NoMoELayersError
from hfedmoe.moe.modular import ModularMoEAccess

from builders import K, L, S, batch, tiny_bert, tiny_moe


# --- ModularMoEAccess -------------------------------------------------------------------

@pytest.mark.parametrize("num_experts", [S, 11])  # 11: "experts.1." must not catch "experts.10."
def test_param_groups_partition_the_state_dict(num_experts):
    model = tiny_moe(num_experts=num_experts)
    access = ModularMoEAccess(model)
    groups = access.param_groups()
    assert (groups.num_layers, groups.num_experts) == (L, num_experts)
    assert access.num_experts_total == L * num_experts

    expert_sets = [set(names) for names in groups.experts.values()]
    parts = expert_sets + [set(groups.routers), set(groups.dense)]
    keys = set(model.state_dict())
    assert set().union(*parts) == keys
    assert sum(len(p) for p in parts) == len(keys)  # pairwise disjoint
    assert len(groups.experts) == L * num_experts
    assert all(len(names) == 4 for names in groups.experts.values())  # fc1/fc2 weight+bias
    assert len(groups.routers) == L
    assert not any("experts" in k or "router" in k for k in groups.dense)
    assert "classifier.weight" in groups.dense
    assert set(groups.all_expert_keys) == set().union(*expert_sets)
    for le, names in groups.experts.items():
        assert all(groups.expert_of[n] == le for n in names)

    params = dict(model.named_parameters())
    for l, moe in enumerate(access.layers):
        for e in range(num_experts):
            names = access.expert_param_names(l, e)
            assert {id(params[n]) for n in names} == {id(p) for p in moe.experts[e].parameters()}
            assert all(n.startswith(f"backbone.encoder.layer.{l}.intermediate.experts.{e}.") for n in names)


def test_router_probs_and_dispatch_shapes():
    model = tiny_moe()
    access = ModularMoEAccess(model)
    with pytest.raises(RuntimeError, match="forward pass"):
        access.router_probs()
    ids, mask = batch(b=3, t=8)
    model(ids, mask)
    probs = access.router_probs()
    assert probs.shape == (3, 8, L, S)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 8, L), atol=1e-6, rtol=0)
    for l, layer in enumerate(access.layers):
        assert torch.equal(probs[:, :, l], layer.last_router_probs)
    dispatch = access.dispatch()
    assert dispatch.shape == (3, 8, L, S) and (dispatch.sum(-1) == K).all()
    aux = access.aux_loss()
    assert aux.ndim == 0 and torch.isfinite(aux) and aux.requires_grad
    torch.testing.assert_close(aux, torch.stack([m.last_aux_loss for m in access.layers]).mean())


def test_model_without_moe_layers_is_refused_helpfully():
    with pytest.raises(NoMoELayersError, match="no Mixture-of-Experts layer") as info:
        ModularMoEAccess(tiny_bert())
    assert "--num-experts" in str(info.value)
    assert "BertModel" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_layers_with_different_expert_counts_are_refused():
    backbone = tiny_bert()
    upcycle_bert_layers(backbone, num_experts=S, top_k=K)
    backbone.encoder.layer[1].intermediate = MoEFeedForward(16, 32, num_experts=S + 1, top_k=K)
    with pytest.raises(NoMoELayersError, match="different expert counts"):
        ModularMoEAccess(backbone)


def test_trainable_parameters_are_dense_routers_and_selected_experts():
    model = tiny_moe()
    access = ModularMoEAccess(model)
    params = dict(model.named_parameters())
    selection = torch.zeros(L, S, dtype=torch.bool)
    selection[0, 2] = selection[1, 0] = selection[1, 3] = True
    chosen = {id(p) for p in access.trainable_parameters(selection)}

    expected_names = set(access.dense_param_names()) | set(access.router_param_names())
    for l, e in [(0, 2), (1, 0), (1, 3)]:
        expected_names |= set(access.expert_param_names(l, e))
    assert chosen == {id(params[n]) for n in expected_names}
    assert len(access.trainable_parameters(selection)) == len(expected_names)
    # nothing of an unselected expert
    unselected = {id(p) for p in access.layers[0].experts[0].parameters()}
    assert not chosen & unselected

    none = {id(p) for p in access.trainable_parameters(torch.zeros(L, S, dtype=torch.bool))}
    dense_router = {id(params[n]) for n in access.dense_param_names() + access.router_param_names()}
    assert none == dense_router
    every = access.trainable_parameters(torch.ones(L, S, dtype=torch.bool))
    assert {id(p) for p in every} == {id(p) for p in model.parameters()}
