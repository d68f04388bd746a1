"""Where a run's tensors live and in which dtype (hfedmoe.recipe.device), and the clear
errors for hardware this machine does not have. CI has no GPU: the CUDA paths are
checked by scripts/gpu_check.py on a GPU machine; here the choices and errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.recipe.device import (
    ALLOW_CPU_4BIT_ENV,
    agreed_dtype,
    check_runtime,
    resolve_device,
    resolve_dtype,
)

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")


def test_auto_is_the_cpu_in_float32_without_a_gpu():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
        assert agreed_dtype(RunConfig()) == "float32"
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert agreed_dtype(RunConfig(dtype="bfloat16")) == "bfloat16"


@needs_no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_one_error_naming_the_fix(name):
    with pytest.raises(ConfigError, match="sees no CUDA GPU.*--device cpu"):
        resolve_device(name)


def test_float16_on_the_cpu_points_to_bfloat16():
    with pytest.raises(ConfigError, match="--dtype bfloat16"):
        resolve_dtype("float16", torch.device("cpu"))


@pytest.mark.parametrize("changes, message", [
    ({"device": "gpu"}, "--device must be auto, cpu, cuda or cuda:N"),
    ({"device": "cuda:x"}, "--device must be"),
    ({"dtype": "fp8"}, "--dtype must be one of"),
    ({"load_in_4bit": True}, "embedded"),
    ({"load_in_4bit": True, "model": "/some/mixtral"}, "--lora-rank"),
    ({"client_gpus": -0.5}, "--client-gpus"),
    ({"client_cpus": -1}, "--client-cpus"),
])
def test_hardware_flags_are_validated_without_torch(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**changes).validate()


@needs_no_gpu
def test_4bit_without_cuda_is_one_clear_error(monkeypatch):
    monkeypatch.delenv(ALLOW_CPU_4BIT_ENV, raising=False)
    cfg = RunConfig(model="/some/mixtral", lora_rank=4, load_in_4bit=True).validate()
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*drop --load-in-4bit"):
        check_runtime(cfg)


def test_4bit_without_bitsandbytes_names_the_install(monkeypatch):
    monkeypatch.setenv(ALLOW_CPU_4BIT_ENV, "1")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    cfg = RunConfig(model="/some/mixtral", lora_rank=4, load_in_4bit=True).validate()
    with pytest.raises(ConfigError, match=r"pip install 'hfedmoe\[qlora\]'"):
        check_runtime(cfg)


@needs_no_gpu
def test_a_gpu_share_on_the_cpu_is_refused():
    with pytest.raises(ConfigError, match="--client-gpus 0.25 .* drop --client-gpus"):
        check_runtime(RunConfig(client_gpus=0.25).validate())


@needs_no_gpu
@pytest.mark.parametrize("flags, message", [
    (["--device", "cuda"], "--device cuda: this process sees no CUDA GPU"),
    (["--model", "/tmp/nowhere-mixtral", "--lora-rank", "4", "--load-in-4bit"], "--load-in-4bit (QLoRA: NF4 base weights through bitsandbytes) needs a CUDA GPU"),
])
def test_the_command_line_stops_with_one_line(flags, message):
    proc = subprocess.run([sys.executable, "-m", "hfedmoe.cli", "run", *flags], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hfedmoe: error:") and message in lines[0], proc.stderr
