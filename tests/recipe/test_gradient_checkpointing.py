"""--gradient-checkpointing (hfedmoe.recipe.models.enable_gradient_checkpointing) with the
deferred expert backward, LoRA and a federated round.

With checkpointing, every decoder (or encoder) layer runs its forward a second time inside
the backward: the routing hooks fire again and the deferred experts' forward runs again,
after the loop has set the batch's selection. One local step with and without it must then
give the same gradients on every parameter and the same selection, for a constrained
budget (deferred backward) and a full one (plain autograd), on fused-expert families and on
the upcycled BERT (whose backbone is a transformers BertModel).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers
from transformers.modeling_layers import GradientCheckpointingLayer

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.models.hf_wrappers import HFCausalLM
from hfedmoe.moe import fused_deferred, make_access
from hfedmoe.moe.lora import apply_lora
from hfedmoe.recipe import build_model
from hfedmoe.recipe.models import enable_gradient_checkpointing
from hfedmoe.training import LocalTrainConfig, train_local

from builders import (
    FAMILIES,
    LABELS,
    VOCAB,
    L,
    S,
    inputs,
    one_round,
    save_family,
    sharp_causal_lm,
    tiny_config,
    tiny_moe,
    write_data,
)

FUSED = ["mixtral", "qwen2_moe", "deepseek_v3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_causal_lm(name: str) -> HFCausalLM:
    return HFCausalLM(sharp_causal_lm(name))


def lm_batches(steps: int):
    ids, mask = inputs()
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        ids = torch.randint(3, 100, ids.shape, generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def class_batches(steps: int, b: int = 6, t: int = 10):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (b, t), generator=g)
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask,
                    "labels": torch.randint(0, LABELS, (b,), generator=g)})
    return out


def checkpointed_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
               for m in model.modules())


def run_steps(model, batches, budget: int, task: str, checkpointing: bool, moe_modules):
    """train_local on a copy of ``model``; per step: every parameter's gradient right after
    the backward, the selection, the routing recorded by the forward and after the backward;
    and how many times each MoE module's forward started."""
    model = copy.deepcopy(model)
    if checkpointing:
        enable_gradient_checkpointing(RunConfig(), model)
        assert checkpointed_layers(model) > 0
    access = make_access(model)
    calls = [0]
    for module in moe_modules(model, access):
        module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    steps = []

    def on_phase(phase, step, batch, selected):
        if phase == "select":
            steps.append({"selected": selected.clone(), "probs": access.router_probs().clone()})
        elif phase == "backward":
            steps[-1]["grads"] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
            steps[-1]["probs_after"] = access.router_probs().clone()
            steps[-1]["calls"] = calls[0]

    torch.manual_seed(0)  # dropout (the upcycled BERT): the same in both runs
    cfg = LocalTrainConfig(local_steps=len(batches), lr=1e-2, task=task)
    result = train_local(model, iter(batches), budget, cfg, on_phase=on_phase)
    return steps, result, model


def assert_same_steps(plain, checkpointed, layers: int):
    for step, (a, b) in enumerate(zip(plain, checkpointed)):
        assert torch.equal(a["selected"], b["selected"]), step
        assert torch.equal(a["probs"], b["probs"]), step
        # the recomputed forward recorded the routing again, and recorded the same routing
        assert torch.equal(b["probs_after"], b["probs"]), step
        assert a["grads"].keys() == b["grads"].keys()
        with_grad = 0
        for name, grad in a["grads"].items():
            other = b["grads"][name]
            assert (grad is None) == (other is None), (step, name)
            if grad is not None:
                torch.testing.assert_close(other, grad, rtol=1e-5, atol=1e-7, msg=f"step {step}: {name}")
                with_grad += 1
        assert with_grad > 0
    # every MoE module's forward ran once per step without checkpointing, twice with it
    assert [s["calls"] for s in plain] == [layers * (i + 1) for i in range(len(plain))]
    assert [s["calls"] for s in checkpointed] == [2 * layers * (i + 1) for i in range(len(plain))]


def fused_experts(model, access):
    return access.experts_modules()


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("constrained", [True, False], ids=["deferred", "full-budget"])
def test_checkpointing_gives_the_same_gradients_and_selection_fused(name, constrained, monkeypatch):
    model = tiny_causal_lm(name)
    access = make_access(model)
    budget = access.num_layers if constrained else access.num_layers * access.num_experts
    deferred_calls = []
    original = fused_deferred.DeferredFusedExperts.apply
    monkeypatch.setattr(fused_deferred.DeferredFusedExperts, "apply",
                        lambda *args: deferred_calls.append(1) or original(*args))
    batches = lm_batches(2)
    plain, _, _ = run_steps(model, batches, budget, "causal-lm", False, fused_experts)
    assert bool(deferred_calls) == constrained  # the deferred backward is what the budget chose
    checkpointed, result, trained = run_steps(model, batches, budget, "causal-lm", True, fused_experts)
    assert_same_steps(plain, checkpointed, access.num_layers)
    if constrained:  # one expert per layer and step: others untouched, through the recomputed forward too
        assert result.experts_trained_mean == access.num_layers
        assert int(plain[0]["selected"].sum()) == access.num_layers
    assert not any(fused_deferred.installed(m) for m in make_access(trained).experts_modules())


def moe_blocks(model, access):
    return access.layers


@pytest.mark.parametrize("constrained", [True, False], ids=["deferred", "full-budget"])
def test_checkpointing_gives_the_same_gradients_and_selection_upcycled_bert(constrained):
    """The upcycled encoder: its MoE block's forward runs again in the backward, after the
    selection was set (it used to clear the selection there, failing the backward)."""
    model = tiny_moe(sharp_router=True).train()
    budget = L if constrained else L * S
    batches = class_batches(2)
    plain, _, _ = run_steps(model, batches, budget, "classification", False, moe_blocks)
    checkpointed, _, trained = run_steps(model, batches, budget, "classification", True, moe_blocks)
    assert_same_steps(plain, checkpointed, L)
    access = make_access(trained)
    assert not any(layer.deferred_backward or layer.selected is not None for layer in access.layers)


def test_reentrant_checkpointing_would_refuse_the_loops_backward():
    """Why enable_gradient_checkpointing asks for non-reentrant: the loop back-propagates with
    backward(inputs=<the selected experts' tensors>), which reentrant checkpointing refuses
    (the tests above run that very backward through enable_gradient_checkpointing)."""
    model = tiny_causal_lm("mixtral").train()
    model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    ids, mask = inputs()
    loss = model(ids, mask).square().mean()
    with pytest.raises(RuntimeError, match="inputs"):
        loss.backward(inputs=[p for p in model.parameters() if p.requires_grad])


def test_checkpointing_is_refused_where_unsupported():
    model = tiny_causal_lm("mixtral")
    enable_gradient_checkpointing(RunConfig(), model)
    assert checkpointed_layers(model) == 2
    assert model.model.config.use_cache is False  # training never uses the KV cache
    with pytest.raises(ConfigError, match="does not support transformers' gradient checkpointing: drop the flag"):
        enable_gradient_checkpointing(RunConfig(model="/x"), torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --- LoRA -------------------------------------------------------------------------------------

def lora_grads(checkpointing: bool, input_grads: bool = True) -> dict[str, torch.Tensor | None]:
    config = tiny_config(FAMILIES["mixtral"])
    config.num_labels = 3
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    apply_lora(model, 2, 4.0, seed=0)
    with torch.no_grad():  # non-zero lora_B, so that lora_A gets gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    if checkpointing:
        enable_gradient_checkpointing(RunConfig(), model)
        if not input_grads:
            model.disable_input_require_grads()
    access = make_access(model)
    model.train()
    ids, mask = inputs()
    loss = model(input_ids=ids, attention_mask=mask).logits.square().mean()
    everything = torch.ones(access.num_layers, access.num_experts, dtype=torch.bool)
    loss.backward(inputs=access.trainable_parameters(everything))
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_lora_adapters_get_their_gradients_with_checkpointing():
    """Frozen base + checkpointing: non-reentrant needs no input embeddings requiring grad
    (transformers switches that on anyway; it is switched off here to show it)."""
    plain = lora_grads(False)
    adapters = [n for n in plain if ".lora_" in n]
    assert any(".experts." in n for n in adapters) and any("q_proj" in n for n in adapters)
    for kwargs in ({}, {"input_grads": False}):
        checkpointed = lora_grads(True, **kwargs)
        assert checkpointed.keys() == plain.keys()
        for name, grad in plain.items():
            assert grad is not None and checkpointed[name] is not None, name
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
        assert all(checkpointed[n].abs().sum() > 0 for n in adapters if ".lora_B." in n)


# --- a federated round --------------------------------------------------------------------------

def rounds_agree(cfg: RunConfig) -> list[dict]:
    """One round with and without --gradient-checkpointing: the same new global state."""
    # (the embedded model's access hands out its live tensors: copy the initial state)
    initial = {k: v.clone() for k, v in make_access(build_model(cfg, pretrained=True)).state_dict().items()}
    _, metrics, new = one_round(cfg)
    _, metrics_ck, new_ck = one_round(dataclasses.replace(cfg, gradient_checkpointing=True).validate())
    assert new.keys() == new_ck.keys() == initial.keys()
    for key in new:
        torch.testing.assert_close(new_ck[key], new[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any(not torch.equal(initial[k], new_ck[k]) for k in initial), "the round trained nothing"
    for m, m_ck in zip(metrics, metrics_ck):
        assert m["experts-trained-mean"] == m_ck["experts-trained-mean"]
        assert m["train-loss"] == pytest.approx(m_ck["train-loss"], rel=1e-5)
    return metrics_ck


@pytest.mark.parametrize("lora_rank", [0, 2], ids=["full", "lora"])
def test_a_federated_round_with_checkpointing_hf(lora_rank, tmp_path, tokenizer):
    model_dir = save_family("mixtral", tmp_path / "mixtral", tokenizer)
    cfg = RunConfig(model=str(model_dir), dataset=str(write_data(tmp_path / "d.csv")), text_column="body",
                    label_column="topic", clients=2, rounds=1, local_steps=2, batch_size=4, max_length=16,
                    alpha=5.0, test_fraction=0.25, lr=1e-3, lora_rank=lora_rank,
                    expert_budgets=[8, 2]).validate()  # client 1: one expert per layer (deferred when full)
    assert checkpointed_layers(build_model(dataclasses.replace(cfg, gradient_checkpointing=True),
                                           pretrained=False)) == 2
    metrics = rounds_agree(cfg)
    assert [m["expert-budget"] for m in metrics] == [8, 2]


def test_a_federated_round_with_checkpointing_embedded_model():
    cfg = RunConfig(clients=2, rounds=1, local_steps=2, batch_size=4, max_length=24, num_experts=4,
                    expert_budgets=[24, 6], lr=1e-3).validate()  # MiniLM: 6 layers x 4 experts
    model = build_model(dataclasses.replace(cfg, gradient_checkpointing=True), pretrained=False)
    assert checkpointed_layers(model) == 6
    rounds_agree(cfg)
