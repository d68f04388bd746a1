"""Where a run's tensors live and in which precision: ``--device``, ``--dtype``, 4-bit.

Every process of a run (server, each client, a calibration measurement) resolves
``--device auto`` itself: CUDA when this process sees a GPU, else the CPU. The
precision is agreed once for the whole federation: the server resolves ``--dtype
auto`` (bfloat16 on a GPU that has it, float32 otherwise) and sends the resolved
name to every client inside the run configuration, because every message carries
tensors in the model's dtype and the server refuses a reply of another dtype.

What stays float32 whatever the model's dtype: the router probabilities recorded for
selection (hfedmoe.moe.routing upcasts the logits before the softmax), the
importance / information-bottleneck / selection math (hfedmoe.core), the losses
(objectives upcast the logits), the per-round usage and importance sums (float64),
and LoRA adapters (PEFT keeps them float32 over a half-precision base). Server
aggregation accumulates in float64 and writes the model's dtype
(hfedmoe.core.aggregation).
"""

from __future__ import annotations

import os
import re

import torch

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.training.device import DTYPES

# Tests only: run the real 4-bit path on a CPU (bitsandbytes has a CPU backend); a user
# without a GPU gets the clear error of check_runtime instead.
ALLOW_CPU_4BIT_ENV = "HFEDMOE_ALLOW_CPU_4BIT"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when this process sees a GPU, else ``cpu``; ``cuda``/``cuda:N``
    checked against the GPUs this process sees (ConfigError naming the fix)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA (a CPU build)"
        raise ConfigError(f"--device {name}: this process sees no CUDA GPU (torch {torch.__version__}, built with "
                          f"{built}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                          "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this process sees {torch.cuda.device_count()} GPU(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU that supports it, float32 otherwise; explicit names
    checked against the device."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be auto, {', '.join(DTYPES)}, got {name!r}")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("--dtype float16 on the CPU: many CPU kernels have no float16 version; use "
                          "--dtype bfloat16 (half the memory too) or float32")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                          "use --dtype float16 or float32")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def run_device(cfg: RunConfig) -> torch.device:
    return resolve_device(cfg.device)


def run_dtype(cfg: RunConfig) -> torch.dtype:
    return resolve_dtype(cfg.dtype, run_device(cfg))


def agreed_dtype(cfg: RunConfig) -> str:
    """The federation's dtype name: ``--dtype`` with ``auto`` resolved in this process.

    The server calls it once and sends the result to every client in the run
    configuration, so a client on other hardware still trains in the server's dtype.
    """
    return dtype_name(run_dtype(cfg))


def check_runtime(cfg: RunConfig) -> None:
    """ConfigError for a device, dtype, 4-bit or GPU-share setting this process cannot honour."""
    device = run_device(cfg)
    run_dtype(cfg)
    if cfg.load_in_4bit:
        if device.type != "cuda" and not os.environ.get(ALLOW_CPU_4BIT_ENV):
            raise ConfigError("--load-in-4bit (QLoRA: NF4 base weights through bitsandbytes) needs a CUDA GPU, and "
                              f"this process runs on {device}: drop --load-in-4bit (LoRA in bfloat16 or float32 "
                              "works here) or run on a GPU machine")
        try:
            import bitsandbytes  # noqa: F401  (the 4-bit kernels; an optional dependency)
        except ImportError:
            raise ConfigError("--load-in-4bit needs bitsandbytes: pip install 'hfedmoe[qlora]' "
                              "(or pip install bitsandbytes)") from None
    if cfg.client_gpus and device.type != "cuda":
        raise ConfigError(f"--client-gpus {cfg.client_gpus} gives each client a share of a GPU, but the run is on "
                          f"{device}: drop --client-gpus, or use --device cuda on a GPU machine")
