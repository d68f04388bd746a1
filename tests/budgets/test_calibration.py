"""hfedmoe.budgets.calibration: the fit, its upper bound, the cache key, and the calibration
measured on first use; mostly with the fresh-process measurements stubbed (each real one
loads the model), and one real measurement of a tiny checkpoint."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace

import pytest

from hfedmoe.budgets import calibration, client_budgets
from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.core.budget import MemoryModel


def test_calibrate_fits_the_points_it_measured(monkeypatch):
    calls = []

    def measured(args):
        calls.append(args[0])
        if args[0] == "memory":
            n = int(args[2])
            return {"trained_experts": n, "peak_bytes": 500_000_000 + n * 10_000_000, "weights_bytes": 1}
        return {"6": 0.5, "48": 1.0}

    monkeypatch.setattr(calibration, "run_in_fresh_process", measured)
    cfg = RunConfig(batch_size=4, max_length=16)
    result = calibration.calibrate(cfg, [6, 48], steps=1, log=lambda text: None)
    assert calls == ["memory", "memory", "time"], "one fresh process per peak, one for all step times"
    assert result["key"] == calibration.calibration_key(cfg)
    assert result["memory_model"]["base_bytes"] == pytest.approx(500_000_000)
    assert result["memory_model"]["per_expert_bytes"] == pytest.approx(10_000_000)
    assert [p["step_s"] for p in result["points"]] == [0.5, 1.0]
    assert result["max_abs_error"] == pytest.approx(0.0, abs=1e-9)


def test_the_fresh_process_runs_this_module(monkeypatch):
    seen = {}

    class Done:
        returncode, stdout, stderr = 0, '{"ok": 1}\n', ""

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        return Done()

    monkeypatch.setattr(calibration.subprocess, "run", run)
    assert calibration.run_in_fresh_process(["memory", "{}", "6", "1"]) == {"ok": 1}
    module = seen["cmd"][seen["cmd"].index("-m") + 1]
    assert module == calibration.MEASURE_MODULE and importlib.util.find_spec(module) is not None


def test_the_measurement_module_runs_unloaded_by_its_package():
    """`python -m` warns (and runs a second copy) when the package already imported the module."""
    code = "import sys, hfedmoe.budgets; print(hfedmoe.budgets.calibration.MEASURE_MODULE in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- the upper bound -------------------------------------------------------------------------

def test_the_calibrated_model_covers_every_measured_point():
    from hfedmoe.core.budget import cover_measurements, fit_memory_model

    counts = [6, 12, 24, 48]
    peaks = [700e6, 790e6, 905e6, 1290e6]  # noisy: the least-squares line passes below some of them
    fit = fit_memory_model(counts, peaks)
    assert any(fit.predict(n) < y for n, y in zip(counts, peaks))
    model = cover_measurements(fit, counts, peaks)
    assert all(model.predict(n) >= y for n, y in zip(counts, peaks))
    assert model.per_expert_bytes == fit.per_expert_bytes and model.source == "calibrated"
    # the base is raised by the worst shortfall and no more (one byte of rounding)
    worst = max(y - fit.predict(n) for n, y in zip(counts, peaks))
    assert model.base_bytes - fit.base_bytes == pytest.approx(worst, abs=2.0)
    covering = calibration.MemoryModel(fit.base_bytes + 10 * worst, fit.per_expert_bytes, "calibrated")
    assert cover_measurements(covering, counts, peaks) is covering  # already covers: unchanged


def _noisy_measurements(calls):
    def measured(args):
        calls.append(args[0])
        if args[0] == "memory":
            n = int(args[2])
            wobble = {0: 30e6, 1: -20e6, 2: 5e6, 3: 25e6, 4: -15e6}[n % 5]  # off the line, both ways
            return {"trained_experts": n, "peak_bytes": int(500e6 + n * 10e6 + wobble), "weights_bytes": 1}
        raise AssertionError("memory budgets need no step-time pass")
    return measured


def test_calibrate_records_the_fit_and_how_far_it_was_raised(monkeypatch):
    calls = []
    monkeypatch.setattr(calibration, "run_in_fresh_process", _noisy_measurements(calls))
    result = calibration.calibrate(RunConfig(batch_size=4, max_length=16), [6, 12, 24, 48], steps=2,
                                   log=lambda text: None, times=False)
    assert calls == ["memory"] * 4
    bound = result["upper_bound"]
    assert bound["raised_by_bytes"] > 0 and bound["covers_every_point"]
    assert result["memory_model"]["base_bytes"] == pytest.approx(bound["fit_base_bytes"] + bound["raised_by_bytes"])
    for p in result["points"]:
        assert p["predicted_bytes"] >= p["peak_bytes"] and p["margin"] >= 0
        assert p["fit_bytes"] == pytest.approx(p["peak_bytes"] * (1 + p["error"]))
    assert result["steps"] == 2


# --- first use: measure, cache, reuse --------------------------------------------------------

def _budget_cfg(**kw) -> RunConfig:
    base = dict(clients=3, num_experts=4, batch_size=2, max_length=16, local_steps=2,
                mem_budgets=["700MB", "800MB", "100GB"])
    return RunConfig(**{**base, **kw}).validate()


@pytest.fixture
def embedded_access():
    from hfedmoe.moe import make_access
    from hfedmoe.recipe import build_model

    return make_access(build_model(_budget_cfg(), pretrained=False))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "hfedmoe" / "calibration"


def test_first_use_measures_and_caches_and_the_next_run_reuses_it(monkeypatch, cache, embedded_access):
    calls, lines = [], []
    monkeypatch.setattr(calibration, "run_in_fresh_process", _noisy_measurements(calls))
    cfg = _budget_cfg()
    first = client_budgets(cfg, embedded_access, log=lines.append)
    counts = calibration.default_counts(embedded_access.num_layers,
                                        embedded_access.num_layers * embedded_access.num_experts)
    assert calls == ["memory"] * len(counts), "one fresh process per count, no timing pass"
    path = calibration.default_calibration_path(cfg)
    assert path.parent == cache and path.is_file()
    assert "no memory calibration for this model and batch shape yet" in lines[0] and str(path) in lines[0]
    assert sum("experts/batch: peak" in line for line in lines) == len(counts)  # each point's result
    saved = json.loads(path.read_text())
    assert saved["key"] == calibration.calibration_key(cfg) and saved["auto"] and saved["steps"] == cfg.local_steps
    model = MemoryModel(**saved["memory_model"])
    assert [b.expert_budget for b in first] == [
        min(24, int((m * 0.95 - model.base_bytes) // model.per_expert_bytes)) for m in (700e6, 800e6, 100e9)]

    calls.clear()
    lines.clear()
    again = client_budgets(replace(cfg, seed=5, method="fedavg", rounds=9), embedded_access, log=lines.append)
    assert calls == [] and lines == [], "the same shape reuses the cache without measuring"
    assert [b.expert_budget for b in again] == [b.expert_budget for b in first]

    # more local steps than the cached calibration measured: its peaks are no bound for them
    client_budgets(replace(cfg, local_steps=5), embedded_access, log=lines.append)
    assert calls == ["memory"] * len(counts) and "measuring again" in lines[0]
    assert json.loads(path.read_text())["steps"] == 5


def test_analytic_never_measures(monkeypatch, cache, embedded_access):
    def refuse(args):
        raise AssertionError("--calibration analytic must not measure")

    monkeypatch.setattr(calibration, "run_in_fresh_process", refuse)
    budgets = client_budgets(_budget_cfg(calibration="analytic"), embedded_access, log=refuse)
    analytic = calibration.analytic_model_for(embedded_access, 2, 16)
    assert budgets[0].expert_budget == int((700e6 * 0.95 - analytic.base_bytes) // analytic.per_expert_bytes)
    assert not cache.exists()


def test_an_explicit_calibration_file_must_exist_and_match_the_shape(monkeypatch, tmp_path, cache, embedded_access):
    monkeypatch.setattr(calibration, "run_in_fresh_process", _noisy_measurements([]))
    with pytest.raises(ConfigError, match="does not exist"):
        client_budgets(_budget_cfg(calibration=str(tmp_path / "none.json")), embedded_access)
    other = tmp_path / "other.json"
    calibration.write_calibration(other, calibration.calibrate(_budget_cfg(batch_size=8), [6, 24], steps=2,
                                                               log=lambda text: None, times=False))
    with pytest.raises(ConfigError, match="another model, batch shape, device or dtype"):
        client_budgets(_budget_cfg(calibration=str(other)), embedded_access)
    budgets = client_budgets(_budget_cfg(batch_size=8, calibration=str(other)), embedded_access)
    assert len(budgets) == 3 and not cache.exists()


def test_the_calibration_value_is_validated():
    for bad in ("", "  ", "Analytic", 3):
        with pytest.raises(ConfigError, match="--calibration"):
            RunConfig(calibration=bad).validate()
    assert RunConfig(calibration="analytic").validate().calibration == "analytic"
    assert RunConfig(calibration="/some/file.json").validate()  # checked when the budgets are mapped


# --- the key -----------------------------------------------------------------------------------

def test_the_key_changes_with_everything_that_changes_memory(monkeypatch):
    import torch

    base = RunConfig(batch_size=4, max_length=16)
    key = calibration.calibration_key(base)
    changed = {"dtype": "bfloat16", "lora_rank": 8, "load_in_4bit": True, "gradient_checkpointing": True,
               "task": "causal-lm", "batch_size": 8, "max_length": 32, "num_experts": 4, "top_k": 1,
               "model": "some/other-moe"}
    keys = {name: calibration.calibration_key(replace(base, **{name: value})) for name, value in changed.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(keys), keys
    # what does not change a client's memory leaves it alone (one calibration for a comparison)
    for name, value in {"method": "fedavg", "seed": 7, "rounds": 9, "clients": 8, "lr": 1e-3,
                        "mem_budget_range": "1GB:2GB", "dtype": "float32"}.items():
        assert calibration.calibration_key(replace(base, **{name: value})) == key, name
    # the resolved device type, not its index
    monkeypatch.setattr(calibration, "run_device", lambda cfg: torch.device("cuda:0"))
    on_gpu = calibration.calibration_key(replace(base, dtype="float32"))
    monkeypatch.setattr(calibration, "run_device", lambda cfg: torch.device("cuda:1"))
    assert calibration.calibration_key(replace(base, dtype="float32")) == on_gpu != key
    assert calibration.calibration_identity(replace(base, dtype="float32"))["device"] == "cuda"


# --- compare: one calibration for every method and seed of a shape ---------------------------

def test_a_comparison_of_several_methods_calibrates_once(monkeypatch, cache, tmp_path):
    from hfedmoe.compare import check_memory_budgets, plan_runs

    calls = []
    monkeypatch.setattr(calibration, "run_in_fresh_process", _noisy_measurements(calls))
    base = _budget_cfg(mem_budgets=None, mem_budget_range="700MB:1GB")
    runs = plan_runs(base, tmp_path / "cmp", ["hfedmoe", "fedavg", "random"], seeds=2)
    lines = []
    check_memory_budgets(runs, lines.append)
    measured = len(calls)
    assert calls == ["memory"] * measured and measured >= 2
    assert sum("no memory calibration" in line for line in lines) == 1
    assert len(list(cache.glob("*.json"))) == 1
    check_memory_budgets(runs, lines.append)  # a rerun (resumed comparison) measures nothing
    assert len(calls) == measured
    with pytest.raises(ConfigError, match=r"hfedmoe seed \d+: client \d: .*raise its memory budget"):
        check_memory_budgets(plan_runs(replace(base, mem_budget_range="10MB:20MB"), tmp_path / "c2",
                                       ["hfedmoe"], seeds=1), lines.append)


# --- one real first-use calibration ----------------------------------------------------------

def _tiny_olmoe(directory, tokenizer):
    """A tiny OLMoE checkpoint: 2 MoE layers x 2 experts (two calibration points: 2 and 4)."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(
        "olmoe", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2,
        hidden_size=32, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        intermediate_size=16, num_hidden_layers=2, num_experts=2, num_experts_per_tok=1)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_first_use_really_measures_a_tiny_checkpoint(tmp_path, cache, tokenizer, monkeypatch):
    """No stub: two fresh processes each train a tiny OLMoE for one step; the cache then
    holds their peaks, covered by the model, and is reused."""
    from hfedmoe.moe import make_access
    from hfedmoe.recipe import build_model

    from builders import write_data

    model_dir = _tiny_olmoe(tmp_path / "olmoe", tokenizer)
    cfg = RunConfig(model=str(model_dir), dataset=str(write_data(tmp_path / "d.csv", per_class=4)),
                    text_column="body", label_column="topic", clients=2, batch_size=2, max_length=16,
                    local_steps=1, alpha=5.0, test_fraction=0.25, mem_budgets=["100GB", "100GB"]).validate()
    access = make_access(build_model(cfg, pretrained=False))
    assert (access.num_layers, access.num_experts) == (2, 2)
    lines = []
    budgets = client_budgets(cfg, access, log=lines.append)
    assert [b.expert_budget for b in budgets] == [4, 4]
    saved = json.loads(calibration.default_calibration_path(cfg).read_text())
    assert [p["trained_experts"] for p in saved["points"]] == [2, 4]
    assert saved["identity"]["device"] == "cpu" and saved["identity"]["dtype"] == "float32"
    for p in saved["points"]:
        assert p["peak_bytes"] >= p["weights_bytes"] > 0
        assert MemoryModel(**saved["memory_model"]).predict(p["trained_experts"]) >= p["peak_bytes"]
    assert len(lines) == 1 + 2 + 1  # the announcement, each point, the model

    def refuse(args):
        raise AssertionError("the second use must read the cache")

    monkeypatch.setattr(calibration, "run_in_fresh_process", refuse)
    assert [b.expert_budget for b in client_budgets(cfg, access, log=refuse)] == [4, 4]


def test_a_measurement_trains_with_the_runs_task_loss(tmp_path, tokenizer):
    """A causal-lm run's calibration point trains with the causal-lm loss (it used to
    build its loop settings without the task and fail on the classification loss)."""
    import datasets

    rows = [{"instruction": f"say {w} twice", "output": f"{w} {w}"} for w in ["red", "blue", "green", "gold"] * 3]
    data = tmp_path / "sft.jsonl"
    datasets.Dataset.from_list(rows).to_json(str(data))
    cfg = RunConfig(model=str(_tiny_olmoe(tmp_path / "olmoe", tokenizer)), dataset=str(data), task="causal-lm",
                    text_column="instruction", response_column="output", clients=2, batch_size=2, max_length=16,
                    local_steps=1, test_fraction=0.25).validate()
    point = calibration.run_in_fresh_process(["memory", cfg.to_json(), "2", "1"])
    assert point["trained_experts"] == 2 and point["peak_bytes"] >= point["weights_bytes"] > 0
