"""The run directory: config.json, metrics.jsonl, summary.json, final/model.safetensors."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import save_file

from hfedmoe.config import RunConfig


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


class RunRecorder:
    """Writes one run's files as the run goes, so a crash keeps every finished round."""

    def __init__(self, out: str | Path, cfg: RunConfig):
        self.dir = Path(out)
        if self.dir.exists() and (self.dir / "metrics.jsonl").exists():
            raise FileExistsError(
                f"{self.dir} already holds a run (metrics.jsonl); choose another --out or remove it"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.started = time.time()
        self.rows: list[dict] = []
        (self.dir / "config.json").write_text(json.dumps(json.loads(cfg.to_json()), indent=2) + "\n")

    def log_round(self, row: dict) -> dict:
        """Append ``row`` (plus elapsed wall time) to metrics.jsonl; returns what was written."""
        row = {**row, "wall_s": round(time.time() - self.started, 3)}
        self.rows.append(row)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def finish(self, state: dict[str, torch.Tensor], model_info: dict, extra: dict | None = None) -> dict:
        """Save the final global model and summary.json; returns the summary."""
        final = self.dir / "final"
        final.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(final / "model.safetensors"))
        (final / "config.json").write_text(json.dumps(model_info, indent=2) + "\n")
        trained = [r for r in self.rows if r.get("round", 0) > 0]
        accs = [r["accuracy"] for r in self.rows]
        summary = {
            "rounds": len(trained),
            "initial_accuracy": self.rows[0]["accuracy"] if self.rows else None,
            "final_accuracy": accs[-1] if accs else None,
            "best_accuracy": max(accs) if accs else None,
            "final_loss": self.rows[-1]["loss"] if self.rows else None,
            "wall_s": round(time.time() - self.started, 3),
            "bytes_up": sum(r.get("bytes_up", 0) for r in trained),
            "bytes_down": sum(r.get("bytes_down", 0) for r in trained),
            "failed_client_rounds": sum(len(r.get("failures", [])) for r in trained),
            "run_dir": str(self.dir),
            **(extra or {}),
        }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
