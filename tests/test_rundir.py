"""The run directory's checkpoints: written in the background, in order, errors surfaced."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.rundir import RunRecorder


def _recorder(tmp_path) -> RunRecorder:
    return RunRecorder(tmp_path / "run", RunConfig(out=str(tmp_path / "run")))


def test_checkpoints_land_in_order_and_only_the_latest_is_kept(tmp_path):
    recorder = _recorder(tmp_path)
    states = [{"w": torch.full((64, 64), float(r)), "b": torch.arange(3) + r} for r in range(1, 4)]
    for r, state in enumerate(states, start=1):
        recorder.save_checkpoint(r, state)
    recorder.wait_for_checkpoint()
    latest = json.loads((recorder.checkpoint_dir / "latest.json").read_text())
    assert latest == {"round": 3, "file": "round-0003.safetensors"}
    assert sorted(p.name for p in recorder.checkpoint_dir.glob("*.safetensors")) == ["round-0003.safetensors"]
    saved = load_file(str(recorder.checkpoint_dir / latest["file"]))
    assert torch.equal(saved["w"], states[2]["w"]) and torch.equal(saved["b"], states[2]["b"])
    recorder.log_round({"round": 3, "accuracy": 0.5, "loss": 1.0})
    summary = recorder.finish(states[2], {"spec": {}})
    assert summary["rounds"] == 1 and (recorder.dir / "final" / "model.safetensors").is_file()


def test_a_failed_background_write_is_raised_not_lost(tmp_path):
    recorder = _recorder(tmp_path)
    recorder.checkpoint_dir.write_text("not a directory")  # the writer's mkdir fails
    recorder.save_checkpoint(1, {"w": torch.zeros(2)})
    with pytest.raises(FileExistsError):
        recorder.wait_for_checkpoint()
    recorder.save_checkpoint(2, {"w": torch.zeros(2)})  # raised again by finish()
    with pytest.raises(FileExistsError):
        recorder.finish({"w": torch.zeros(2)}, {"spec": {}})


def test_checkpoints_are_due_after_the_interval_and_after_the_last_round(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("hfedmoe.rundir.time.monotonic", lambda: clock[0])
    recorder = RunRecorder(tmp_path / "run", RunConfig(rounds=5, checkpoint_interval=60.0))
    clock[0] += 59.0
    assert not recorder.checkpoint_due(1, last_round=5)
    assert recorder.checkpoint_due(5, last_round=5)  # the last round: always
    clock[0] += 1.0
    assert recorder.checkpoint_due(2, last_round=5)
    recorder.save_checkpoint(2, {"w": torch.zeros(2)})
    clock[0] += 30.0
    assert not recorder.checkpoint_due(3, last_round=5)  # counted from that checkpoint
    every = RunRecorder(tmp_path / "every", RunConfig(rounds=5, checkpoint_interval=0))
    assert every.checkpoint_due(1, last_round=5)
    recorder.finish({"w": torch.zeros(2)}, {})
    every.finish({"w": torch.zeros(2)}, {})


def test_a_negative_checkpoint_interval_is_refused():
    with pytest.raises(ConfigError, match="--checkpoint-interval must be seconds >= 0"):
        RunConfig(checkpoint_interval=-1).validate()
