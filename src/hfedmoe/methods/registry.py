"""The one registry of federated methods: config validation, ``--help``, ``compare``,
the client round and the server strategy all read it. Adding a method = one new file
in this package + one line in :data:`METHODS` (docs/extending.md)."""

from __future__ import annotations

from hfedmoe.methods.base import Method
from hfedmoe.methods.fedavg import FedAvg
from hfedmoe.methods.fedavg_full import FedAvgFull
from hfedmoe.methods.fedmoe import FedMoE
from hfedmoe.methods.hfedmoe import HFedMoE
from hfedmoe.methods.merging import DEFAULT_MERGE, EXPERT_MERGES, ROUTER_WEIGHTS, ExpertMerge, RouterWeights
from hfedmoe.methods.pfl_moe import PflMoE
from hfedmoe.methods.random_experts import RandomExperts
from hfedmoe.methods.seer_moe import SeerMoE

# In the order help texts and `compare` list them.
METHODS: dict[str, Method] = {
    method.name: method
    for method in (HFedMoE(), FedAvgFull(), FedAvg(), PflMoE(), FedMoE(), SeerMoE(), RandomExperts())
}


# The method a run uses unless told otherwise: the paper's.
DEFAULT_METHOD = HFedMoE.name


def method_names() -> list[str]:
    """Every registered ``--method`` value."""
    return list(METHODS)


def get_method(name: str) -> Method:
    """The registered method called ``name`` (ValueError naming the choices)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def register_method(method: Method) -> Method:
    """Add ``method`` under ``method.name`` (a plug-in outside this package, e.g. a test's
    toy method). Every process of a run must register it before the run's config is
    read: under Ray or a deployment, import the registering module in each of them."""
    if not method.name or method.name in METHODS:
        raise ValueError(f"method name {method.name!r} is empty or already registered")
    METHODS[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a plug-in added with :func:`register_method` (built-ins cannot be removed)."""
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is a built-in method")
    METHODS.pop(name, None)


BUILT_IN = frozenset(METHODS)


def server_merges(method: str, expert_agg: str = DEFAULT_MERGE,
                  gate_agg: str = DEFAULT_MERGE) -> tuple[ExpertMerge, RouterWeights]:
    """The expert merge and router weights the server uses for ``method``.

    Methods with ``ablation_switches`` (HFedMoE, random) take the run's
    ``--expert-agg`` / ``--gate-agg``; every other method has its own aggregation.
    """
    chosen = get_method(method)
    if chosen.ablation_switches:
        return EXPERT_MERGES[expert_agg], ROUTER_WEIGHTS[gate_agg]
    return chosen.expert_merge, chosen.router_weights
