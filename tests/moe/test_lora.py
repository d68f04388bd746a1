"""LoRA on experts (hfedmoe.moe.lora): PEFT adapters on fused expert tensors, per expert.

Offline and tiny: random configs of the families in tests/builders.py, saved with
save_pretrained where a checkpoint is needed. The packing of PEFT's per-expert
adapters is checked three independent ways: against PEFT's own get_delta_weight,
against the forward pass (experts without tokens get no adapter gradient), and by
training one expert and checking that exactly its slices moved.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.moe import make_access
from hfedmoe.moe.lora import LoraMoEAccess, LoraTargetError, apply_lora, attention_projections
from hfedmoe.moe.state_keys import split_expert_key
from hfedmoe.recipe import build_model

from builders import FAMILIES, one_round_replies, save_family, tiny_config, write_data

RANK = 2


def lora_model(name: str, seed: int = 0, rank: int = RANK, targets=None) -> torch.nn.Module:
    config = tiny_config(FAMILIES[name])
    config.num_labels = 3
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    return apply_lora(model, rank, 2.0 * rank, targets, seed=seed)


def wrapper_of(model, packed_key: str):
    """The PEFT ParamWrapper owning a packed factor ``<path>.lora_X.default.weight``."""
    return model.get_submodule(packed_key.rsplit(".lora_", 1)[0])


def slices(access: LoraMoEAccess) -> dict[tuple[int, int], list[torch.Tensor]]:
    """Every expert's adapter slices, read through the access layer's state."""
    state = access.state_dict()
    return {le: [state[k] for k in keys] for le, keys in access.param_groups().experts.items()}


def base_weights(access: LoraMoEAccess) -> dict[str, torch.Tensor]:
    params = dict(access.model.named_parameters())
    return {n: params[n].detach().clone() for n in access.base_parameter_names()}


# --- 1. the packing -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_expert_slices_are_the_experts_of_peft_delta_weight(name):
    """Writing expert e's slices (our mapping) changes PEFT's delta weight of expert e only."""
    model = lora_model(name)
    access = make_access(model)
    assert isinstance(access, LoraMoEAccess)
    keys = access.param_groups().experts[(0, 1)]
    assert len(keys) == 4  # lora_A and lora_B of gate_up_proj and of down_proj
    state = access.state_dict()
    generator = torch.Generator().manual_seed(0)
    access.load_state_dict({k: torch.randn(state[k].shape, generator=generator) for k in keys}, strict=False)
    for key in {split_expert_key(k)[0] for k in keys if ".lora_B." in k}:
        delta = wrapper_of(model, key).get_delta_weight("default")  # [E, ...], PEFT's own unpacking
        assert delta.shape[0] == access.num_experts
        assert delta[1].abs().sum() > 0, key
        others = [e for e in range(access.num_experts) if e != 1]
        assert torch.equal(delta[others], torch.zeros_like(delta[others])), key


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_experts_without_tokens_get_no_adapter_gradient(name):
    """Through the real forward: one token reaches top-k experts per layer; only their slices get gradient."""
    model = lora_model(name)
    access = make_access(model)
    with torch.no_grad():  # non-zero lora_B so that lora_A gets gradient too
        for key in access.packed_adapters:
            access.model.get_parameter(key).normal_()
    model(input_ids=torch.tensor([[7]])).logits.sum().backward()
    dispatched = access.dispatch()[0, 0]  # [L, S]
    assert int(dispatched.sum(dim=1).max()) < access.num_experts  # some experts got no token
    grads = {k: p.grad for k, p in access.model.named_parameters() if k in access.packed_adapters}
    for (layer, expert), keys in access.param_groups().experts.items():
        for key in keys:
            real, e = split_expert_key(key)
            packed = access.packed_adapters[real]
            grad = grads[real].index_select(packed.dim, packed.index([e]))
            assert bool(grad.abs().sum() > 0) == bool(dispatched[layer, expert]), (key, layer, expert)


# --- 2. training one expert -------------------------------------------------------------------

IDS = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(0))


def routed_expert(access, layer: int) -> int:
    """The highest-numbered expert of ``layer`` that IDS route tokens to."""
    access.model(input_ids=IDS)
    return int(access.dispatch()[:, :, layer].flatten(0, 1).any(dim=0).nonzero().max())


def train_steps(access, selection, steps=2, freeze=True):
    optimizer = torch.optim.AdamW(access.model.parameters(), lr=1e-2, weight_decay=0.1)
    ids = IDS
    for _ in range(steps):
        loss = access.model(input_ids=ids).logits.square().mean()
        params = access.trainable_parameters(selection)
        loss.backward(inputs=params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        guard = access.freeze_unselected(selection, optimizer) if freeze else torch.enable_grad()
        with guard:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for param in access.unselected_expert_parameters(selection):
            optimizer.state.pop(param, None)
    return optimizer


@pytest.mark.parametrize("name, layer", [("mixtral", 1), ("qwen2_moe", 0), ("qwen3_moe", 1), ("deepseek_v2", 1),
                                         ("deepseek_v3", 0)])  # OLMoE: no sequence-classification class
def test_training_one_expert_changes_exactly_its_slices(name, layer):
    model = lora_model(name)
    access = make_access(model)
    expert = routed_expert(access, layer)
    assert expert > 0  # not the first slice: a contiguous-vs-strided mix-up would show
    selection = torch.zeros(access.num_layers, access.num_experts, dtype=torch.bool)
    selection[layer, expert] = True
    before, base, state0 = slices(access), base_weights(access), access.state_dict()
    raw = {k: access.model.get_parameter(k).detach().clone() for k in access.packed_adapters}
    train_steps(access, selection)
    # Independently of our slice mapping, through PEFT's own unpacking (layer.py,
    # ParamWrapper.get_delta_weight): lora_A.reshape(E, r, in), lora_B.reshape(out, r, E).
    E = access.num_experts
    for key, old in raw.items():
        new = access.model.get_parameter(key).detach()
        if ".lora_A." in key:  # [E, r, in]
            old, new = old.reshape(E, RANK, -1), new.reshape(E, RANK, -1)
        else:  # [out, r, E] -> [E, out, r]
            old, new = (t.reshape(t.shape[0], RANK, E).permute(2, 0, 1) for t in (old, new))
        for e in range(E):
            trained = (access.packed_adapters[key].layer, e) == (layer, expert)
            assert torch.equal(old[e], new[e]) != trained, (key, e)
    after = slices(access)
    for le, tensors in before.items():
        for key, old, new in zip(access.param_groups().experts[le], tensors, after[le]):
            if le == (layer, expert):
                assert not torch.equal(old, new), key  # A and B of both tensors moved
            else:
                assert torch.equal(old, new), key  # bit-identical, weight decay included
    # Independently of our slice mapping: PEFT's own delta weight (lora_B starts at zero)
    # is non-zero for the trained expert only.
    for key in (k for k in access.packed_adapters if ".lora_B." in k):
        delta = wrapper_of(model, key).get_delta_weight("default")
        trained = access.packed_adapters[key].layer == layer
        assert bool(delta[expert].abs().sum() > 0) == trained, key
        others = [e for e in range(access.num_experts) if e != expert]
        assert torch.equal(delta[others], torch.zeros_like(delta[others])), key
    now = base_weights(access)
    assert all(torch.equal(base[n], now[n]) for n in base)  # base weights frozen
    state1 = access.state_dict()
    groups = access.param_groups()
    assert any(not torch.equal(state0[k], state1[k]) for k in groups.routers)
    assert any(not torch.equal(state0[k], state1[k]) for k in groups.dense if ".lora_B." in k)
    assert not torch.equal(state0["score.weight"], state1["score.weight"])


def test_without_the_freeze_other_experts_slices_move():
    """Control for the test above: the packed layout really needs the slice freeze."""
    access = make_access(lora_model("mixtral"))
    expert = routed_expert(access, 1)
    selection = torch.zeros(access.num_layers, access.num_experts, dtype=torch.bool)
    selection[1, expert] = True
    before = slices(access)
    train_steps(access, selection, freeze=False)
    after = slices(access)
    moved = [le for le in before if le != (1, expert) and not all(map(torch.equal, before[le], after[le]))]
    assert any(le[0] == 1 for le in moved)  # other experts of the same layer moved (weight decay on lora_A)
    assert not any(le[0] == 0 for le in moved)  # layer 0 had no gradient at all


def test_freeze_keeps_unselected_moments_and_gradient_mask_applies_before_clipping():
    access = make_access(lora_model("qwen2_moe"))
    everything = torch.ones(access.num_layers, access.num_experts, dtype=torch.bool)
    optimizer = train_steps(access, everything, steps=2)  # every expert gets momentum
    one = torch.zeros_like(everything)
    one[:, 1] = True
    key = next(k for k in access.packed_adapters if ".lora_B." in k)
    packed, param = access.packed_adapters[key], access.model.get_parameter(key)
    moments = {k: optimizer.state[param][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    access.model(input_ids=ids).logits.square().mean().backward(inputs=access.trainable_parameters(one))
    dropped = packed.index([0, 2, 3])
    assert torch.equal(param.grad.index_select(1, dropped), torch.zeros(param.shape[0], len(dropped)))
    assert param.grad.index_select(1, packed.index([1])).abs().sum() > 0
    with access.freeze_unselected(one, optimizer):
        optimizer.step()
    for name, old in moments.items():
        now = optimizer.state[param][name]
        assert torch.equal(now.index_select(1, dropped), old.index_select(1, dropped)), name
        assert not torch.equal(now.index_select(1, packed.index([1])), old.index_select(1, packed.index([1])))


# --- 3. state ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_state_holds_only_trainable_tensors_and_round_trips(name):
    access = make_access(lora_model(name, seed=0))
    state = access.state_dict()
    groups = access.param_groups()
    assert set(state) == set(groups.all_expert_keys) | set(groups.routers) | set(groups.dense)
    params = dict(access.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert {split_expert_key(k)[0] if split_expert_key(k) else k for k in state} == trainable
    base = set(access.base_parameter_names())
    assert base and not base & trainable
    assert not any(".base_layer." in k and ".lora_" not in k for k in state)
    assert all(".lora_" in k for k in groups.all_expert_keys)
    assert all(k.endswith(".gate.weight") for k in groups.routers)
    assert access.new_parameter_names() == {"score.weight"}  # the head gets the larger learning rate
    # a model built with another adapter seed differs, and loading the state makes it equal
    other = make_access(lora_model(name, seed=1))
    assert not all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="missing key"):
        other.load_state_dict({k: v for k, v in state.items() if k != groups.routers[0]}, strict=True)
    bad = next(k for k in groups.all_expert_keys if ".lora_B." in k)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict({bad: torch.zeros(3, 3)}, strict=False)


def test_dense_targets_default_to_the_attention_projections():
    config = tiny_config(FAMILIES["deepseek_v2"])
    config.num_labels = 3
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    assert attention_projections(model) == ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    model = lora_model("qwen2_moe", targets=["v_proj"])
    dense = make_access(model).param_groups().dense
    assert dense and all("v_proj.lora_" in k or k == "score.weight" for k in dense)
    with pytest.raises(LoraTargetError, match="choose from .*q_proj"):
        lora_model("mixtral", targets=["qkv"])


# --- 4. a federated round -------------------------------------------------------------------------

def one_round_with_uploads(cfg: RunConfig):
    """test_hf_models.one_round_replies, returning each client's upload."""
    server, state, replies, new = one_round_replies(cfg)
    return server, state, [reply.tensors for reply in replies], new


def nbytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"])
def test_one_federated_round_with_lora(name, tmp_path, tokenizer):
    model_dir = save_family(name, tmp_path / name, tokenizer)
    data = write_data(tmp_path / "data.csv")
    common = dict(model=str(model_dir), dataset=str(data), text_column="body", label_column="topic", clients=2,
                  rounds=1, local_steps=2, batch_size=4, max_length=16, alpha=5.0, test_fraction=0.25, lr=1e-3,
                  expert_budgets=[2, 2])  # one expert per layer and batch: some experts stay untrained
    cfg = RunConfig(**common, lora_rank=RANK).validate()
    server, old, uploads, new = one_round_with_uploads(cfg)
    assert isinstance(server, LoraMoEAccess)
    _, _, full_uploads, _ = one_round_with_uploads(RunConfig(**common).validate())
    lora_bytes, full_bytes = sum(map(nbytes, uploads)), sum(map(nbytes, full_uploads))
    print(f"{name}: uploaded bytes LoRA r={RANK} {lora_bytes} vs full fine-tuning {full_bytes}")
    assert lora_bytes * 5 < full_bytes  # mostly the frozen embedding table, which LoRA never sends
    groups = server.param_groups()
    per_expert = nbytes({k: old[k] for k in groups.experts[(0, 0)]})
    full = make_access(build_model(RunConfig(**common).validate(), pretrained=False))
    full_state = full.state_dict()
    full_per_expert = nbytes({k: full_state[k] for k in full.param_groups().experts[(0, 0)]})
    print(f"{name}: bytes per expert LoRA {per_expert} vs full {full_per_expert}")
    assert per_expert * 4 < full_per_expert
    # the aggregated model changed only in tensors some client uploaded
    uploaded = set().union(*uploads)
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed <= uploaded
    assert any(".__expert__." in k for k in changed), "no expert adapter moved"
    if name != "olmoe":  # OLMoE has no classification head: it classifies by label words
        assert "model.score.weight" in changed
    assert set(old) - uploaded, "every expert was uploaded: the check above proves nothing"
    # the server's base weights are still the checkpoint's
    pristine = make_access(build_model(cfg, pretrained=True))
    params, now = dict(pristine.model.named_parameters()), dict(server.model.named_parameters())
    assert all(torch.equal(params[n], now[n]) for n in server.base_parameter_names())
    # a client builds the very same model as the server (seeded adapters, head)
    client = make_access(build_model(cfg, pretrained=False))
    assert all(torch.equal(v, old[k]) for k, v in client.state_dict().items())
    theirs = dict(client.model.named_parameters())
    assert all(torch.equal(params[n], theirs[n]) for n in client.base_parameter_names())


# --- 5. flags -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, match", [
    (dict(lora_rank=-1), "--lora-rank must be an integer >= 0"),
    (dict(lora_rank=True), "--lora-rank must be an integer >= 0"),
    (dict(lora_rank=4, lora_alpha=-2.0), "--lora-alpha must be a number >= 0"),
    (dict(lora_alpha=8.0), "also pass --lora-rank"),
    (dict(lora_targets="q_proj"), "also pass --lora-rank"),
    (dict(lora_rank=4, lora_targets="q-proj"), "comma-separated module names"),
    (dict(lora_rank=4), "embedded .* is fine-tuned fully"),
])
def test_bad_lora_flags_fail_with_one_clear_message(fields, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**fields).validate()


def test_lora_flags_parse_from_the_command_line():
    from hfedmoe.cli import build_parser, run_config_from

    args = build_parser().parse_args(["run", "--model", "/x", "--lora-rank", "8", "--lora-targets", "q_proj,v_proj"])
    cfg = run_config_from(args)
    assert (cfg.lora_rank, cfg.lora_alpha_value(), cfg.lora_target_names()) == (8, 16.0, ["q_proj", "v_proj"])


def test_an_unknown_target_of_a_checkpoint_is_a_config_error(tmp_path, tokenizer, capsys):
    from hfedmoe.cli import main
    from hfedmoe.recipe import moe_shape

    model_dir = save_family("mixtral", tmp_path / "mixtral", tokenizer)
    data = write_data(tmp_path / "d.csv")
    cfg = RunConfig(model=str(model_dir), dataset=str(data), text_column="body", label_column="topic",
                    lora_rank=2, lora_targets="c_attn").validate()
    match = "'c_attn' is no nn.Linear module of this model.*choose from .*q_proj"
    with pytest.raises(ConfigError, match=match):
        build_model(cfg, pretrained=False)
    with pytest.raises(ConfigError, match=match):
        moe_shape(cfg)  # what the CLI checks before any process starts
    argv = ["run", "--model", str(model_dir), "--dataset", str(data), "--text-column", "body", "--label-column",
            "topic", "--lora-rank", "2", "--lora-targets", "c_attn", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error") == 1 and "'c_attn' is no nn.Linear module" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["fedavg-full", "pfl-moe"])
def test_baselines_run_on_lora_adapters(method, tmp_path, tokenizer):
    model_dir = save_family("mixtral", tmp_path / "mixtral", tokenizer)
    cfg = RunConfig(model=str(model_dir), dataset=str(write_data(tmp_path / "d.csv")), text_column="body",
                    label_column="topic", clients=2, rounds=1, local_steps=2, batch_size=4, max_length=16, alpha=5.0,
                    test_fraction=0.25, lr=1e-3, lora_rank=RANK, method=method).validate()
    _, old, uploads, new = one_round_with_uploads(cfg)
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed <= set().union(*uploads) and any(".__expert__." in k for k in changed)


def test_analytic_memory_model_counts_only_trainable_expert_bytes(tmp_path, tokenizer):
    from hfedmoe.budgets import analytic_model_for

    model_dir = save_family("mixtral", tmp_path / "mixtral", tokenizer)
    common = dict(model=str(model_dir), dataset=str(write_data(tmp_path / "d.csv")), text_column="body",
                  label_column="topic")
    full = make_access(build_model(RunConfig(**common).validate(), pretrained=False))
    lora = make_access(build_model(RunConfig(**common, lora_rank=RANK).validate(), pretrained=False))
    per_expert = {}
    for name, access in (("full", full), ("lora", lora)):
        state = access.state_dict()
        per_expert[name] = nbytes({k: state[k] for k in access.param_groups().experts[(0, 0)]})
    full_model, lora_model_ = analytic_model_for(full, 4, 16), analytic_model_for(lora, 4, 16)
    # same activations; a trained LoRA expert adds 3 x its trainable bytes (gradient + 2 AdamW
    # moments); a fully fine-tuned fused expert 2 x (its gradient is in the full-size buffer
    # every layer holds anyway, counted in the base)
    # (before LoRA was counted, the frozen base weights made LoRA's slope the LARGER one)
    saved = full_model.per_expert_bytes - lora_model_.per_expert_bytes
    assert saved == pytest.approx(2 * per_expert["full"] - 3 * per_expert["lora"])
    assert saved > 0
