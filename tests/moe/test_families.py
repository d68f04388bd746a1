"""The FAMILIES table (hfedmoe.moe.families) and the MoEAccess protocol every family implements."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from torch import nn

from hfedmoe.models.upcycled import UpcycledSpec, build_upcycled_classifier, embedded_model_path
from hfedmoe.moe import FAMILIES, MoEAccess, NoMoELayersError, make_access
from hfedmoe.moe.families import family_of
from hfedmoe.moe.fused import FusedMoEAccess
from hfedmoe.moe.lora import LoraMoEAccess, apply_lora
from hfedmoe.moe.modular import ModularMoEAccess
from hfedmoe.moe.switch import SwitchMoEAccess

from builders import FAMILIES as HF_FAMILIES
from builders import K, L, tiny_bert, tiny_config, tiny_moe, tiny_switch


def protocol_members() -> set[str]:
    """Every member MoEAccess declares: annotated attributes, properties and methods."""
    declared = set(MoEAccess.__annotations__)
    declared |= {n for n in vars(MoEAccess) if not n.startswith("_")}
    return declared


def tiny_fused() -> nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(HF_FAMILIES["mixtral"]))


def tiny_lora() -> nn.Module:
    config = tiny_config(HF_FAMILIES["qwen2_moe"])
    config.num_labels = 3
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    return apply_lora(model, 2, 4.0, None, seed=0)


def embedded() -> nn.Module:
    spec = UpcycledSpec(base_path=str(embedded_model_path()), num_labels=3, num_experts=4, top_k=2)
    return build_upcycled_classifier(spec, pretrained=False)


CASES = {  # builder, family name, access class, optimizer_slices_experts
    "embedded": (embedded, "modular", ModularMoEAccess, False),
    "tiny-upcycled": (tiny_moe, "modular", ModularMoEAccess, False),
    "fused": (tiny_fused, "fused", FusedMoEAccess, True),
    "lora": (tiny_lora, "lora", LoraMoEAccess, False),
    "switch": (tiny_switch, "switch", SwitchMoEAccess, False),
}


def test_the_table_is_ordered_and_names_each_family_once():
    names = [family.name for family in FAMILIES]
    assert names == ["modular", "lora", "fused", "switch"]
    # LoRA wraps fused experts, so it must be tried before the bare fused layout.
    assert names.index("lora") < names.index("fused")


@pytest.mark.parametrize("case", list(CASES))
def test_make_access_picks_the_family_of_the_layout(case):
    build, name, cls, _ = CASES[case]
    model = build()
    assert family_of(model).name == name
    access = make_access(model)
    assert type(access) is cls and access.model is model


@pytest.mark.parametrize("case", list(CASES))
def test_every_access_class_implements_every_protocol_member(case):
    build, _, cls, slices = CASES[case]
    access = make_access(build())
    assert isinstance(access, MoEAccess)
    for name in sorted(protocol_members()):
        assert hasattr(access, name), f"{cls.__name__} lacks protocol member {name}"
        declared = inspect.getattr_static(MoEAccess, name, None)
        if inspect.isfunction(declared):
            assert callable(getattr(access, name)), f"{cls.__name__}.{name} is not callable"
    assert access.optimizer_slices_experts is slices
    assert access.num_experts_total == access.num_layers * access.num_experts
    assert len(access.layer_names) == access.num_layers


@pytest.mark.parametrize("case", list(CASES))
def test_every_layout_overrides_routing_and_scales_the_routed_output(case):
    """routing_override / routed_output_scale open and close on every layout (the Hugging
    Face layouts' behaviour is tested in tests/moe/test_routing_override.py)."""
    access = make_access(CASES[case][0]())
    mask = torch.ones(access.num_layers, access.num_experts, dtype=torch.bool)
    mask[:, 0] = False
    with access.routing_override(mask, top_k=1) as capture, access.routed_output_scale(torch.ones(access.num_layers)):
        assert len(capture.logits) == access.num_layers
    assert isinstance(access.renormalizes_top_k, bool)


def test_memory_estimate_top_k_keeps_the_resource_model_s_values():
    # The analytic memory model used the modular layer's top_k and 2 for every other layout.
    assert make_access(tiny_moe(top_k=K)).memory_estimate_top_k() == K
    assert make_access(tiny_moe(top_k=1)).memory_estimate_top_k() == 1
    for build in (tiny_fused, tiny_lora, tiny_switch):
        assert make_access(build()).memory_estimate_top_k() == 2
    assert make_access(tiny_switch()).top_k == 1  # the protocol's top_k is the model's own value


def test_a_dense_model_is_refused_with_one_clear_message():
    with pytest.raises(NoMoELayersError, match=r"BertModel has no Mixture-of-Experts layer hfedmoe can drive"):
        make_access(tiny_bert())
    assert L == make_access(tiny_moe()).num_layers
