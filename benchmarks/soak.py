"""A soak: 30+ rounds with faults injected at random (seeded), against the same run without.

Faults, drawn with ``random.Random(seed)``: client crashes, clients slower than
``--round-timeout`` (their replies are late and dropped), destructive updates (a delta
x 1000 or noise of the weights' scale: the norm screen must reject them), and one
server kill after a random round, after which the run is resumed from its checkpoint.
It runs on the in-process engine (the real ServerApp/ClientApp code; a kill there is
the end of the process's run, the resume a new one on the same run directory), on a
shrunken embedded config.

Prints faults injected and survived, rounds lost (target 0: a round with no usable
update, or missing from metrics.jsonl), and the final accuracy with and without
faults; the JSON summary is the last line.

Usage::

    PYTHONPATH=src python benchmarks/soak.py [--rounds 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

CLIENTS = 4
TIMEOUT_S = 20.0  # --round-timeout; a slow client sleeps 1.5x this


def draw_faults(rounds: int, seed: int) -> dict:
    """Per round at most one fault of each client kind; about one round in three has one."""
    rng = random.Random(seed)
    crash, slow, hostile = [], [], []
    for r in range(1, rounds + 1):
        roll = rng.random()
        client = rng.randrange(CLIENTS)
        if roll < 0.12:
            crash.append((client, r))
        elif roll < 0.22:
            slow.append((client, r))
        elif roll < 0.34:
            hostile.append((client, r, rng.choice(["scale", "noise"])))
    kill_after = rng.randrange(rounds // 3, 2 * rounds // 3)
    return {"crash": crash, "slow": slow, "hostile": hostile, "kill_after": kill_after}


def settings(rounds: int, out: str, **changes):
    from hfedmoe.config import RunConfig

    return RunConfig(rounds=rounds, clients=CLIENTS, local_steps=2, batch_size=8, max_length=32, num_experts=4,
                     test_fraction=0.05, eval_batch_size=128, round_timeout=TIMEOUT_S, max_empty_rounds=0,
                     out=out, **changes).validate()


def run(rounds: int, out: str, faults: dict | None) -> list[dict]:
    from hfedmoe.fl.inprocess import run_inprocess

    env = {"HFEDMOE_INJECT_CRASH": "", "HFEDMOE_INJECT_DELAY": "", "HFEDMOE_INJECT_UPDATE": ""}
    if faults:
        env["HFEDMOE_INJECT_CRASH"] = ",".join(f"{c}@{r}" for c, r in faults["crash"])
        env["HFEDMOE_INJECT_DELAY"] = ",".join(f"{c}@{r}:{1.5 * TIMEOUT_S}" for c, r in faults["slow"])
        env["HFEDMOE_INJECT_UPDATE"] = ",".join(f"{c}@{r}:{k}" for c, r, k in faults["hostile"])
    os.environ.update(env)
    if faults:  # the server dies after round k (checkpointed) and is started again with --resume
        run_inprocess(settings(faults["kill_after"], out))
        run_inprocess(settings(rounds, out, resume=True))
    else:
        run_inprocess(settings(rounds, out))
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    faults = draw_faults(args.rounds, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        rows = run(args.rounds, os.path.join(tmp, "faults"), faults)
        faulty_s = time.perf_counter() - started
        started = time.perf_counter()
        clean = run(args.rounds, os.path.join(tmp, "clean"), None)
        clean_s = time.perf_counter() - started
    os.environ.update({"HFEDMOE_INJECT_CRASH": "", "HFEDMOE_INJECT_DELAY": "", "HFEDMOE_INJECT_UPDATE": ""})

    by_round = {r["round"]: r for r in rows}
    lost = [r for r in range(1, args.rounds + 1) if r not in by_round or not by_round[r]["clients"]]
    seen = {(f.get("id"), r["round"]) for r in rows for f in r["failures"]}
    expected = [(c, r) for c, r in faults["crash"]] + [(c, r) for c, r in faults["slow"]] + \
        [(c, r) for c, r, _ in faults["hostile"]]
    caught = [x for x in expected if x in seen]
    rejected = sum(1 for r in rows for f in r["failures"] if f.get("kind") == "rejected-update")
    honest_dropped = sorted(seen - set(expected))
    summary = {
        "rounds": args.rounds, "seed": args.seed,
        "faults_injected": len(expected) + 1, "crashes": len(faults["crash"]), "slow": len(faults["slow"]),
        "destructive": len(faults["hostile"]), "server_kill_after_round": faults["kill_after"],
        "client_faults_recorded": len(caught), "destructive_rejected": rejected,
        "honest_client_rounds_dropped": len(honest_dropped), "rounds_lost": len(lost),
        "final_accuracy": rows[-1]["accuracy"], "final_accuracy_without_faults": clean[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rows),
        "best_accuracy_without_faults": max(r["accuracy"] for r in clean),
        "wall_s": round(faulty_s, 1), "wall_s_without_faults": round(clean_s, 1),
    }
    print(f"faults injected: {summary['faults_injected']} ({summary['crashes']} crashes, {summary['slow']} late "
          f"clients, {summary['destructive']} destructive updates, 1 server kill after round {faults['kill_after']})")
    print(f"client faults recorded as failures: {len(caught)}/{len(expected)}; destructive updates rejected: "
          f"{rejected}/{len(faults['hostile'])}; honest client-rounds dropped: {len(honest_dropped)}")
    print(f"rounds lost: {len(lost)} {lost if lost else ''}")
    print(f"final accuracy {summary['final_accuracy']:.4f} with faults, {summary['final_accuracy_without_faults']:.4f} "
          f"without (best {summary['best_accuracy']:.4f} / {summary['best_accuracy_without_faults']:.4f}); "
          f"{summary['wall_s']} s / {summary['wall_s_without_faults']} s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
