"""The table of access families and :func:`make_access`, which walks it.

Each family is one module implementing :class:`~hfedmoe.moe.protocol.MoEAccess` for
one layout, plus a ``detect(model) -> bool`` found by module structure. The table is
ordered: the first family whose ``detect`` holds drives the model. Adding a layout =
one new module + one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import nn

from hfedmoe.moe.fused import FusedMoEAccess, detect_fused
from hfedmoe.moe.lora import LoraMoEAccess, is_lora_model
from hfedmoe.moe.modular import ModularMoEAccess, detect_modular
from hfedmoe.moe.protocol import MoEAccess, NoMoELayersError
from hfedmoe.moe.switch import SwitchMoEAccess, detect_switch


class Family(NamedTuple):
    """One model layout: its name, its structural test, and its access class."""

    name: str
    detect: Callable[[nn.Module], bool]
    access: Callable[[nn.Module], MoEAccess]


FAMILIES: list[Family] = [
    Family("modular", detect_modular, ModularMoEAccess),  # hfedmoe's own MoEFeedForward blocks
    Family("lora", is_lora_model, LoraMoEAccess),  # PEFT LoRA on fused experts (before "fused": it wraps them)
    Family("fused", detect_fused, FusedMoEAccess),  # transformers 5.x fused 3-D experts
    Family("switch", detect_switch, SwitchMoEAccess),  # Switch Transformers, separate expert modules
]
BUILT_IN = frozenset(f.name for f in FAMILIES)


def register_family(family: Family, before: str | None = None) -> None:
    """Add a layout to :data:`FAMILIES` (a plug-in outside this package, e.g. a test's toy
    block): last, or just before the family named ``before``. Every process of a run must
    register it (under Ray or a deployment: import the registering module in each)."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"a family named {family.name!r} is already registered")
    names = [f.name for f in FAMILIES]
    if before is not None and before not in names:
        raise ValueError(f"no family {before!r} to insert before; families: {', '.join(names)}")
    FAMILIES.insert(names.index(before) if before is not None else len(FAMILIES), family)


def unregister_family(name: str) -> None:
    """Remove a family added with :func:`register_family`."""
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is a built-in family")
    FAMILIES[:] = [f for f in FAMILIES if f.name != name]


def family_of(model: nn.Module) -> Family:
    """The first family of :data:`FAMILIES` that detects ``model``'s layout."""
    for family in FAMILIES:
        if family.detect(model):
            return family
    raise NoMoELayersError(
        f"{type(model).__name__} has no Mixture-of-Experts layer hfedmoe can drive: pass a MoE model "
        "(Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, Switch) or a BERT-style encoder to upcycle"
    )


def make_access(model: nn.Module) -> MoEAccess:
    """The access layer for ``model``'s layout, detected from its module structure."""
    return family_of(model).access(model)
