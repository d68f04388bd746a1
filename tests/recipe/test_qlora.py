"""--load-in-4bit (QLoRA): NF4 base weights through bitsandbytes, LoRA adapters on top.

On a machine without CUDA the flag is one clear ConfigError; these tests set
HFEDMOE_ALLOW_CPU_4BIT=1 (hfedmoe.recipe.device.ALLOW_CPU_4BIT_ENV) to run the real path
on bitsandbytes' CPU backend (the `qlora` extra, part of the `test` extra). A tiny Mixtral
checkpoint on disk, one federated round in-process: the attention projections are
bitsandbytes Linear4bit layers, the fused experts, routers and head are not quantized, only
adapters, routers and head travel (no 4-bit weight and no quantization state), the base stays
as loaded, and every party builds the same quantized model.
"""

from __future__ import annotations

import sys

import pytest
import torch

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.moe import make_access
from hfedmoe.moe.lora import LoraMoEAccess
from hfedmoe.moe.state_keys import HEAD_NAMES, split_expert_key
from hfedmoe.recipe import build_model, moe_shape
from hfedmoe.recipe.device import ALLOW_CPU_4BIT_ENV

from builders import FAMILIES, inputs, one_round_parties, save_family, write_data

QUANT_STATE = ("absmax", "quant_map", "quant_state", "nested_")  # what bitsandbytes adds to a state_dict


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cpu_4bit(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setenv(ALLOW_CPU_4BIT_ENV, "1")
    return bnb


def qlora_config(tmp_path, tokenizer, name: str = "mixtral", hidden_size: int = 32, **kw) -> RunConfig:
    model_dir = save_family(name, tmp_path / name, tokenizer, hidden_size=hidden_size)
    fields = dict(model=str(model_dir), dataset=str(write_data(tmp_path / "d.csv")), text_column="body",
                  label_column="topic", clients=2, rounds=1, local_steps=2, batch_size=4, max_length=16, alpha=5.0,
                  test_fraction=0.25, lr=1e-3, expert_budgets=[2, 2], lora_rank=4, load_in_4bit=True,
                  dtype="bfloat16")
    return RunConfig(**{**fields, **kw}).validate()


def frozen_state(model: torch.nn.Module, access: LoraMoEAccess) -> dict[str, torch.Tensor]:
    """Everything in the model's state_dict that is not on the wire: the (4-bit) base
    weights and bitsandbytes' quantization state."""
    wire = {split_expert_key(k)[0] if split_expert_key(k) else k for k in access.state_dict()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in wire}


def quantized_names(model: torch.nn.Module, bnb) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


# --- one federated round -------------------------------------------------------------------------

@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_a_qlora_federated_round(checkpointing, cpu_4bit, tmp_path, tokenizer):
    bnb = cpu_4bit
    cfg = qlora_config(tmp_path, tokenizer, gradient_checkpointing=checkpointing)
    pristine_model = build_model(cfg, pretrained=True)
    pristine = frozen_state(pristine_model, make_access(pristine_model))
    server, client, old, replies, new = one_round_parties(cfg)
    assert isinstance(server, LoraMoEAccess) and isinstance(client, LoraMoEAccess)

    # the attention projections are NF4 Linear4bit layers (with LoRA around them)
    for access in (server, client):
        quantized = quantized_names(access.model, bnb)
        for layer in range(2):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                assert f"model.model.layers.{layer}.self_attn.{proj}.base_layer" in quantized
        assert all(m.weight.quant_state.quant_type == "nf4" for m in access.model.modules()
                   if isinstance(m, bnb.nn.Linear4bit))

    # only adapters, routers and head are on the wire: no 4-bit weight, no quantization state
    groups = server.param_groups()
    assert set(old) == set(groups.all_expert_keys) | set(groups.routers) | set(groups.dense)
    for key in set(old).union(*(reply.tensors for reply in replies)):
        assert ".lora_" in key or key in groups.routers or key == "model.score.weight", key
        assert not any(q in key for q in QUANT_STATE), key
        assert old[key].is_floating_point(), key  # never uint8 4-bit storage
    assert set(pristine) and not set(pristine) & set(old)
    assert any(any(q in k for q in QUANT_STATE) for k in pristine)  # the quantization state exists, stays home

    # adapters moved; the base (4-bit weights and their quantization state) did not, anywhere
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert any(".__expert__." in k for k in changed), "no expert adapter moved"
    assert any("self_attn" in k and ".lora_" in k for k in changed), "no attention adapter moved"
    assert "model.score.weight" in changed
    for access in (server, client):
        now = frozen_state(access.model, access)
        assert now.keys() == pristine.keys()
        assert all(torch.equal(now[k], pristine[k]) for k in pristine)

    # every party builds the same quantized base: the same state gives the same outputs
    other = make_access(build_model(cfg, pretrained=False))
    ids, mask = inputs()
    outputs = []
    for access in (server, client, other):
        access.load_state_dict(new, strict=True)
        access.model.eval()
        with torch.no_grad():
            outputs.append(access.model(ids, mask))
    assert outputs[0].dtype == torch.bfloat16
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    if checkpointing:
        assert any(getattr(m, "gradient_checkpointing", False) for m in client.model.modules())


def test_an_evaluation_does_not_stop_the_next_training_step(cpu_4bit, tmp_path, tokenizer):
    """bitsandbytes' CPU backend would repack the 4-bit weights for inference at the first
    evaluation and then back-propagate nothing through them (see
    hfedmoe.recipe.models._keep_4bit_training_layout): the gradients after an evaluation
    must be those before it, down to the first layer's adapters. (Width 64: the repacking
    needs in_features to be a multiple of its block, else the evaluation itself fails.)"""
    cfg = qlora_config(tmp_path, tokenizer, hidden_size=64)
    model = build_model(cfg, pretrained=True)
    with torch.no_grad():  # non-zero lora_B, so that gradients pass through the adapters
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0.0, 0.1)
    ids, mask = inputs()

    def grads():
        model.train()
        model.zero_grad(set_to_none=True)
        model(ids, mask).float().square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    model.eval()
    with torch.no_grad():
        model(ids, mask)
    after = grads()
    first = [n for n in before if ".layers.0.self_attn." in n and ".lora_A." in n]
    assert first and all(before[n].abs().sum() > 0 for n in first)
    for name, grad in before.items():
        assert torch.equal(after[name], grad), name


# --- what is quantized ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_routers_heads_and_experts_are_not_quantized(name, cpu_4bit, tmp_path, tokenizer):
    """bitsandbytes replaces nn.Linear layers only, minus _quantization's skip list: the
    heads (``score``, ``lm_head``: OLMoE classifies with the LM head's label words) and
    gates (Qwen2-MoE's ``shared_expert_gate`` is an nn.Linear) stay exact; the routers of
    transformers 5.x are no nn.Linear; the fused experts are 3-D tensors in the run's dtype."""
    bnb = cpu_4bit
    cfg = qlora_config(tmp_path, tokenizer, name)
    model = build_model(cfg, pretrained=True)
    access = make_access(model)
    quantized = quantized_names(model, bnb)
    assert quantized
    plain_linear = {n for n, m in model.named_modules()
                    if type(m) is torch.nn.Linear and ".lora_A." not in n and ".lora_B." not in n}
    heads = {*HEAD_NAMES, "lm_head"}
    for n in quantized:  # never a head or a gate
        leaf = n.removesuffix(".base_layer").rpartition(".")[2]
        assert leaf not in heads and not leaf.endswith("gate"), n
    for n in plain_linear:  # what stays an nn.Linear is a head or a gate
        leaf = n.rpartition(".")[2]
        assert leaf in heads or leaf.endswith("gate"), n
    if name == "qwen2_moe":  # the shared expert's projections are quantized, its gate is not
        assert {"model.model.layers.1.mlp.shared_expert.gate_proj", "model.model.layers.1.mlp.shared_expert.down_proj",
                "model.model.layers.0.mlp.gate_proj"} <= quantized
        assert "model.model.layers.1.mlp.shared_expert_gate" in plain_linear
    if name == "olmoe":
        assert "model.lm_head" in plain_linear
    for block in access.blocks:
        router = model.get_submodule(block.router_name)
        # (DeepSeek-V3 keeps its router in float32 whatever the dtype: transformers' choice)
        assert not isinstance(router, bnb.nn.Linear4bit) and router.weight.is_floating_point()
    bases = [m for n, m in model.named_modules() if n.endswith(".experts.base_layer.base_layer")]
    assert len(bases) == access.num_layers
    for module in bases:  # fused experts: not quantized, loaded in the run's dtype
        for param in module.parameters(recurse=False):
            assert type(param) is torch.nn.Parameter and param.dim() == 3 and param.dtype == torch.bfloat16
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.isfinite(model(ids, mask).float()).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_compute_dtype_and_the_unquantized_dtype_are_the_runs(dtype, cpu_4bit, tmp_path, tokenizer):
    bnb = cpu_4bit
    cfg = qlora_config(tmp_path, tokenizer, dtype=str(dtype).removeprefix("torch."))
    model = build_model(cfg, pretrained=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.compute_dtype == dtype and m.weight.quant_state.quant_type == "nf4" for m in layers)
    experts = [p for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    assert len(experts) == 4 and all(p.dtype == dtype for p in experts)
    assert model.model.model.embed_tokens.weight.dtype == dtype


# --- errors ----------------------------------------------------------------------------------------

def test_without_a_gpu_the_flag_is_one_clear_error(monkeypatch, tmp_path, tokenizer, capsys):
    from hfedmoe.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv(ALLOW_CPU_4BIT_ENV, raising=False)
    cfg = qlora_config(tmp_path, tokenizer)
    match = r"--load-in-4bit .*needs a CUDA GPU.*runs on cpu: drop --load-in-4bit"
    with pytest.raises(ConfigError, match=match):
        build_model(cfg, pretrained=False)
    with pytest.raises(ConfigError, match=match):
        moe_shape(cfg)  # what the CLI checks before any process starts
    argv = ["run", "--model", cfg.model, "--dataset", cfg.dataset, "--text-column", "body", "--label-column",
            "topic", "--lora-rank", "4", "--load-in-4bit", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error") == 1 and "needs a CUDA GPU" in err
    assert not (tmp_path / "run").exists()


def test_without_bitsandbytes_the_error_names_the_install(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setenv(ALLOW_CPU_4BIT_ENV, "1")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what an absent package looks like to import
    cfg = qlora_config(tmp_path, tokenizer)
    with pytest.raises(ConfigError, match=r"needs bitsandbytes: pip install 'hfedmoe\[qlora\]'"):
        moe_shape(cfg)
    with pytest.raises(ConfigError, match="pip install"):
        build_model(cfg, pretrained=False)


@pytest.mark.parametrize("fields, match", [
    (dict(model="/x", load_in_4bit=True), "also pass --lora-rank"),
    (dict(load_in_4bit=True), "embedded .* drop --load-in-4bit"),
])
def test_flags_that_cannot_go_with_4bit(fields, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**fields).validate()


def test_the_flag_parses_from_the_command_line():
    from hfedmoe.cli import build_parser, run_config_from

    args = build_parser().parse_args(["run", "--model", "/x", "--lora-rank", "8", "--load-in-4bit"])
    cfg = run_config_from(args)
    assert cfg.load_in_4bit is True and cfg.lora_rank == 8
