"""Model access for Switch Transformers, separate expert modules (hfedmoe.moe.switch)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from hfedmoe.models.moe_block import MoEFeedForward
from hfedmoe.moe import fused
from hfedmoe.moe.switch import SwitchMoEAccess, decoder_layer_flags, detect_switch

B, T, L, S = 2, 5, 4, 4
LAYERS = ["encoder.block.1.layer.1.mlp", "encoder.block.3.layer.1.mlp",
          "decoder.block.1.layer.2.mlp", "decoder.block.3.layer.2.mlp"]


def load_switch(tmp_path, seed: int = 0, **overrides) -> nn.Module:
    """Tiny random Switch model (sparse every other layer), saved and loaded back."""
    config = transformers.SwitchTransformersConfig(**{
        **dict(vocab_size=100, d_model=32, d_kv=16, d_ff=32, num_heads=2, num_layers=4, num_decoder_layers=4,
               num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=S, expert_capacity=64,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
        **overrides,
    })
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    model.save_pretrained(tmp_path / "switch")
    return transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "switch")


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}  # decoder length == encoder length


def expert_tensors(access: SwitchMoEAccess) -> dict[tuple[int, int], list[torch.Tensor]]:
    state = access.model.state_dict()
    return {le: [state[k].clone() for k in keys] for le, keys in access.param_groups().experts.items()}


def test_switch_layers_are_found_by_structure(tmp_path):
    model = load_switch(tmp_path)
    assert detect_switch(model) and not fused.detect_fused(model)
    access = SwitchMoEAccess(model)
    assert (access.num_layers, access.num_experts, access.num_experts_total) == (L, S, L * S)
    assert access.layer_names == LAYERS
    assert access.expert_param_names(2, 3) == [f"{LAYERS[2]}.experts.expert_3.{w}.weight" for w in ("wi", "wo")]
    assert access.aux_loss() is None and access.new_parameter_names() == set()


def test_other_layouts_are_not_switch(tmp_path):
    mixtral = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4))
    assert not detect_switch(mixtral)
    assert not detect_switch(nn.Sequential(MoEFeedForward(16, 32, num_experts=4, top_k=2)))


def test_switch_state_round_trip_and_groups(tmp_path):
    model = load_switch(tmp_path)
    access = SwitchMoEAccess(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    state = access.state_dict()
    groups = access.param_groups()
    everything = groups.all_expert_keys + list(groups.routers) + list(groups.dense)
    assert len(everything) == len(set(everything)) == len(state) and set(everything) == set(state)
    assert set(groups.routers) == {f"{n}.router.classifier.weight" for n in LAYERS}
    assert {"shared.weight", "encoder.embed_tokens.weight", "lm_head.weight"} <= set(groups.dense)

    with torch.no_grad():
        for value in model.state_dict().values():
            value.add_(1.0)
    access.load_state_dict(state, strict=True)
    for key, value in original.items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="missing key 'shared.weight'"):
        access.load_state_dict({k: v for k, v in state.items() if k != "shared.weight"})


def capture(access: SwitchMoEAccess) -> dict[int, tuple]:
    captured: dict[int, tuple] = {}
    for layer, block in enumerate(access.blocks):
        access.model.get_submodule(block.router_name).register_forward_hook(
            lambda m, a, out, layer=layer: captured.__setitem__(layer, out))
    return captured


@pytest.mark.parametrize("capacity", [64, 1])
def test_switch_routing_records_match_the_router(capacity, tmp_path):
    access = SwitchMoEAccess(load_switch(tmp_path, expert_capacity=capacity))
    captured = capture(access)
    access.model(**inputs())
    probs, dispatch = access.router_probs(), access.dispatch()
    assert probs.shape == dispatch.shape == (B, T, L, S)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, T, L))
    for layer in range(L):
        expert_index, _, logits = captured[layer]
        assert torch.equal(probs[:, :, layer], torch.softmax(logits.float(), dim=-1))
        assert torch.equal(dispatch[:, :, layer], expert_index.bool())
    per_token = dispatch.sum(-1)
    if capacity == 64:
        assert (per_token == 1).all()
        assert torch.equal(dispatch.float().argmax(-1), probs.argmax(-1))
    else:  # one token per expert and sequence: the rest are dropped, dispatched nowhere
        assert (per_token <= 1).all() and (per_token == 0).any()


def test_switch_refuses_mixed_token_axes(tmp_path):
    access = SwitchMoEAccess(load_switch(tmp_path))
    batch = inputs()
    access.model(input_ids=batch["input_ids"], decoder_input_ids=batch["input_ids"][:, :3])
    with pytest.raises(RuntimeError, match="different \\[B, T\\] token shapes"):
        access.router_probs()


def test_switch_trains_only_selected_experts(tmp_path):
    model = load_switch(tmp_path)
    model.train()
    access = SwitchMoEAccess(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        loss = model(**inputs(seed=step)).loss
        used = access.dispatch().any(dim=0).any(dim=0)
        selection = torch.zeros(L, S, dtype=torch.bool)
        for layer in range(L):
            candidates = used[layer].nonzero().squeeze(1)
            selection[layer, candidates[step % len(candidates)]] = True
        before = expert_tensors(access)
        loss.backward(inputs=access.trainable_parameters(selection))
        params = dict(model.named_parameters())
        for le, keys in access.param_groups().experts.items():  # unselected: never computed
            assert all((params[k].grad is not None) == bool(selection[le]) for k in keys), (step, le)
        with access.freeze_unselected(selection, optimizer=optimizer):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = expert_tensors(access)
        for le, tensors in before.items():
            same = all(torch.equal(a, b) for a, b in zip(tensors, after[le]))
            assert same != bool(selection[le]), (step, le)


def test_switch_freeze_restores_experts_that_got_a_gradient_anyway(tmp_path):
    model = load_switch(tmp_path)
    access = SwitchMoEAccess(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    selection = torch.zeros(L, S, dtype=torch.bool)
    selection[:, 0] = True
    before = expert_tensors(access)
    model(**inputs()).loss.backward()  # every parameter gets a gradient
    with access.freeze_unselected(selection, optimizer=optimizer):
        optimizer.step()
    after = expert_tensors(access)
    for le, tensors in before.items():
        same = all(torch.equal(a, b) for a, b in zip(tensors, after[le]))
        assert same != bool(selection[le]), le


def test_switch_protocol_extras(tmp_path):
    access = SwitchMoEAccess(load_switch(tmp_path))
    assert access.enable_deferred_backward(True) is False and access.top_k == 1
    selection = torch.ones(L, S, dtype=torch.bool)
    selection[3, 2] = False
    params = dict(access.model.named_parameters())
    expected = [params[k] for k in access.expert_param_names(3, 2)]
    got = access.unselected_expert_parameters(selection)
    assert len(got) == 2 and all(a is b for a, b in zip(got, expected))


def test_switch_router_classifiers_are_not_task_heads(tmp_path):
    from hfedmoe.models.hf_wrappers import Seq2SeqAsLM

    model = load_switch(tmp_path)
    access = SwitchMoEAccess(Seq2SeqAsLM(model, decoder_layer_flags(model)))
    assert access.new_parameter_names() == set()
