"""Model access for transformers 5.x fused-expert MoE families (hfedmoe.moe.fused).

Every family is built from a tiny random config, saved and loaded back by path (the
hub-free route users take), then driven only through the access layer.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from hfedmoe.moe import NoMoELayersError, fused, make_access
from hfedmoe.moe.fused import FusedMoEAccess
from hfedmoe.moe.state_keys import expert_key, split_expert_key

from builders import B, COMMON, FAMILIES, T, inputs, tiny_config


def load_tiny(name: str, tmp_path, seed: int = 0, auto=transformers.AutoModelForCausalLM) -> nn.Module:
    """Random tiny model, saved and loaded back from disk."""
    torch.manual_seed(seed)
    model = auto.from_config(tiny_config(FAMILIES[name]))
    model.save_pretrained(tmp_path / name)
    return auto.from_pretrained(tmp_path / name)


def lm_loss(model: nn.Module, seed: int = 1) -> torch.Tensor:
    ids, mask = inputs(seed)
    return model(input_ids=ids, attention_mask=mask, labels=ids).loss


def expert_slices(access: FusedMoEAccess) -> dict[tuple[int, int], list[torch.Tensor]]:
    """Copies of every expert's slices, read straight from the fused parameters."""
    params = dict(access.model.named_parameters())
    out = {}
    for (layer, expert), keys in access.param_groups().experts.items():
        out[(layer, expert)] = [params[split_expert_key(k)[0]][expert].detach().clone() for k in keys]
    return out


families = pytest.mark.parametrize("name", list(FAMILIES))


# --- 1. structure ---------------------------------------------------------------------------

@families
def test_make_access_finds_only_the_moe_layers(name, tmp_path):
    family = FAMILIES[name]
    model = load_tiny(name, tmp_path)
    assert fused.detect_fused(model)
    access = make_access(model)
    assert isinstance(access, FusedMoEAccess)
    assert access.num_layers == len(family.moe_layers)
    assert access.num_experts == family.num_experts
    assert access.num_experts_total == len(family.moe_layers) * family.num_experts
    assert access.layer_names == [f"model.layers.{i}.mlp" for i in family.moe_layers]
    assert access.expert_param_names(1, 2) == [
        f"model.layers.{family.moe_layers[1]}.mlp.experts.{p}.__expert__.2" for p in ("gate_up_proj", "down_proj")
    ]
    assert access.aux_loss() is None
    assert access.new_parameter_names() == set()  # pretrained LM: router and lm_head are trained


def test_virtual_key_format_round_trips():
    key = expert_key("model.layers.0.mlp.experts.gate_up_proj", 13)
    assert key == "model.layers.0.mlp.experts.gate_up_proj.__expert__.13"
    assert split_expert_key(key) == ("model.layers.0.mlp.experts.gate_up_proj", 13)
    assert split_expert_key("model.layers.0.mlp.experts.gate_up_proj") is None
    assert split_expert_key("model.layers.0.mlp.experts.13.weight") is None


def test_a_dense_model_is_refused_with_a_clear_error():
    config = transformers.LlamaConfig(**COMMON, intermediate_size=16, num_hidden_layers=2)
    model = transformers.LlamaForCausalLM(config)
    assert not fused.detect_fused(model)
    with pytest.raises(NoMoELayersError, match="LlamaForCausalLM has no Mixture-of-Experts layer"):
        make_access(model)
    with pytest.raises(NoMoELayersError, match="no fused Mixture-of-Experts layer"):
        FusedMoEAccess(model)


def test_layers_with_different_expert_counts_are_refused(tmp_path):
    model = load_tiny("mixtral", tmp_path)
    mlp = model.model.layers[1].mlp
    mlp.gate.weight = nn.Parameter(mlp.gate.weight[:3].detach().clone())
    mlp.experts.gate_up_proj = nn.Parameter(mlp.experts.gate_up_proj[:3].detach().clone())
    mlp.experts.down_proj = nn.Parameter(mlp.experts.down_proj[:3].detach().clone())
    with pytest.raises(NoMoELayersError, match=r"different expert counts \[3, 4\]"):
        FusedMoEAccess(model)


def test_hooks_are_registered_once_however_often_access_is_built(tmp_path):
    model = load_tiny("olmoe", tmp_path)
    accesses = [make_access(model) for _ in range(3)]
    router = model.model.layers[0].mlp.gate
    assert len(router._forward_hooks) == 1
    assert len(model.model.layers[0].mlp._forward_pre_hooks) == 1
    assert len(model.model.layers[0].mlp.experts.gate_up_proj._post_accumulate_grad_hooks) == 1
    ids, mask = inputs()
    model(input_ids=ids, attention_mask=mask)
    assert torch.equal(accesses[0].router_probs(), accesses[2].router_probs())


def test_sequence_classification_head_is_new(tmp_path):
    model = load_tiny("qwen2_moe", tmp_path, auto=transformers.AutoModelForSequenceClassification)
    assert make_access(model).new_parameter_names() == {"score.weight"}


# --- 2. state -----------------------------------------------------------------------------------

@families
def test_state_dict_splits_experts_and_loads_back(name, tmp_path):
    model = load_tiny(name, tmp_path)
    access = make_access(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    state = access.state_dict()

    # every fused tensor became E virtual keys holding exactly its slices
    fused = [k for k, v in original.items() if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == 2 * access.num_layers
    for key in fused:
        assert key not in state
        for e in range(access.num_experts):
            assert torch.equal(state[expert_key(key, e)], original[key][e])
    assert len(state) == len(original) + len(fused) * (access.num_experts - 1)

    with torch.no_grad():  # move everything, buffers included, so a no-op load would fail
        for value in model.state_dict().values():
            value.add_(1.0)
    access.load_state_dict(state, strict=True)
    after = model.state_dict()
    assert after.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(after[key], value), key


@families
def test_param_groups_partition_the_virtual_state(name, tmp_path):
    model = load_tiny(name, tmp_path)
    access = make_access(model)
    groups = access.param_groups()
    state = access.state_dict()
    experts = groups.all_expert_keys
    everything = experts + list(groups.routers) + list(groups.dense)
    assert len(everything) == len(set(everything)) == len(state)
    assert set(everything) == set(state)
    assert set(groups.experts) == {(l, e) for l in range(access.num_layers) for e in range(access.num_experts)}
    assert all(len(keys) == 2 for keys in groups.experts.values())

    expected_routers = {f"{n}.gate.weight" for n in access.layer_names}
    if name == "deepseek_v3":  # the selection-correction buffer travels with its router
        expected_routers |= {f"{n}.gate.e_score_correction_bias" for n in access.layer_names}
    assert set(groups.routers) == expected_routers
    if name == "qwen2_moe":
        shared = [k for k in state if ".shared_expert" in k]
        assert len(shared) == 2 * 4  # 3 MLP weights + the shared-expert gate, in 2 layers
        assert set(shared) <= set(groups.dense)
    if name.startswith("deepseek"):
        shared = [k for k in state if ".shared_experts." in k]
        assert shared and set(shared) <= set(groups.dense)
        assert "model.layers.0.mlp.gate_proj.weight" in groups.dense  # the dense first layer


def test_strict_loading_names_missing_and_unknown_keys(tmp_path):
    access = make_access(load_tiny("mixtral", tmp_path))
    state = access.state_dict()
    key = expert_key("model.layers.1.mlp.experts.down_proj", 3)
    partial = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=r"missing key 'model\.layers\.1\.mlp\.experts\.down_proj\.__expert__\.3'"):
        access.load_state_dict(partial, strict=True)
    with pytest.raises(ValueError, match="unknown key 'stray'"):
        access.load_state_dict({**state, "stray": torch.zeros(1)}, strict=True)
    with pytest.raises(ValueError, match=r"\.__expert__\.3: shape \(32, 8\)"):
        access.load_state_dict({**state, key: torch.zeros(32, 8)}, strict=True)


def test_non_strict_loading_writes_only_the_given_slices(tmp_path):
    model = load_tiny("qwen3_moe", tmp_path)
    access = make_access(model)
    before = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"].clone()
    key = expert_key("model.layers.1.mlp.experts.gate_up_proj", 2)
    access.load_state_dict({key: torch.full_like(before[2], 7.0), "stray": torch.zeros(1)}, strict=False)
    after = model.state_dict()["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(after[2], torch.full_like(before[2], 7.0))
    others = [e for e in range(access.num_experts) if e != 2]
    assert torch.equal(after[others], before[others])


def test_state_survives_the_flower_wire_format(tmp_path):
    from flwr.app import ArrayRecord

    source = make_access(load_tiny("deepseek_v3", tmp_path / "a", seed=0))
    target_model = load_tiny("deepseek_v3", tmp_path / "b", seed=1)
    target = make_access(target_model)
    target.load_state_dict(ArrayRecord(source.state_dict()).to_torch_state_dict(), strict=True)
    for key, value in source.model.state_dict().items():
        assert torch.equal(target_model.state_dict()[key], value), key


# --- 3. routing records ------------------------------------------------------------------------

def capture_router_outputs(access: FusedMoEAccess) -> dict[int, tuple]:
    """Each router's own (logits, top-k weights, top-k indices), captured independently."""
    captured: dict[int, tuple] = {}
    for layer, block in enumerate(access.blocks):
        router = access.model.get_submodule(block.router_name)
        router.register_forward_hook(lambda m, a, out, layer=layer: captured.__setitem__(layer, out))
    return captured


@families
def test_router_probs_are_the_scores_the_model_routed_with(name, tmp_path):
    family = FAMILIES[name]
    access = make_access(load_tiny(name, tmp_path))
    with pytest.raises(RuntimeError, match="run a forward pass first"):
        access.router_probs()
    captured = capture_router_outputs(access)
    ids, mask = inputs()
    access.model(input_ids=ids, attention_mask=mask)
    probs, dispatch = access.router_probs(), access.dispatch()
    L, S = access.num_layers, access.num_experts
    assert probs.shape == (B, T, L, S) and probs.dtype == torch.float32
    assert dispatch.shape == (B, T, L, S) and dispatch.dtype == torch.bool
    assert (dispatch.sum(dim=-1) == family.top_k).all()

    for layer in range(L):
        logits, weights, indices = captured[layer]
        g = probs[:, :, layer].reshape(B * T, S)
        score = torch.softmax if family.score == "softmax" else lambda x, dim: torch.sigmoid(x)
        assert torch.equal(g, score(logits.detach().float(), dim=-1))
        if family.score == "softmax":
            torch.testing.assert_close(g.sum(dim=-1), torch.ones(B * T))
        else:
            assert not torch.allclose(g.sum(dim=-1), torch.ones(B * T), atol=0.1)
        expected = torch.zeros(B * T, S, dtype=torch.bool).scatter_(1, indices, True)
        assert torch.equal(dispatch[:, :, layer].reshape(B * T, S), expected)
        # the model's expert weights are G_e at the chosen experts up to one positive
        # factor per token (renormalisation / routed_scaling_factor)
        ratio = weights.detach().float() / g.gather(1, indices)
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
        if name == "deepseek_v3":
            chosen = g.gather(1, indices)
            torch.testing.assert_close(chosen / chosen.sum(-1, keepdim=True) * 2.5, weights.detach())


def test_deepseek_v3_dispatch_follows_the_biased_group_limited_choice(tmp_path):
    access = make_access(load_tiny("deepseek_v3", tmp_path))
    with torch.no_grad():  # the correction bias alone forces experts 6 and 7 (group 3)
        for name in access.layer_names:
            access.model.get_submodule(f"{name}.gate").e_score_correction_bias[6:] = 10.0
    ids, mask = inputs()
    access.model(input_ids=ids, attention_mask=mask)
    dispatch, probs = access.dispatch(), access.router_probs()
    assert dispatch[..., 6:].all() and not dispatch[..., :6].any()
    assert (probs < 1).all()  # G_e is the unbiased sigmoid score
    plain_top2 = probs.topk(2, dim=-1).indices
    assert not (plain_top2 >= 6).all()  # recomputing top-k from G_e would get it wrong


def test_router_records_reshape_to_the_current_batch(tmp_path):
    access = make_access(load_tiny("mixtral", tmp_path))
    access.model(input_ids=torch.randint(3, 100, (3, 7)))
    assert access.router_probs().shape == (3, 7, 2, 4)
    assert access.dispatch().shape == (3, 7, 2, 4)


# --- 4. training only the selected experts ---------------------------------------------------

def one_expert_per_layer(access: FusedMoEAccess, step: int) -> torch.Tensor:
    """A different routed-to expert of every layer at every step."""
    used = access.dispatch().any(dim=0).any(dim=0)  # [L, S]
    selection = torch.zeros_like(used)
    for layer in range(access.num_layers):
        candidates = used[layer].nonzero().squeeze(1)
        selection[layer, candidates[step % len(candidates)]] = True
    return selection


@families
def test_only_selected_experts_move_under_adamw(name, tmp_path):
    model = load_tiny(name, tmp_path)
    model.train()
    access = make_access(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    selections = []
    for step in range(4):
        loss = lm_loss(model, seed=step)
        selection = one_expert_per_layer(access, step)
        selections.append(selection)
        before = expert_slices(access)
        loss.backward(inputs=access.trainable_parameters(selection))
        with access.freeze_unselected(selection, optimizer=optimizer):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = expert_slices(access)
        for (layer, expert), tensors in before.items():
            same = all(torch.equal(a, b) for a, b in zip(tensors, after[(layer, expert)]))
            assert same != bool(selection[layer, expert]), (step, layer, expert)
    # the freeze did real work: an expert trained earlier has momentum, and distinct
    # selections happened
    assert len({tuple(s.flatten().tolist()) for s in selections}) > 1
    exp_avg = [optimizer.state[p]["exp_avg"] for p in access.fused_parameters.values()]
    assert any(m.abs().sum() > 0 for m in exp_avg)


def test_without_the_freeze_adamw_moves_unselected_slices(tmp_path):
    """Control for the test above: the fused layout really needs the freeze."""
    model = load_tiny("mixtral", tmp_path)
    access = make_access(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        loss = lm_loss(model, seed=step)
        selection = one_expert_per_layer(access, step)
        before = expert_slices(access)
        loss.backward(inputs=access.trainable_parameters(selection))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = expert_slices(access)
    moved = [le for le, ts in before.items() if not selection[le] and not torch.equal(ts[0], after[le][0])]
    assert moved


def test_freeze_keeps_the_optimizer_moments_of_unselected_slices(tmp_path):
    model = load_tiny("qwen2_moe", tmp_path)
    access = make_access(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    all_experts = torch.ones(access.num_layers, access.num_experts, dtype=torch.bool)
    lm_loss(model).backward(inputs=access.trainable_parameters(all_experts))
    with access.freeze_unselected(all_experts, optimizer=optimizer):
        optimizer.step()  # every expert gets momentum
    optimizer.zero_grad(set_to_none=True)
    fused = list(access.fused_parameters.values())
    moments = [{k: optimizer.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")} for p in fused]
    loss = lm_loss(model, seed=2)
    selection = one_expert_per_layer(access, 0)
    loss.backward(inputs=access.trainable_parameters(selection))
    with access.freeze_unselected(selection, optimizer=optimizer):
        optimizer.step()
    for key, param, saved in zip(access.fused_parameters, fused, moments):
        keep = selection[access.fused_layers[key]]
        for name, value in saved.items():
            now = optimizer.state[param][name]
            assert torch.equal(now[~keep], value[~keep]), (key, name)
            assert not torch.equal(now[keep], value[keep]), (key, name)


def test_backward_masks_unselected_gradients_before_clipping(tmp_path):
    model = load_tiny("olmoe", tmp_path)
    access = make_access(model)
    loss = lm_loss(model)
    selection = torch.zeros(access.num_layers, access.num_experts, dtype=torch.bool)
    used = access.dispatch()[:, :, 0].flatten(0, 1).any(dim=0).nonzero().squeeze(1)
    selection[0, used[0]] = True  # one expert of layer 0, nothing in layer 1
    params = access.trainable_parameters(selection)
    fused = access.fused_parameters
    ids = {id(p) for p in params}
    assert {id(fused[f"model.layers.0.mlp.experts.{p}"]) for p in ("gate_up_proj", "down_proj")} <= ids
    assert not {id(fused[f"model.layers.1.mlp.experts.{p}"]) for p in ("gate_up_proj", "down_proj")} & ids
    assert {id(p) for n, p in model.named_parameters() if "experts" not in n} <= ids

    loss.backward(inputs=params)
    grad = fused["model.layers.0.mlp.experts.gate_up_proj"].grad
    assert grad[used[0]].abs().sum() > 0
    others = [e for e in range(access.num_experts) if e != used[0]]
    assert torch.equal(grad[others], torch.zeros_like(grad[others]))  # even though they got tokens
    assert fused["model.layers.1.mlp.experts.gate_up_proj"].grad is None

    with access.freeze_unselected(selection):  # leaves the gradient mask disarmed
        pass
    model.zero_grad(set_to_none=True)
    lm_loss(model).backward()
    grad = fused["model.layers.0.mlp.experts.gate_up_proj"].grad
    assert all(grad[e].abs().sum() > 0 for e in used.tolist())


def test_selection_shape_is_checked(tmp_path):
    access = make_access(load_tiny("mixtral", tmp_path))
    with pytest.raises(ValueError, match=r"BoolTensor\[2, 4\]"):
        access.trainable_parameters(torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"BoolTensor\[2, 4\]"):
        with access.freeze_unselected(torch.ones(2, 4)):
            pass


@pytest.mark.parametrize("deferred", [False, True], ids=["autograd", "deferred"])
@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_the_trainers_step_sequence_keeps_unselected_slices(name, deferred, tmp_path):
    """What hfedmoe.training.train_local does per batch, without passing the optimizer."""
    model = load_tiny(name, tmp_path)
    model.train()
    access = make_access(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    assert access.enable_deferred_backward(deferred) is True  # the eager fused layout supports it
    for step in range(3):
        loss = lm_loss(model, seed=step)
        selection = one_expert_per_layer(access, step)
        before = expert_slices(access)
        params = access.trainable_parameters(selection)
        access.set_selection(selection)
        loss.backward(inputs=params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        with access.freeze_unselected(selection):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for param in access.unselected_expert_parameters(selection):
            optimizer.state.pop(param, None)
        after = expert_slices(access)
        for le, tensors in before.items():
            same = all(torch.equal(a, b) for a, b in zip(tensors, after[le]))
            assert same != bool(selection[le]), (step, le)


def test_unselected_expert_parameters_are_the_wholly_unselected_fused_tensors(tmp_path):
    access = make_access(load_tiny("qwen2_moe", tmp_path))
    assert access.top_k == 2
    selection = torch.zeros(access.num_layers, access.num_experts, dtype=torch.bool)
    selection[0, 1] = True
    fused = access.fused_parameters
    expected = [fused[f"model.layers.2.mlp.experts.{p}"] for p in ("gate_up_proj", "down_proj")]
    got = access.unselected_expert_parameters(selection)
    assert len(got) == 2 and all(a is b for a, b in zip(got, expected))
    assert access.unselected_expert_parameters(torch.ones_like(selection)) == []


def test_set_selection_alone_masks_the_next_backward(tmp_path):
    model = load_tiny("mixtral", tmp_path)
    access = make_access(model)
    selection = torch.zeros(access.num_layers, access.num_experts, dtype=torch.bool)
    selection[:, 0] = True
    access.set_selection(selection)
    lm_loss(model).backward()  # plain backward over everything
    for param in access.fused_parameters.values():
        assert param.grad[1:].abs().sum() == 0
    with access.freeze_unselected(selection):  # disarms the mask
        pass
    model.zero_grad(set_to_none=True)
    lm_loss(model).backward()  # control: unmasked, the other experts do get gradient
    for param in access.fused_parameters.values():
        assert param.grad[1:].abs().sum() > 0


def test_a_wrapped_classification_head_is_new_too(tmp_path):
    # hfedmoe.task wraps the HF model ("model.score.weight"): the head must still get
    # the larger learning rate, and no router may.
    from hfedmoe.models.hf_wrappers import HFSequenceClassifier

    model = HFSequenceClassifier(load_tiny("mixtral", tmp_path, auto=transformers.AutoModelForSequenceClassification))
    assert make_access(model).new_parameter_names() == {"model.score.weight"}


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_the_trainers_optimizer_moves_and_keeps_moments_for_selected_slices_only(name, tmp_path):
    """hfedmoe.training.make_optimizer builds an ExpertSliceAdamW for fused layouts: under
    freeze_unselected it updates only the selected slices and holds no moments for the
    others (a constrained client's optimizer memory scales with its budget)."""
    from hfedmoe.moe.slice_adamw import ExpertSliceAdamW
    from hfedmoe.training import LocalTrainConfig, make_optimizer

    model = load_tiny(name, tmp_path)
    model.train()
    access = make_access(model)
    optimizer = make_optimizer(model, access, LocalTrainConfig(lr=1e-2, weight_decay=0.1))
    assert isinstance(optimizer, ExpertSliceAdamW)
    params = dict(model.named_parameters())
    for step in range(3):
        loss = lm_loss(model, seed=step)
        selection = one_expert_per_layer(access, step)
        before = expert_slices(access)
        trainable = access.trainable_parameters(selection)
        loss.backward(inputs=trainable)
        with access.freeze_unselected(selection, optimizer):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = expert_slices(access)
        for le, tensors in before.items():
            same = all(torch.equal(a, b) for a, b in zip(tensors, after[le]))
            assert same != bool(selection[le]), (step, le)
        for layer, block in enumerate(access.blocks):
            for key in block.expert_keys:
                kept = sorted(optimizer.state[params[key]].get("slices", {}))
                assert kept == selection[layer].nonzero().flatten().tolist(), (step, key)
                assert not any(v.shape == params[key].shape for v in optimizer.state[params[key]].values()
                               if isinstance(v, torch.Tensor)), "a full-size moment of a fused tensor"
    assert optimizer.slice_masks == {}
