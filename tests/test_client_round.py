"""One client's round (hfedmoe.client_round) on the hardware paths that need no GPU:
bfloat16 models through the real ServerApp/ClientApp code (in-process engine), and a
CUDA out-of-memory error, injected, recorded as that client's failure for the round."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import hfedmoe.client_round as client_round_module
from hfedmoe.config import RunConfig
from hfedmoe.fl.inprocess import run_inprocess
from hfedmoe.moe import make_access
from hfedmoe.moe import fused_deferred
from hfedmoe.recipe import build_model, load_client_data
from hfedmoe.training import memory

from builders import mixtral_config


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_bfloat16_federated_round_of_a_tiny_mixtral_sends_half_the_bytes(mixtral, tmp_path):
    run_inprocess(mixtral_config(mixtral, tmp_path / "fp32"))
    run_inprocess(mixtral_config(mixtral, tmp_path / "bf16", dtype="bfloat16"))
    full, half = rows(tmp_path / "fp32"), rows(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    # The same tensors cross the wire in 2 bytes an element instead of 4 (plus .npy headers).
    for key in ("bytes_down", "model_bytes"):
        assert half[1][key] / full[1][key] == pytest.approx(0.5, abs=0.01), key
    for row in half:
        assert all(map(torch.isfinite, map(torch.tensor, (row["accuracy"], row["loss"]))))
    for client in half[1]["clients"]:
        assert client["experts_uploaded"] >= 1 and torch.isfinite(torch.tensor(client["train_loss"]))
        assert all(0.0 <= u <= 1.0 for layer in client["usage"] for u in layer)
    with safe_open(str(tmp_path / "bf16" / "final" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}  # the final model is written in the run's dtype


def test_bfloat16_training_keeps_the_selection_math_in_float32(mixtral, tmp_path):
    cfg = mixtral_config(mixtral, tmp_path / "r", dtype="bfloat16")
    model = build_model(cfg, pretrained=True)
    access = make_access(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    state = {k: v.clone() for k, v in access.state_dict().items()}
    upload = client_round_module.client_round(cfg, access, load_client_data(cfg, 0), state,
                                              access.num_layers, server_round=1)
    assert upload.failure is None
    assert access.router_probs().dtype == torch.float32  # recorded from bf16 logits, upcast
    assert upload.usage.dtype == upload.importance.dtype == torch.float32
    assert {v.dtype for v in upload.tensors.values()} == {torch.bfloat16}
    moved = [k for k, v in upload.tensors.items() if not torch.equal(v, state[k])]
    assert moved, "a bfloat16 round changed nothing"


def test_the_exact_peak_memory_is_measured_where_asked_for_or_budgeted(mixtral, tmp_path, monkeypatch):
    """On the CPU the clean baseline (gc + malloc_trim) runs only for clients that measure:
    --measure-memory, or a memory budget (checked against the peak)."""
    cfg = mixtral_config(mixtral, tmp_path / "r", local_steps=1)
    access = make_access(build_model(cfg, pretrained=True))
    state = {k: v.clone() for k, v in access.state_dict().items()}
    data = load_client_data(cfg, 0)
    trims = []
    trim = memory.release_free_memory
    monkeypatch.setattr(memory, "release_free_memory", lambda: (trims.append(1), trim()))
    monkeypatch.setattr(client_round_module, "bound_allocator", lambda: True)  # process-wide: not in a test

    def round_metrics(run_cfg, mem_budget=None) -> dict:
        upload = client_round_module.client_round(run_cfg, access, data, dict(state), access.num_layers,
                                                  server_round=1, mem_budget_bytes=mem_budget)
        assert upload.failure is None
        return upload.metrics

    assert "peak-mem-bytes" not in round_metrics(cfg) and trims == []
    measured = round_metrics(mixtral_config(mixtral, tmp_path / "m", local_steps=1, measure_memory=True))
    assert measured["peak-mem-bytes"] > sum(p.numel() * p.element_size() for p in access.model.parameters())
    assert trims == [1]
    budgeted = round_metrics(cfg, mem_budget=10**12)
    assert budgeted["peak-mem-bytes"] > 0 and budgeted["over-budget"] == 0 and trims == [1, 1]


def test_out_of_memory_is_the_clients_failure_and_the_run_goes_on(mixtral, tmp_path, monkeypatch):
    """A CUDA out-of-memory error (injected: CI has no GPU) in partition 1's first round
    is recorded as its failure; the round completes with the other client, and in round
    2 partition 1 trains again from the current global model."""
    real = client_round_module.train_local
    calls = []

    def train_local(model, batches, budget, cfg, **kw):
        calls.append(budget)
        if len(calls) == 2:  # round 1, second client (clients run in partition order)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(model, batches, budget, cfg, **kw)

    monkeypatch.setattr(client_round_module, "train_local", train_local)
    run_inprocess(mixtral_config(mixtral, tmp_path / "oom", rounds=2))
    first, second = rows(tmp_path / "oom")[1:]
    assert [f["kind"] for f in first["failures"]] == ["out-of-memory"]
    assert first["failures"][0]["id"] == 1 and "out of memory" in first["failures"][0]["reason"]
    assert [c["id"] for c in first["clients"]] == [0]
    assert second["failures"] == [] and sorted(c["id"] for c in second["clients"]) == [0, 1]


def test_an_error_inside_the_local_round_leaves_no_deferred_backward_installed(mixtral, tmp_path, monkeypatch):
    cfg = mixtral_config(mixtral, tmp_path / "r")
    access = make_access(build_model(cfg, pretrained=True))
    state = {k: v.clone() for k, v in access.state_dict().items()}

    def clip(*args, **kwargs):  # the step's backward has run through the deferred experts by now
        assert any(fused_deferred.installed(m) for m in access.experts_modules())
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    upload = client_round_module.client_round(cfg, access, load_client_data(cfg, 0), state, access.num_layers, 1)
    assert upload.failure and upload.metrics["out-of-memory"] == 1
    assert not any(fused_deferred.installed(m) for m in access.experts_modules())


def test_a_bfloat16_lora_round_trains_float32_adapters_over_the_bfloat16_base(mixtral, tmp_path):
    run_inprocess(mixtral_config(mixtral, tmp_path / "lora", dtype="bfloat16", lora_rank=4))
    rows_ = rows(tmp_path / "lora")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows_)
    assert rows_[1]["failures"] == [] and len(rows_[1]["clients"]) == 2
    with safe_open(str(tmp_path / "lora" / "final" / "adapter_model.safetensors"), "pt") as f:  # PEFT's file
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    adapters = {d for k, d in dtypes.items() if ".lora_" in k}
    others = {d for k, d in dtypes.items() if ".lora_" not in k}
    assert adapters == {"F32"} and others == {"BF16"}  # routers and head in the model's dtype
