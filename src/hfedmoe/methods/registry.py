"""The one registry of federated methods and merge rules: config validation, ``--help``,
``compare``, the client round and the server strategy all read it.

An entry holds what config and the command line need (name, one-line summary, whether
HFedMoE's ablation switches apply) and where the method's code lives; the code is
imported on first use, so ``hfedmoe --help`` and a config error never pay for torch.
Adding a method = one new file in this package + one line in :data:`METHODS`
(docs/extending.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing a method loads torch
    from hfedmoe.methods.base import Method
    from hfedmoe.methods.merging import ExpertMerge, RouterWeights


def load(location: str) -> Any:
    """The object at ``"package.module:name"``."""
    module, name = location.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class MethodEntry:
    """One registered method.

    Attributes
    ----------
    name : str
        The ``--method`` value.
    summary : str
        One line for ``--help`` and the docs.
    location : str
        ``"module:Class"`` of its :class:`~hfedmoe.methods.base.Method` subclass.
    ablation_switches : bool
        ``--expert-agg`` / ``--gate-agg`` replace its two merges (HFedMoE's own
        ablations, Fig. 16); a method with its own aggregation refuses them.
    """

    name: str
    summary: str
    location: str
    ablation_switches: bool = False
    method: Method | None = None  # the instance, once loaded (or as a plug-in registered it)

    def load(self) -> Method:
        if self.method is None:
            self.method = load(self.location)()
        return self.method


# In the order help texts and `compare` list them.
METHODS: dict[str, MethodEntry] = {entry.name: entry for entry in (
    MethodEntry("hfedmoe", "HFedMoE: I_b selection per batch, sparse upload, Eq. 17-21",
                "hfedmoe.methods.hfedmoe:HFedMoE", ablation_switches=True),
    MethodEntry("fedavg-full", "FedAvg, every client trains and uploads every expert, budgets ignored",
                "hfedmoe.methods.fedavg_full:FedAvgFull"),
    MethodEntry("fedavg", "FedAvg under budgets: a client that cannot train every expert fails the round",
                "hfedmoe.methods.fedavg:FedAvg"),
    MethodEntry("pfl-moe", "PFL-MoE: the experts the client's router prefers, plain FedAvg",
                "hfedmoe.methods.pfl_moe:PflMoE"),
    MethodEntry("fedmoe", "FedMoE: fixed sub-model from activation frequency, modular aggregation",
                "hfedmoe.methods.fedmoe:FedMoE"),
    MethodEntry("seer-moe", "SEER-MoE: heavy-hitter pruning, fine-tuning with gate-entropy penalty",
                "hfedmoe.methods.seer_moe:SeerMoE"),
    MethodEntry("flame", "FLAME: fewer experts per token on constrained clients, private rescaler, "
                "activation-aware aggregation", "hfedmoe.methods.flame:Flame"),
    MethodEntry("random", "random experts within the budget (HFedMoE's upload and aggregation)",
                "hfedmoe.methods.random_experts:RandomExperts", ablation_switches=True),
)}
BUILT_IN = frozenset(METHODS)
DEFAULT_METHOD = "hfedmoe"  # the paper's

# The names --expert-agg / --gate-agg accept (HFedMoE's ablations), and their code.
EXPERT_MERGES: dict[str, str] = {"hfedmoe": "hfedmoe.methods.merging:merge_over_uploaders",
                                 "fedavg": "hfedmoe.methods.merging:merge_over_all_clients",
                                 "activation": "hfedmoe.methods.merging:merge_by_activation"}  # FLAME's
ROUTER_WEIGHTS: dict[str, str] = {"hfedmoe": "hfedmoe.methods.merging:preference_weights",
                                  "fedavg": "hfedmoe.methods.merging:data_size_weights"}
DEFAULT_MERGE = "hfedmoe"


def method_names() -> list[str]:
    """Every registered ``--method`` value."""
    return list(METHODS)


def method_entry(name: str) -> MethodEntry:
    """The registry entry of ``name`` (ValueError naming the choices)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def get_method(name: str) -> Method:
    """The method called ``name``, its module imported on first use."""
    return method_entry(name).load()


def register_method(name: str, summary: str, method: Method, ablation_switches: bool = False) -> Method:
    """Add ``method`` under ``name`` (a plug-in outside this package, e.g. a test's toy
    method). Every process of a run must register it before the run's config is read:
    under Ray or a deployment, import the registering module in each of them."""
    if not name or name in METHODS:
        raise ValueError(f"method name {name!r} is empty or already registered")
    METHODS[name] = MethodEntry(name, summary, f"{type(method).__module__}:{type(method).__qualname__}",
                                ablation_switches, method)
    return method


def unregister_method(name: str) -> None:
    """Remove a plug-in added with :func:`register_method` (built-ins cannot be removed)."""
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is a built-in method")
    METHODS.pop(name, None)


def server_merges(method: str, expert_agg: str = DEFAULT_MERGE,
                  gate_agg: str = DEFAULT_MERGE) -> tuple[ExpertMerge, RouterWeights]:
    """The expert merge and router weights the server uses for ``method``: the run's
    ``--expert-agg`` / ``--gate-agg`` for methods with ablation switches (HFedMoE,
    random), the method's own two merges for every other method."""
    entry = method_entry(method)
    if entry.ablation_switches:
        return load(EXPERT_MERGES[expert_agg]), load(ROUTER_WEIGHTS[gate_agg])
    chosen = entry.load()
    return chosen.expert_merge, chosen.router_weights


def merge_names(expert_merge: ExpertMerge, router_weights: RouterWeights) -> tuple[str, str]:
    """The ``--expert-agg`` / ``--gate-agg`` names of two merges (results and logs say
    these); a plug-in merge outside the tables goes by its function name."""
    def name(table: dict[str, str], fn) -> str:
        return next((key for key, where in table.items() if load(where) is fn), getattr(fn, "__name__", repr(fn)))

    return name(EXPERT_MERGES, expert_merge), name(ROUTER_WEIGHTS, router_weights)
