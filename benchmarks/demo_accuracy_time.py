"""Benchmark: the default `hfedmoe run` (what `make demo` runs) on this machine.

Target (issue 3): >= 90% test accuracy on BBC News within 5 minutes wall.
Prints the measured figures; exits 1 if the target is missed.

    .venv/bin/python benchmarks/demo_accuracy_time.py [extra hfedmoe run flags]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_ACCURACY = 0.90
TARGET_WALL_S = 300.0


def main() -> int:
    out = Path(tempfile.mkdtemp(prefix="hfedmoe-demo-bench-")) / "run"
    exe = Path(sys.executable).parent / "hfedmoe"
    cmd = [str(exe), "run", "--out", str(out), *sys.argv[1:]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"run failed with exit code {proc.returncode}")
        return 1
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print("\nround  accuracy  loss    wall_s")
    for r in rows:
        print(f"{r['round']:>5}  {r['accuracy']:.4f}    {r['loss']:.4f}  {r['wall_s']:.1f}")
    reached = next((r for r in rows if r["accuracy"] >= TARGET_ACCURACY), None)
    print(f"\ncommand:            {' '.join(cmd)}")
    print(f"cpu cores:          {os.cpu_count()}")
    print(f"final accuracy:     {summary['final_accuracy']:.4f}")
    print(f"process wall time:  {wall:.1f} s (includes Ray start, model build, evaluation)")
    print(f"first >= {TARGET_ACCURACY:.0%}:       "
          + (f"round {reached['round']} at {reached['wall_s']:.1f} s run time" if reached else "never"))
    print(f"bytes up / down:    {summary['bytes_up'] / 1e6:.1f} MB / {summary['bytes_down'] / 1e6:.1f} MB")
    ok = summary["final_accuracy"] >= TARGET_ACCURACY and wall <= TARGET_WALL_S
    print(f"target (>= {TARGET_ACCURACY:.0%} within {TARGET_WALL_S:.0f} s): {'MET' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
