"""The MoE block, sparse upcycling and the model-access layer (hfedmoe.moe)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch.nn import functional as F

from hfedmoe.models.moe_block import MoEFeedForward
from hfedmoe.models.upcycled import (
    MoEClassifier,
    UpcycledSpec,
    build_upcycled_classifier,
    embedded_model_path,
    upcycle_bert_layers,
)
from hfedmoe.moe import NoMoELayersError
from hfedmoe.moe.modular import ModularMoEAccess

L, S, K = 2, 4, 2  # MoE layers, experts per layer, top-k of the tiny model


def tiny_bert(seed: int = 0, **config_kwargs) -> transformers.BertModel:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=L, num_attention_heads=2, intermediate_size=32,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(config, add_pooling_layer=False)


def tiny_moe(num_experts: int = S, top_k: int = K, seed: int = 0) -> MoEClassifier:
    backbone = tiny_bert(seed)
    upcycle_bert_layers(backbone, num_experts=num_experts, top_k=top_k)
    return MoEClassifier(backbone, num_labels=3)


def batch(b: int = 3, t: int = 8, vocab: int = 100, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - 3:] = 0  # some padding
    return ids, mask


# --- upcycling --------------------------------------------------------------------------

def test_upcycling_tiny_bert_preserves_the_dense_function():
    dense = tiny_bert().eval()
    moe = copy.deepcopy(dense)
    upcycle_bert_layers(moe, num_experts=S, top_k=K)
    moe.eval()
    ids, mask = batch()
    with torch.no_grad():
        expected = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = moe(input_ids=ids, attention_mask=mask).last_hidden_state
    # The router is random, so tokens go to different experts; all experts are
    # copies of the dense FFN, so the output must not depend on that.
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    layers = [m for m in moe.modules() if isinstance(m, MoEFeedForward)]
    assert len(layers) == L
    for layer in moe.encoder.layer:
        assert isinstance(layer.intermediate, MoEFeedForward)
        assert isinstance(layer.output.dense, torch.nn.Identity)
    # experts really are copies of the dense FFN of their own layer
    for dense_layer, moe_layer in zip(dense.encoder.layer, moe.encoder.layer):
        for expert in moe_layer.intermediate.experts:
            assert torch.equal(expert.fc1.weight, dense_layer.intermediate.dense.weight)
            assert torch.equal(expert.fc2.bias, dense_layer.output.dense.bias)


def test_upcycling_the_embedded_minilm_preserves_the_dense_function(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = embedded_model_path()
    model = build_upcycled_classifier(UpcycledSpec(str(path), num_labels=5)).eval()
    dense = transformers.BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True).eval()
    access = ModularMoEAccess(model)
    assert (access.num_layers, access.num_experts) == (6, 8)
    ids, mask = batch(b=2, t=12, vocab=dense.config.vocab_size)
    with torch.no_grad():
        expected = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = model(ids, mask)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
    assert logits.shape == (2, 5)


def test_upcycle_rejects_a_model_without_bert_layers():
    with pytest.raises(ValueError, match="encoder.layer"):
        upcycle_bert_layers(torch.nn.Linear(2, 2), num_experts=2, top_k=1)


def test_upcycling_a_non_gelu_bert_preserves_the_function_or_refuses():
    dense = tiny_bert(hidden_act="relu").eval()
    moe = copy.deepcopy(dense)
    try:
        upcycle_bert_layers(moe, num_experts=S, top_k=K)
    except ValueError:
        return  # refusing is an acceptable fix
    moe.eval()
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            moe(input_ids=ids, attention_mask=mask).last_hidden_state,
            dense(input_ids=ids, attention_mask=mask).last_hidden_state,
            atol=1e-4, rtol=0,
        )


def test_upcycled_model_with_ffn_chunking_records_every_token():
    backbone = tiny_bert(chunk_size_feed_forward=2)
    upcycle_bert_layers(backbone, num_experts=S, top_k=K)
    ids, mask = batch(b=3, t=8)
    backbone(input_ids=ids, attention_mask=mask)
    assert ModularMoEAccess(backbone).router_probs().shape == (3, 8, L, S)


# --- MoEFeedForward ---------------------------------------------------------------------

def test_moe_feedforward_records_and_output():
    torch.manual_seed(0)
    moe = MoEFeedForward(hidden_size=16, intermediate_size=32, num_experts=S, top_k=K)
    # Make the experts different so the output depends on the routing.
    with torch.no_grad():
        for e, expert in enumerate(moe.experts):
            expert.fc2.bias.fill_(float(e))
        moe.router.weight.normal_(0.0, 1.0)
    x = torch.randn(3, 5, 16)
    y = moe(x)

    probs, dispatch = moe.last_router_probs, moe.last_dispatch
    assert probs.shape == (3, 5, S) and dispatch.shape == (3, 5, S)
    assert dispatch.dtype == torch.bool
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, F.softmax(moe.router(x), dim=-1).detach())
    assert not probs.requires_grad
    assert (dispatch.sum(-1) == K).all()
    # dispatch marks exactly each token's top-k experts
    top_idx = probs.topk(K, dim=-1).indices
    assert torch.equal(dispatch, torch.zeros_like(dispatch).scatter_(-1, top_idx, True))

    # output = sum over the top-k of renormalised probability * expert(x)
    expected = torch.zeros_like(x)
    top_p = probs.gather(-1, top_idx)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    for k in range(K):
        for e in range(S):
            sel = top_idx[..., k] == e
            expected[sel] += top_p[..., k][sel].unsqueeze(-1) * moe.experts[e](x[sel])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)

    aux = moe.last_aux_loss
    assert aux.ndim == 0 and torch.isfinite(aux)
    assert aux.requires_grad
    flat_p = F.softmax(moe.router(x.reshape(-1, 16)), dim=-1)
    fraction = dispatch.reshape(-1, S).float().mean(0) / K
    torch.testing.assert_close(aux, S * (fraction * flat_p.mean(0)).sum())
    aux.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [0, S + 1])
def test_moe_feedforward_rejects_invalid_top_k(top_k):
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward(16, 32, num_experts=S, top_k=top_k)


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
