"""The local loop's settings of a run: what every party that trains (a client's round, a
calibration measurement) hands :func:`hfedmoe.training.train_local`."""

from __future__ import annotations

from hfedmoe.config import RunConfig
from hfedmoe.training import LocalTrainConfig


def local_train_config(cfg: RunConfig) -> LocalTrainConfig:
    """The local loop's settings of ``cfg`` (the task's loss, the selection's knobs)."""
    return LocalTrainConfig(
        local_steps=cfg.local_steps, lr=cfg.lr, new_param_lr_mult=cfg.new_param_lr_mult, lam=cfg.lam,
        beta=cfg.beta, pooling=cfg.pooling, select_by=cfg.select_by, aux_loss_coef=cfg.aux_loss_coef,
        task=cfg.task, unselected_experts=cfg.unselected_experts, measure_memory=cfg.measure_memory,
    )
