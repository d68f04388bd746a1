"""Routing override and routed-output scaling on the Hugging Face layouts (fused, LoRA, Switch).

``MoEAccess.routing_override(mask, top_k)`` re-runs each router's own rule with a
routing mask and a per-client top-k applied inside it (hfedmoe.moe.routing: one pure
function per family); ``routed_output_scale(scales)`` multiplies the routed experts'
combination of each layer. Tiny random models of every fused family in
tests/builders.py and a tiny Switch Transformer, plus one LoRA-wrapped model and one
FedMoE / SEER-MoE client round per layout (Mixtral, DeepSeek-V3) at the end.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from hfedmoe.client_round import client_round
from hfedmoe.config import RunConfig
from hfedmoe.methods import get_method, profiling
from hfedmoe.methods.base import ClientContext
from hfedmoe.moe import make_access
from hfedmoe.moe.fused import FusedMoEAccess
from hfedmoe.moe.lora import LoraMoEAccess, apply_lora
from hfedmoe.moe.routing import deepseek_v3_routing, fused_routing_rule, switch_routing
from hfedmoe.recipe import build_model, load_client_data

from builders import FAMILIES, inputs, save_family, sharp_causal_lm, tiny_config, tiny_switch, write_data

FUSED = list(FAMILIES)  # mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3
ALL = FUSED + ["switch"]


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: one thread is fastest


def build(name: str) -> torch.nn.Module:
    """The tiny model of ``name`` in eval mode, routers redrawn from N(0, 0.5) (sharp
    routing: near-uniform router logits would make every mask look alike)."""
    model = tiny_switch() if name == "switch" else sharp_causal_lm(name)
    access = make_access(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for block in access.blocks:
            router = model.get_submodule(block.router_name)
            weight = router.classifier.weight if name == "switch" else router.weight
            weight.normal_(0.0, 0.5)
            bias = getattr(router, "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0.0, 0.3)
    return model.eval()


def forward(model, name: str, ids=None, mask=None) -> torch.Tensor:
    if ids is None:
        ids, mask = inputs()
    if name == "switch":  # decoder as long as the encoder: one [B, T] token axis for every layer
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits
    return model(input_ids=ids, attention_mask=mask).logits


def model_top_k(name: str) -> int:
    return 1 if name == "switch" else FAMILIES[name].top_k


def random_mask(access, keep: int, seed: int = 0) -> torch.Tensor:
    """BoolTensor[L, S] keeping ``keep`` random experts per layer."""
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(access.num_experts, generator=g) for _ in range(access.num_layers)])
    return torch.zeros(access.num_layers, access.num_experts, dtype=torch.bool).scatter_(1, order[:, :keep], True)


def router_of(access, layer: int):
    return access.model.get_submodule(access.blocks[layer].router_name)


# --- the rules are the routers' own ---------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_each_rule_reproduces_its_router_bit_for_bit(name):
    """Without a mask and at the model's k, each family's pure rule returns the router's
    very tensors (order of the top-k slots and dtypes included)."""
    model = build(name)
    access = make_access(model)
    seen = []
    handles = [router_of(access, layer).register_forward_hook(lambda m, a, out: seen.append((m, out)))
               for layer in range(access.num_layers)]
    forward(model, name)
    for handle in handles:
        handle.remove()
    assert len(seen) == access.num_layers
    for router, output in seen:
        if name == "switch":
            expert_index, router_probs, logits = output
            index, _, weights = switch_routing(logits, None, 1, router.expert_capacity, router.dtype,
                                               router_probs.dtype)
            assert torch.equal(index, expert_index) and index.dtype == expert_index.dtype
            assert torch.equal(weights, router_probs) and weights.dtype == router_probs.dtype
            continue
        logits, weights, indices = output
        rule = fused_routing_rule(router)
        assert rule.name == {"mixtral": "mixtral", "deepseek_v2": "deepseek_v2",
                             "deepseek_v3": "deepseek_v3"}.get(name, "softmax_topk")
        new_weights, new_indices = rule(logits, None, router.top_k)
        assert torch.equal(new_indices, indices) and torch.equal(new_weights, weights)
        assert new_weights.dtype == weights.dtype
    assert access.renormalizes_top_k is {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "olmoe": False,
                                         "deepseek_v2": False, "deepseek_v3": True, "switch": False}[name]


# --- routing_override -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_a_no_op_override_is_bit_identical_and_captures_the_logits(name):
    model = build(name)
    access = make_access(model)
    own = forward(model, name)
    probs, dispatch = access.router_probs(), access.dispatch()
    with access.routing_override() as capture:
        assert torch.equal(forward(model, name), own)
        assert torch.equal(access.router_probs(), probs) and torch.equal(access.dispatch(), dispatch)
    assert all(logits is not None and logits.requires_grad for logits in capture.logits)
    # The model's k, stated explicitly, and a mask keeping every expert: the recomputed routing
    # (the rule's path, not the pass-through) gives the same output.
    full = torch.ones(access.num_layers, access.num_experts, dtype=torch.bool)
    with access.routing_override(full, model_top_k(name)):
        torch.testing.assert_close(forward(model, name), own, rtol=0, atol=1e-6)
        assert torch.equal(access.dispatch(), dispatch)


@pytest.mark.parametrize("name", ALL)
def test_a_mask_removes_experts_and_is_undone_on_exit(name):
    model = build(name)
    access = make_access(model)
    own = forward(model, name)
    keep = random_mask(access, keep=access.num_experts // 2)
    with access.routing_override(keep) as capture:
        masked = forward(model, name)
        probs, dispatch = access.router_probs(), access.dispatch()
    assert (probs[..., ~keep] == 0).all(), "removed experts get probability 0"
    assert not dispatch[..., ~keep].any(), "no token goes to a removed expert"
    assert (dispatch.sum(dim=-1) == model_top_k(name)).all(), "every token still gets the model's k experts"
    if name != "deepseek_v3":  # softmax routers: a distribution over the kept experts
        torch.testing.assert_close(probs.sum(dim=-1), torch.ones(probs.shape[:-1]))
    for layer, logits in enumerate(capture.logits):
        flat = logits.reshape(-1, access.num_experts)
        assert torch.isinf(flat[:, ~keep[layer]]).all() and torch.isfinite(flat[:, keep[layer]]).all()
    assert not torch.allclose(masked, own)
    assert torch.equal(forward(model, name), own), "the hooks are gone after the context"
    assert (access.router_probs()[..., ~keep] > 0).any() and access.dispatch()[..., ~keep].any()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", ["1", "S"])
def test_top_k_routes_that_many_experts_per_token(name, k):
    model = build(name)
    access = make_access(model)
    own = model_top_k(name)
    top_k = 1 if k == "1" else access.num_experts
    with access.routing_override(top_k=top_k):
        out = forward(model, name)
        dispatch = access.dispatch()
    assert torch.isfinite(out).all()
    assert (dispatch.sum(dim=-1) == top_k).all()
    # under a mask, a top-k beyond the kept experts routes every token to all of them
    keep = random_mask(access, keep=2, seed=3)
    with access.routing_override(keep, top_k=top_k):
        forward(model, name)
        dispatch = access.dispatch()
    assert (dispatch.sum(dim=-1) == min(top_k, 2)).all() and not dispatch[..., ~keep].any()
    assert access.top_k == own, "top_k stays the model's own"


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("top_k", [1, 8])
def test_the_deferred_backward_takes_any_number_of_slots(name, top_k):
    """The fused deferred backward (hfedmoe.moe.fused_deferred) under a top-k override
    gives the gradients of plain autograd."""
    grads = []
    for deferred in (False, True):
        model = build(name)
        access = make_access(model)
        assert access.enable_deferred_backward(deferred) is True
        selection = torch.ones(access.num_layers, access.num_experts, dtype=torch.bool)
        top = min(top_k, access.num_experts)
        with access.routing_override(top_k=top):
            loss = forward(model, name).square().mean()
            assert (access.dispatch().sum(dim=-1) == top).all()
            params = access.trainable_parameters(selection)
            loss.backward(inputs=params)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", ALL)
def test_gate_entropy_has_gradient_into_the_routers(name):
    model = build(name)
    access = make_access(model)
    ids, attention = inputs()
    keep = random_mask(access, keep=3, seed=1)
    with access.routing_override(keep) as capture:
        forward(model, name, ids, attention)
        entropy = capture.entropy(attention)
        probs = access.router_probs()
    assert entropy.requires_grad and torch.isfinite(entropy)
    if name != "deepseek_v3":  # the captured logits' softmax is the recorded G_e
        real = attention.bool()
        expected = torch.stack([torch.special.entr(probs[:, :, l][real]).sum(-1).mean()
                                for l in range(access.num_layers)]).mean()
        torch.testing.assert_close(entropy.detach(), expected)
    assert entropy.item() < torch.log(torch.tensor(3.0)).item() + 1e-6, "entropy over the 3 kept experts"
    entropy.backward()
    for layer in range(access.num_layers):
        router = router_of(access, layer)
        weight = router.classifier.weight if name == "switch" else router.weight
        assert weight.grad is not None and torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
        assert (weight.grad[~keep[layer]] == 0).all(), "removed experts' logits get no gradient"


# --- DeepSeek-V3's group limit under a mask -------------------------------------------------------

def v3_reference(logits, keep, top_k, bias, n_group, topk_group, norm, scaling):
    """Token by token, as the rule is stated: sigmoid scores s, biased b = s + bias; a group's
    score is the sum of its (at most) two best kept b; groups without a kept expert are out;
    the topk_group best groups (more, in order of score, until they hold top_k kept
    experts); the top_k kept experts of those by b; weights s, renormalised, scaled."""
    num_experts = logits.shape[-1]
    size = num_experts // n_group
    rows = []
    for row in logits:
        s = torch.sigmoid(row)
        b = s + bias
        scores = {}
        for g in range(n_group):
            kept = sorted((float(b[e]) for e in range(g * size, (g + 1) * size) if keep[e]), reverse=True)
            if kept:
                scores[g] = sum(kept[:2])
        ranked = sorted(scores, key=lambda g: -scores[g])
        chosen = ranked[:topk_group]
        while sum(int(keep[g * size:(g + 1) * size].sum()) for g in chosen) < top_k:
            chosen = ranked[:len(chosen) + 1]
        candidates = [e for g in chosen for e in range(g * size, (g + 1) * size) if keep[e]]
        picked = sorted(candidates, key=lambda e: -float(b[e]))[:top_k]
        w = s[picked]
        if norm:
            w = w / w.sum()
        rows.append(dict(zip(picked, (w * scaling).tolist())))
    return rows


def as_rows(weights, indices):
    return [dict(zip(i.tolist(), w.tolist())) for w, i in zip(weights, indices)]


def assert_same_rows(rows, expected):
    assert len(rows) == len(expected)
    for row, ref in zip(rows, expected):
        assert set(row) == set(ref)
        for e in row:
            assert row[e] == pytest.approx(ref[e], rel=1e-5)


V3_MASKS = {
    "random-half": [1, 0, 0, 1, 1, 0, 1, 0],
    "one-per-group": [1, 0, 0, 1, 0, 1, 1, 0],
    "two-groups-gone": [1, 1, 0, 0, 0, 0, 1, 0],
    "all": [1] * 8,
}


@pytest.mark.parametrize("mask", list(V3_MASKS))
@pytest.mark.parametrize("top_k", [1, 2, 3, 8])
def test_deepseek_v3_group_limited_rule_matches_a_reference(mask, top_k):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 8, generator=g) * 2
    bias = torch.randn(8, generator=g) * 0.3
    keep = torch.tensor(V3_MASKS[mask], dtype=torch.bool)
    k = min(top_k, int(keep.sum()))
    weights, indices = deepseek_v3_routing(logits, keep, k, bias, 4, 2, True, 2.5)
    assert indices.shape == (64, k) and keep[indices].all()
    assert_same_rows(as_rows(weights, indices), v3_reference(logits, keep, k, bias, 4, 2, True, 2.5))


def test_deepseek_v3_in_the_model_routes_as_the_reference():
    model = build("deepseek_v3")
    access = make_access(model)
    keep = torch.tensor([V3_MASKS["one-per-group"], V3_MASKS["two-groups-gone"]], dtype=torch.bool)
    for top_k in (None, 3):
        with access.routing_override(keep, top_k) as capture:
            forward(model, "deepseek_v3")
            dispatch = access.dispatch()
        for layer in range(access.num_layers):
            router = router_of(access, layer)
            logits = capture.logits[layer].detach().reshape(-1, 8)
            k = min(top_k or 2, int(keep[layer].sum()))
            expected = v3_reference(logits, keep[layer], k, router.e_score_correction_bias, 4, 2, True, 2.5)
            got = [set(row.nonzero().flatten().tolist()) for row in dispatch[:, :, layer].reshape(-1, 8)]
            assert got == [set(row) for row in expected]


# --- routed_output_scale ----------------------------------------------------------------------------

def shared_part(block, x: torch.Tensor) -> torch.Tensor | None:
    """The block's shared-expert contribution (None: the family has no shared expert)."""
    if hasattr(block, "shared_expert"):  # Qwen2-MoE: gated shared expert
        flat = x.reshape(-1, x.shape[-1])
        return (torch.sigmoid(block.shared_expert_gate(flat)) * block.shared_expert(flat)).reshape(x.shape)
    if hasattr(block, "shared_experts"):  # DeepSeek-V2/V3
        return block.shared_experts(x)
    return None


@pytest.mark.parametrize("name", ALL)
def test_routed_output_scale_scales_only_the_routed_experts(name):
    model = build(name)
    access = make_access(model)
    block = model.get_submodule(access.layer_names[0])  # the first MoE layer: its input never changes
    experts = access.routed_experts_modules()[0] if name != "switch" else \
        model.get_submodule(access.blocks[0].experts_name)
    seen = {}
    handles = [block.register_forward_hook(lambda m, a, out: seen.update(x=a[0], block=out)),
               experts.register_forward_hook(lambda m, a, out: seen.update(routed=out))]

    def run(scales=None):
        if scales is None:
            return forward(model, name), dict(seen)
        with access.routed_output_scale(scales):
            return forward(model, name), dict(seen)

    with torch.no_grad():
        own, base = run()
        _, doubled = run(torch.full((access.num_layers,), 2.0))
        _, zero = run(torch.zeros(access.num_layers))
        after, _ = run()
    routed = base["routed"].reshape(base["block"].shape)
    torch.testing.assert_close(doubled["block"], base["block"] + routed)
    shared = shared_part(block, base["x"])
    if shared is None:
        torch.testing.assert_close(doubled["block"], 2 * base["block"])
        assert (zero["block"] == 0).all()
    else:
        assert name in ("qwen2_moe", "deepseek_v2", "deepseek_v3")
        torch.testing.assert_close(zero["block"], shared, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(doubled["block"], 2 * base["block"])
    assert torch.equal(after, own), "the hooks are gone after the context"
    scales = torch.full((access.num_layers,), 2.0, requires_grad=True)
    with access.routed_output_scale(scales):
        forward(model, name).square().mean().backward()
    assert scales.grad is not None and torch.isfinite(scales.grad).all() and (scales.grad != 0).all()
    for handle in handles:
        handle.remove()
    with pytest.raises(ValueError, match="scales must be Tensor"):
        with access.routed_output_scale(torch.ones(access.num_layers + 1)):
            pass


# --- LoRA ---------------------------------------------------------------------------------------------

def test_override_and_scale_work_on_a_lora_wrapped_model():
    config = tiny_config(FAMILIES["qwen2_moe"])
    config.num_labels = 3
    torch.manual_seed(0)
    model = apply_lora(transformers.AutoModelForSequenceClassification.from_config(config), 2, 4.0, seed=0).eval()
    access = make_access(model)
    assert isinstance(access, LoraMoEAccess)
    with torch.no_grad():  # non-zero adapters: the wrapped experts matter
        for key in access.packed_adapters:
            model.get_parameter(key).normal_(0.0, 0.3)
    ids, attention = inputs()
    own = model(input_ids=ids, attention_mask=attention).logits
    keep = random_mask(access, keep=2, seed=5)
    scales = torch.full((access.num_layers,), 1.5, requires_grad=True)
    with access.routing_override(keep, top_k=1) as capture, access.routed_output_scale(scales):
        logits = model(input_ids=ids, attention_mask=attention).logits
        dispatch, probs = access.dispatch(), access.router_probs()
        (logits.square().mean() + capture.entropy(attention)).backward()
    assert (dispatch.sum(dim=-1) == 1).all() and not dispatch[..., ~keep].any() and (probs[..., ~keep] == 0).all()
    assert scales.grad is not None and (scales.grad != 0).all()
    for layer in range(access.num_layers):
        assert router_of(access, layer).weight.grad.abs().sum() > 0
    wrappers = access.routed_experts_modules()
    assert all(type(w).__name__ == "ParamWrapper" for w in wrappers)
    assert torch.equal(model(input_ids=ids, attention_mask=attention).logits, own)


# --- FedMoE and SEER-MoE rounds on fused layouts -------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("override")
    data = write_data(root / "data.csv", per_class=6)
    return {name: save_family(name, root / name, tokenizer) for name in ("mixtral", "deepseek_v3")}, data


@pytest.mark.parametrize("method", ["fedmoe", "seer-moe"])
@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_masking_methods_run_two_rounds_on_a_fused_model(method, name, checkpoints):
    models, data = checkpoints
    cfg = RunConfig(model=str(models[name]), dataset=str(data), text_column="body", label_column="topic",
                    method=method, clients=2, rounds=2, local_steps=2, batch_size=4, max_length=16, alpha=5.0,
                    test_fraction=0.25).validate()
    profiling.clear_profile_cache()
    access = make_access(build_model(cfg, pretrained=True))
    assert isinstance(access, FusedMoEAccess)
    L, S = access.num_layers, access.num_experts
    budget = L * S // 2  # a constrained client
    client = load_client_data(cfg, 0)
    state = access.state_dict()
    groups = access.param_groups()
    subsets = []
    for server_round in (1, 2):
        if server_round == 2:
            profiling.clear_profile_cache()  # round 2 rebuilds the initial model's profile
        reply = client_round(cfg, access, client, state, budget, server_round)
        assert reply.failure is None
        ctx = ClientContext(access=access, data=client, expert_budget=budget, server_round=server_round,
                            local_steps=cfg.local_steps, seed=cfg.seed, select_by=cfg.select_by,
                            run_key=cfg.to_json(), build_initial_model=lambda: build_model(cfg, pretrained=True))
        subset = get_method(method).plan_round(ctx).subset
        subsets.append(subset)
        assert (~subset).any(), "the constrained client's sub-model leaves experts out"
        result = reply.result
        assert not (result.trained & ~subset).any(), "a removed expert was trained"
        assert (result.usage[~subset] == 0).all() and (result.selection_counts[~subset] == 0).all()
        uploaded = {groups.expert_of[k] for k in reply.tensors if k in groups.expert_of}
        assert uploaded and all(bool(subset[le]) for le in uploaded), "a removed expert was uploaded"
        assert set(groups.dense) | set(groups.routers) <= set(reply.tensors) <= set(state)
        assert all(torch.isfinite(v).all() for v in reply.tensors.values() if v.is_floating_point())
        assert torch.isfinite(torch.tensor(reply.metrics["train-loss"]))
        now = access.state_dict()
        for le in map(tuple, (~subset).nonzero().tolist()):  # never trained: bit for bit the global copy
            assert all(torch.equal(now[k], state[k]) for k in groups.experts[le]), le
        assert any(not torch.equal(reply.tensors[k], state[k]) for k in reply.tensors if k in groups.expert_of)
        state = {**state, **reply.tensors}  # the next round's global model (this client alone)
    assert torch.equal(subsets[0], subsets[1]), "the sub-model stays fixed for the run"


# --- refusals ---------------------------------------------------------------------------------------

def test_a_router_the_rule_does_not_reproduce_is_refused():
    """Rules are picked by router structure and checked on the first forward: a Mixtral
    router that (wrongly) claims norm_topk_prob=False gets the Qwen rule, which does not
    renormalise, and the override refuses it instead of routing differently."""
    model = build("mixtral")
    access = make_access(model)
    router_of(access, 0).norm_topk_prob = False
    with access.routing_override():
        forward(model, "mixtral")  # nothing to recompute: no check, no refusal
    with pytest.raises(RuntimeError, match="softmax_topk routing rule does not reproduce"):
        with access.routing_override(top_k=1):
            forward(model, "mixtral")


@pytest.mark.parametrize("name", ["mixtral", "switch"])
def test_bad_masks_and_top_k_are_refused(name):
    access = make_access(build(name))
    L, S = access.num_layers, access.num_experts
    with pytest.raises(ValueError, match="BoolTensor"):
        with access.routing_override(torch.ones(L, S + 1, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match="removes every expert"):
        with access.routing_override(torch.zeros(L, S, dtype=torch.bool)):
            pass
    with pytest.raises(ValueError, match="top_k=0"):
        with access.routing_override(top_k=0):
            pass
