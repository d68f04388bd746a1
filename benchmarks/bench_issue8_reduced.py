"""The issue-8 figures at reduced size, for a loaded shared machine (see BENCHMARKS.md).

`hfedmoe bench` (full) takes ~15 min on a quiet 2-core box and over an hour when the
box is 3-5x oversubscribed. This runs the same functions from hfedmoe.bench with
fewer rounds/clients; every figure says which workload it measured.

    python benchmarks/bench_issue8_reduced.py OUT_DIR [--part=ratio|scaling|aggregation]... [--engine=inprocess]... [--repeats=2]
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from hfedmoe import bench
from hfedmoe.config import RunConfig


def ratio_default_workload(out: Path, rounds: int = 3, engines: tuple[str, ...] = ("inprocess", "simulation"),
                           repeats: int = 2) -> dict:
    """runtime_overhead with the default local workload: 10 steps of 16 x 64 tokens, 2 clients;
    steady = the median of rounds 2..``rounds`` over the repeats of each arm; every arm in a
    fresh process, in mirrored order (bench.measure_arms)."""
    cfg = RunConfig(rounds=rounds, clients=2, local_steps=10, out=str(out / "federated"))
    runs = bench.measure_arms(cfg, list(engines), repeats, out, log=lambda t: print(t, file=sys.stderr, flush=True))
    bare = runs.pop("bare")
    return {
        "workload": f"2 clients, 10 local steps of 16 x 64 tokens, {rounds} rounds (steady = rounds 2-{rounds})",
        "repeats": repeats, "arm_order": bench.arm_order(list(engines), repeats),
        "engines": {name: bench.engine_figures(arm_runs, bare, cfg.clients) for name, arm_runs in runs.items()},
        **bench.bare_figures(bare),
    }


def clients_scaling(out: Path, counts=(2, 4, 8)) -> list[dict]:
    """Round time vs clients, fixed local work per client (2 steps of 8 x 32 tokens), round 2 timed."""
    base = bench.quick_config(out)
    result = []
    for clients in counts:
        cfg = replace(base, clients=clients, rounds=2, local_steps=2, out=str(out / f"clients-{clients}"))
        run = bench.arm_in_fresh_process("inprocess", cfg)
        phases = bench.federated_breakdown(run["rows"], run["rows"][1]["model_bytes"] / 1e6)
        result.append({"clients": clients, "round_s": round(run["round_s"][-1], 2),
                       "per_client_s": round(run["round_s"][-1] / clients, 2), **{
                           k: phases.get(k) for k in ("client_round_s", "transport_s", "server_parse_s",
                                                      "server_aggregate_s", "server_eval_s", "server_checkpoint_s")},
                       "loadavg": run["loadavg"]})
        print(json.dumps(result[-1]), file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    parts = [a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--part=")] or ["ratio", "scaling",
                                                                                      "aggregation"]
    engines = tuple(a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--engine=")) or ("inprocess",
                                                                                               "simulation")
    repeats = int(next((a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("--repeats=")), "2"))
    result = {}
    for part in parts:
        if part == "ratio":
            result["default_workload"] = ratio_default_workload(out / "ratio", engines=engines, repeats=repeats)
        elif part == "scaling":
            result["clients_scaling"] = clients_scaling(out / "scaling")
        elif part == "aggregation":
            result["aggregation_scaling"] = bench.aggregation_scaling([8, 16, 32, 64])
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({part: result[list(result)[-1]]}), file=sys.stderr, flush=True)
    print(json.dumps(result))
