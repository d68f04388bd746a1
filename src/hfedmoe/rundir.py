"""The run directory: config.json, metrics.jsonl, summary.json, checkpoints/, final/ (the exported model)."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from hfedmoe.config import ConfigError, RunConfig

# Settings a resumed run may change; anything else must match the checkpointed run.
RESUMABLE_CHANGES = {"rounds", "resume", "out", "device", "client_gpus", "client_cpus", "export_every",
                     "measure_memory", "checkpoint_interval"}


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def lower_this_threads_priority() -> None:
    """Lowest CPU priority (niceness 19) for the calling thread, on Linux.

    The checkpoint writer runs while clients train; in the in-process engine they train
    in this process, on the same cores: at its default priority the write (about 0.45 s
    of CPU per round for the embedded model, mostly the kernel's copy into the page
    cache) cost the training on 2 cores more than its own CPU time. At the lowest
    priority it takes the cores' idle moments instead. Elsewhere a no-op.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: a thread id sets that thread
    except (AttributeError, OSError):
        pass


class RunRecorder:
    """Writes one run's files as the run goes, so a crash keeps every finished round."""

    def __init__(self, out: str | Path, cfg: RunConfig):
        self.dir = Path(out)
        self.cfg = cfg
        self.started = time.time()
        self.rows: list[dict] = []
        self.resume_round = 0
        self.resume_state: dict[str, torch.Tensor] | None = None
        self._writer: ThreadPoolExecutor | None = None  # the checkpoint writer thread
        self._pending: Future | None = None
        # CPU seconds the writer thread spent on the last finished checkpoint: off the
        # server's critical path, but on the cores the clients train on when they train in
        # this process (the in-process engine) or on this machine (hfedmoe.bench counts it).
        self.last_write_cpu_s = 0.0
        self._last_checkpoint = time.monotonic()  # "since the last checkpoint" starts with the run
        if cfg.resume:
            self._load_for_resume()
            return
        if self.dir.exists() and (self.dir / "metrics.jsonl").exists():
            raise FileExistsError(
                f"{self.dir} already holds a run (metrics.jsonl): add --resume to continue it, "
                "or choose another --out"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(json.loads(cfg.to_json()), indent=2) + "\n")

    # --- checkpoints ------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    def checkpoint_due(self, server_round: int, last_round: int) -> bool:
        """Whether the global state after ``server_round`` is checkpointed: after the last
        round, and otherwise once ``cfg.checkpoint_interval`` seconds have passed since the
        last checkpoint (0: every round).

        Why not every round: each checkpoint writes the whole model, and the writer shares
        the cores with the clients that train in this process or on this machine. On the
        embedded model (289 MB, rounds of ~7 s on 2 cores) a checkpoint every round cost
        ~0.6 s a round, ~9% (BENCHMARKS.md, issue 19). A crash loses at most the interval's
        rounds, which a resumed run repeats to the same result.
        """
        interval = self.cfg.checkpoint_interval
        return server_round >= last_round or interval <= 0 or time.monotonic() - self._last_checkpoint >= interval

    def save_checkpoint(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        """The global state after ``server_round``; written atomically, older ones removed.

        The server holds no other state between rounds: clients derive their data
        position and random seeds from the round number, so this and metrics.jsonl
        are all an exact resume needs.

        The file is written by a background thread while the next round's clients
        train, which they do in other processes (Ray workers or SuperNodes): writing
        the embedded model took 0.2-0.7 s of every round in the server's critical path.
        At most one write is in flight; a failed write raises here, at the next
        checkpoint, or in :meth:`finish`. ``state``'s tensors must not be modified
        in place afterwards (the server never does: each round builds new ones).
        A kill during a write leaves the previous checkpoint in place.
        """
        self.wait_for_checkpoint()
        self._last_checkpoint = time.monotonic()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hfedmoe-checkpoint",
                                              initializer=lower_this_threads_priority)
        self._pending = self._writer.submit(self._write_checkpoint, server_round, dict(state))

    def wait_for_checkpoint(self) -> None:
        """Block until the last :meth:`save_checkpoint` is on disk; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write_checkpoint(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        started = time.thread_time()
        self._write_files(server_round, state)
        self.last_write_cpu_s = time.thread_time() - started

    def _write_files(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        self.checkpoint_dir.mkdir(exist_ok=True)
        path = self.checkpoint_dir / f"round-{server_round:04d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(path)
        latest = self.checkpoint_dir / "latest.json"
        tmp_latest = latest.with_suffix(".tmp")
        tmp_latest.write_text(json.dumps({"round": server_round, "file": path.name}) + "\n")
        tmp_latest.replace(latest)
        for old in self.checkpoint_dir.glob("round-*.safetensors"):
            if old != path:
                old.unlink()

    def _load_for_resume(self) -> None:
        latest = self.checkpoint_dir / "latest.json"
        if not (self.dir / "config.json").is_file() or not latest.is_file():
            raise ConfigError(f"--resume: {self.dir} holds no checkpointed run (no checkpoints/latest.json); "
                              "drop --resume to start a new run there")
        # A setting added after the run started was at its default then.
        saved = RunConfig.saved_settings(json.loads((self.dir / "config.json").read_text()))
        current = json.loads(self.cfg.to_json())
        changed = sorted(k for k in set(saved) | set(current)
                         if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
        if changed:
            raise ConfigError(f"--resume: settings differ from the checkpointed run: {', '.join(changed)}; "
                              f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change")
        info = json.loads(latest.read_text())
        self.resume_round = int(info["round"])
        self.resume_state = load_file(str(self.checkpoint_dir / info["file"]))  # safetensors: no unpickling
        rows = [json.loads(line) for line in (self.dir / "metrics.jsonl").read_text().splitlines() if line]
        # Rows after the checkpoint belong to a round that will run again.
        self.rows = [r for r in rows if r["round"] <= self.resume_round]
        (self.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.started = time.time() - (self.rows[-1]["wall_s"] if self.rows else 0.0)
        config = {**saved, "rounds": self.cfg.rounds}
        (self.dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    def log_round(self, row: dict) -> dict:
        """Append ``row`` (plus elapsed wall time) to metrics.jsonl; returns what was written."""
        row = {**row, "wall_s": round(time.time() - self.started, 3)}
        self.rows.append(row)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def finish(self, state: dict[str, torch.Tensor], model_info: dict, extra: dict | None = None,
               write_model: Callable[[dict[str, torch.Tensor], Path], None] | None = None) -> dict:
        """Save the final global model in ``final/`` and summary.json; returns the summary.

        ``write_model(state, final_dir)`` writes the model (the server passes
        :func:`hfedmoe.export.export_model`'s: a Hugging Face / PEFT directory); without
        one, ``final/`` holds the internal state dict and ``model_info`` as
        ``hfedmoe.json``.
        """
        try:
            self.wait_for_checkpoint()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None
        final = self.dir / "final"
        final.mkdir(exist_ok=True)
        if write_model is not None:
            write_model(state, final)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, str(final / "model.safetensors"))
            (final / "hfedmoe.json").write_text(json.dumps(model_info, indent=2) + "\n")
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
