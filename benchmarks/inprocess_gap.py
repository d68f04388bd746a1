"""Why does the same client training run slower inside the in-process federated run?

Issue 19: in `hfedmoe bench`, `client_round` (load the global state, the local steps,
choose the upload) took 34.7 s per round inside the federated in-process arm and
30.8 s in the bare arm, on the same data and code. This script runs variants, each in
a fresh process, in mirrored order, and prints the steady client-training and
evaluation seconds of each:

- ``bare``: hfedmoe.bench.bare_arm;
- ``inprocess``: hfedmoe.bench.federated_arm on the in-process Grid;
- ``inprocess-nockpt``: the same with the per-round checkpoint not written;
- ``bare-ckpt``: the bare arm plus a checkpoint written in the background each round,
  as the server does (the same RunRecorder code).

Usage::

    PYTHONPATH=src python benchmarks/inprocess_gap.py OUT [--repeats=2] [--rounds=4]
        [--variants=bare,inprocess,inprocess-nockpt,bare-ckpt] [--default]
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


def _child(variant: str, cfg_json: str, result_path: str) -> None:
    from hfedmoe import bench
    from hfedmoe.config import RunConfig
    from hfedmoe.rundir import RunRecorder

    cfg = RunConfig.from_json(cfg_json)
    probes = _probe_client_rounds()
    if variant.endswith("-nockpt"):
        RunRecorder.save_checkpoint = lambda self, server_round, state: None
    if variant == "bare-ckpt":
        recorder = RunRecorder(cfg.out, cfg)
        original = bench.evaluate

        def evaluate_then_checkpoint(model, test, task):  # bare_arm evaluates once per round
            scores = original(model, test, task=task)
            evaluate_then_checkpoint.round += 1
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            recorder.save_checkpoint(evaluate_then_checkpoint.round, state)
            return scores

        evaluate_then_checkpoint.round = 0
        bench.evaluate = evaluate_then_checkpoint
    if variant.startswith("bare"):
        result = bench.bare_arm(cfg)
        result = {"train_s": [], "eval_s": [], "round_s": result["round_s"], "breakdown": result["breakdown"]}
    else:
        arm = bench.federated_arm(cfg, "inprocess")
        rows = arm["rows"]
        result = {"round_s": arm["round_s"],
                  "train_s": [sum(c["round_s"] for c in r["clients"]) for r in rows[1:]],
                  "eval_s": [r["timing"]["eval_s"] for r in rows[1:]],
                  "breakdown": bench.federated_breakdown(rows, rows[1]["model_bytes"] / 1e6)}
    result["probes"] = probes
    Path(result_path).write_text(json.dumps(result))


def _probe_client_rounds() -> list[dict]:
    """Wrap client_round (where bench and the ClientApp call it): per call, its wall
    time, the local loop's wall time, page faults, context switches and RSS."""
    import resource
    import time

    import hfedmoe.client_round as module
    from hfedmoe import bench
    from hfedmoe.fl import client_app

    probes: list[dict] = []
    original = module.client_round

    def probed(*args, **kwargs):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        upload = original(*args, **kwargs)
        after = resource.getrusage(resource.RUSAGE_SELF)
        probes.append({"round": args[5], "wall_s": round(time.perf_counter() - started, 3),
                       "train_wall_s": round(upload.metrics.get("wall-s", 0.0), 3),
                       "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3),
                       "sys_s": round(after.ru_stime - before.ru_stime, 3),
                       "minflt": after.ru_minflt - before.ru_minflt,
                       "nvcsw": after.ru_nvcsw - before.ru_nvcsw, "nivcsw": after.ru_nivcsw - before.ru_nivcsw,
                       "maxrss_mb": round(after.ru_maxrss / 1024)})
        return upload

    bench.client_round = probed
    client_app.client_round = probed
    return probes


def run_variant(variant: str, cfg) -> dict:
    path = Path(tempfile.mkdtemp(prefix="gap-")) / "r.json"
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(variant, cfg.to_json(), str(path)))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{variant} failed ({process.exitcode})")
    return json.loads(path.read_text())


def main() -> None:
    from hfedmoe.bench import full_config, quick_config

    args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in sys.argv[2:])
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    repeats = int(args.get("repeats", 2))
    variants = args.get("variants", "bare,inprocess,inprocess-nockpt,bare-ckpt").split(",")
    base = (full_config if "default" in args else quick_config)(out)
    base = replace(base, rounds=int(args.get("rounds", 4)), clients=2)
    results: dict[str, list[dict]] = {v: [] for v in variants}
    order = [v for r in range(repeats) for v in (variants if r % 2 == 0 else variants[::-1])]
    for i, variant in enumerate(order):
        cfg = replace(base, out=str(out / f"{variant}-{i}"))
        res = run_variant(variant, cfg)
        results[variant].append(res)
        print(variant, json.dumps({k: res[k] for k in ("round_s", "train_s", "eval_s")}), json.dumps(res["breakdown"]),
              flush=True)
        for probe in res["probes"]:
            print("   ", json.dumps(probe), flush=True)
    print("\nsteady (rounds >= 2) medians over repeats:")
    for variant, runs in results.items():
        def med(key):
            values = [x for r in runs for x in r[key][1:]]
            return round(statistics.median(values), 2) if values else None
        train = [r["breakdown"].get("client_round_s") for r in runs]
        print(f"  {variant:18s} round {med('round_s')} s, client training per round {train}")
    (out / "gap.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
