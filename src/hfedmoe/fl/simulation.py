"""Run a federated HFedMoE experiment on Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
import time

import torch

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.fl.processes import clear_run_token, descendants, marked, new_run_token, stop_descendants
from hfedmoe.recipe.device import run_device


class _CapturingReporter:
    """Forwards to the user's reporter and keeps the summary for the caller."""

    def __init__(self, inner):
        self.inner = inner
        self.summary: dict | None = None

    def on_start(self, info: dict) -> None:
        if self.inner:
            self.inner.on_start(info)

    def on_round(self, row: dict) -> None:
        if self.inner:
            self.inner.on_round(row)

    def on_end(self, summary: dict) -> None:
        self.summary = summary
        if self.inner:
            self.inner.on_end(summary)


def client_resources(cfg: RunConfig, cores: int, gpus: int) -> dict[str, float]:
    """Flower's ``client_resources`` of a run: what each virtual client's Ray actor holds.

    On the CPU (``gpus == 0``) a client holds every core, so clients run one at a
    time (a 2-core box trains faster one client at a time than two at half speed).
    On CUDA a client holds ``--client-gpus`` of a GPU (default 1: one client per GPU
    at a time; 0.25 lets four share one and train at once) and, by default, the
    same share of the cores. ``--client-cpus`` overrides the cores.
    """
    if gpus == 0:
        return {"num_cpus": cfg.client_cpus or cores, "num_gpus": 0.0}
    share = float(cfg.client_gpus or 1.0)
    at_once = max(1, int(gpus / share))  # clients training at the same time
    return {"num_cpus": cfg.client_cpus or max(1, cores // at_once), "num_gpus": share}


ENGINES = ("auto", "inprocess", "simulation")  # `hfedmoe run --engine`


def pick_engine(cfg: RunConfig, cores: int, gpus: int) -> str:
    """``--engine auto``: the in-process engine (the real ServerApp/ClientApp code, no Ray
    daemons, messages by reference) when clients train one at a time on one device,
    Flower's simulation engine when several can train at once (``--client-gpus`` below 1
    of a GPU, several GPUs, or ``--client-cpus`` below the machine's cores)."""
    resources = client_resources(cfg, cores, gpus)
    at_once = gpus / resources["num_gpus"] if gpus else cores / resources["num_cpus"]
    return "simulation" if at_once >= 2 and cfg.clients >= 2 else "inprocess"


def resolve_engine(cfg: RunConfig, requested: str) -> str:
    """``inprocess`` or ``simulation`` for ``--engine requested`` on this machine."""
    if requested not in ENGINES:
        raise ConfigError(f"--engine {requested}: choose one of {', '.join(ENGINES)}")
    if requested != "auto":
        return requested
    gpus = torch.cuda.device_count() if run_device(cfg).type == "cuda" else 0
    return pick_engine(cfg, os.cpu_count() or 1, gpus)


def run_simulation(cfg: RunConfig, reporter=None, verbose: bool = False) -> dict:
    """Run ``cfg`` with one virtual SuperNode per client; return the run summary.

    Each client's Ray actor holds :func:`client_resources`. Ray shows an actor only
    the GPUs it holds, as ``cuda:0``: clients take ``--device cuda`` (or ``auto``).
    Every process started for the run is stopped before this returns, also on error.
    """
    # Flower must not build a fresh environment per run (it would pull CUDA torch).
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # Imported once the environment above is set (huggingface_hub reads HF_HUB_OFFLINE when
    # first imported), and only here: flwr.simulation brings in Ray.
    from flwr.simulation import run_simulation as flwr_run_simulation  # noqa: I001

    from hfedmoe.fl.client_app import app as client_app  # same reason as the line above
    from hfedmoe.fl.server_app import make_server_app  # same reason

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    capture = _CapturingReporter(reporter)
    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if run_device(cfg).type == "cuda" else 0
    if gpus and cfg.device not in ("auto", "cuda", "cuda:0"):
        raise ConfigError(f"--device {cfg.device}: in the simulation engine Ray gives each client the GPU it holds as "
                          "cuda:0; use --device cuda (CUDA_VISIBLE_DEVICES chooses the GPUs the run may use)")
    resources = client_resources(cfg, cores, gpus)
    if resources["num_gpus"] > gpus:
        raise ConfigError(f"--client-gpus {resources['num_gpus']}: a client cannot hold more GPUs than the "
                          f"{gpus} this machine has")
    backend_config = {
        "client_resources": resources,
        "init_args": {
            "num_cpus": cores,
            "num_gpus": gpus,
            "include_dashboard": False,
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": True,
        },
    }
    token = new_run_token()  # every process Ray starts for this run inherits it: all found at the end
    try:
        flwr_run_simulation(
            server_app=make_server_app(cfg, capture),
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_config=backend_config,
            verbose_logging=verbose,
        )
    finally:
        # Snapshot the process tree before Ray shuts down: processes orphaned during
        # the shutdown leave the tree but must still be stopped.
        tree = descendants()
        try:
            import ray  # loaded by Flower's simulation engine by now; stopped here if still up

            if ray.is_initialized():
                ray.shutdown()
        finally:
            stop_descendants(also=tree)
            # A worker forked while Ray was being stopped can appear after the pass above.
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                time.sleep(0.5)
                if marked(token):
                    stop_descendants(grace_s=2.0)
            clear_run_token()
    if capture.summary is None:
        raise RuntimeError("the federated run ended without a summary; see the log above for the failing step")
    return capture.summary
