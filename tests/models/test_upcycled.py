"""Sparse upcycling of a dense BERT into an MoE classifier (hfedmoe.models.upcycled)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from hfedmoe.models.moe_block import MoEFeedForward
from hfedmoe.models.upcycled import (
    UpcycledSpec,
    build_upcycled_classifier,
    embedded_model_path,
    upcycle_bert_layers,
)
from hfedmoe.moe.modular import ModularMoEAccess

from builders import K, L, S, batch, tiny_bert


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
