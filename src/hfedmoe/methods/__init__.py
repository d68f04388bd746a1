"""Federated methods as plug-ins: one file per method (hfedmoe.py, fedavg.py, ...), one
interface (:class:`~hfedmoe.methods.base.Method`), one registry (:mod:`.registry`)."""

from hfedmoe.methods.base import ClientContext, Method, RoundPlan
from hfedmoe.methods.merging import DEFAULT_MERGE, EXPERT_MERGES, ROUTER_WEIGHTS, merge_names
from hfedmoe.methods.registry import (
    DEFAULT_METHOD,
    METHODS,
    get_method,
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
    "ClientContext",
    "Method",
    "RoundPlan",
    "get_method",
    "merge_names",
    "method_names",
    "register_method",
    "server_merges",
    "unregister_method",
]
