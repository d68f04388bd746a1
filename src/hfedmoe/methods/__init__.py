"""Federated methods as plug-ins: one file per method (hfedmoe.py, fedavg.py, ...), one
interface (:class:`hfedmoe.methods.base.Method`, imported from there), one registry
(:mod:`.registry`, re-exported here; it imports a method's code on first use only)."""

from hfedmoe.methods.registry import (
    DEFAULT_MERGE,
    DEFAULT_METHOD,
    EXPERT_MERGES,
    METHODS,
    ROUTER_WEIGHTS,
    MethodEntry,
    get_method,
    merge_names,
    method_entry,
    method_names,
    register_method,
    server_merges,
    unregister_method,
)

__all__ = [
    "DEFAULT_MERGE",
    "DEFAULT_METHOD",
    "EXPERT_MERGES",
    "METHODS",
    "ROUTER_WEIGHTS",
    "MethodEntry",
    "get_method",
    "merge_names",
    "method_entry",
    "method_names",
    "register_method",
    "server_merges",
    "unregister_method",
]
