"""The run directory's checkpoints: written in the background, in order, errors surfaced."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hfedmoe.config import RunConfig
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
