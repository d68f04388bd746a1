"""Model access: one :class:`MoEAccess` protocol over every MoE layout hfedmoe drives.

Modules (imports point downwards only)::

    protocol     MoEAccess, ParamGroups, NoMoELayersError
    state_keys   virtual per-expert keys, task-head names, strict-load checks
    routing      routing records filled by router hooks (Hugging Face layouts)
    fused_deferred, slice_adamw   deferred backward / AdamW per expert slice (fused)
    modular      separate-expert MoEFeedForward blocks (hfedmoe.models.moe_block)
    fused        transformers 5.x fused 3-D experts (+ fused block discovery)
    lora         PEFT LoRA on fused experts (subclasses fused.FusedMoEAccess)
    switch       Switch Transformers (separate expert modules)
    families     the ordered FAMILIES table and make_access
"""

from hfedmoe.moe.families import FAMILIES, Family, family_of, make_access, register_family, unregister_family
from hfedmoe.moe.protocol import MoEAccess, NoMoELayersError, ParamGroups

__all__ = [
    "FAMILIES",
    "Family",
    "MoEAccess",
    "NoMoELayersError",
    "ParamGroups",
    "family_of",
    "make_access",
    "register_family",
    "unregister_family",
]
