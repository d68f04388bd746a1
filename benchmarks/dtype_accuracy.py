"""Accuracy, loss and bytes of the embedded default run in one dtype (issue 15, BENCHMARKS.md).

    PYTHONPATH=src .venv/bin/python benchmarks/dtype_accuracy.py float32  /tmp/dt-fp32
    PYTHONPATH=src .venv/bin/python benchmarks/dtype_accuracy.py bfloat16 /tmp/dt-bf16

Runs the default configuration (4 clients, 3 rounds x 10 steps) on the in-process engine
(the real ServerApp/ClientApp code without Ray) and prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hfedmoe.config import RunConfig
from hfedmoe.fl.inprocess import run_inprocess


def main(dtype: str, out: Path) -> None:
    started = time.time()
    run_inprocess(RunConfig(dtype=dtype, out=str(out)).validate())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"dtype": dtype, "wall_s": round(time.time() - started, 1),
                      "accuracy": [round(r["accuracy"], 4) for r in rows], "loss": [round(r["loss"], 4) for r in rows],
                      "bytes_up": [r["bytes_up"] for r in rows]}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
