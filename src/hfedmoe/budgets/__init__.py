"""Client budgets: what each client may train (C_budget), from expert counts, memory
budgets (through a calibrated or analytic memory model) or time budgets."""

from hfedmoe.budgets.calibration import (
    analytic_model_for,
    auto_calibrate,
    calibrate,
    calibration_identity,
    calibration_key,
    default_calibration_path,
    default_counts,
    load_memory_model,
    write_calibration,
)
from hfedmoe.budgets.client_budgets import ClientBudget, client_budgets, memory_budgets

__all__ = [
    "ClientBudget",
    "analytic_model_for",
    "auto_calibrate",
    "calibrate",
    "calibration_identity",
    "calibration_key",
    "client_budgets",
    "default_calibration_path",
    "default_counts",
    "load_memory_model",
    "memory_budgets",
    "write_calibration",
]
