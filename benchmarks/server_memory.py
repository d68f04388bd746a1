"""What the server holds per client of a round: peak RSS and the bytes of the replies it
holds at aggregation, for federations of different sizes and clients per round.

Each case runs in a fresh process (its own VmHWM) with the in-process engine
(hfedmoe.fl.inprocess.run_inprocess: the real ServerApp/ClientApp code, no Ray).
There the clients train in the server's process, so VmHWM is the peak of server and
one training client together; the server's own share is measured at aggregation:

- ``reply_bytes``: the array bytes of the replies Flower hands to ``aggregate_train``
  (``grid.send_and_receive`` returns a round's replies at once, and
  ``Strategy.start`` keeps that list alive while aggregate_train runs);
- ``rss_at_aggregate`` / ``rss_after_aggregate``: VmRSS when aggregate_train starts
  (every reply of the round held) and when it returns (the new global state built);
- ``vmhwm``: the process's peak RSS over the whole run.

Usage (the figures of the sampling report)::

    PYTHONPATH=src python benchmarks/server_memory.py 10:10 100:10 16:4 16:16

Each ``N:K`` is ``--clients N --clients-per-round K`` on the embedded model with
``--rounds 1 --local-steps 2 --batch-size 4 --max-length 32``. The cases run side by
side, each in its own process (VmHWM is per process, so they do not mix).
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
import sys
import tempfile
import time


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def one_case(clients: int, per_round: int, out: str) -> dict:
    """Run one shrunken federation in this process and return its memory figures."""
    from hfedmoe.config import RunConfig
    from hfedmoe.fl.inprocess import run_inprocess
    from hfedmoe.fl.strategy import HFedMoE

    rounds: list[dict] = []
    real = HFedMoE.aggregate_train

    def measured(self, server_round, replies):
        replies = list(replies)
        held = sum(len(a.data) for m in replies if not m.has_error() and "arrays" in m.content
                   for a in m.content["arrays"].values())
        entry = _status("VmRSS")
        result = real(self, server_round, replies)
        rounds.append({"round": server_round, "replies": len(replies), "reply_bytes": held,
                       "rss_at_aggregate": entry, "rss_after_aggregate": _status("VmRSS")})
        return result

    HFedMoE.aggregate_train = measured
    cfg = RunConfig(clients=clients, clients_per_round=per_round, rounds=1, local_steps=2, batch_size=4,
                    max_length=32, out=out).validate()
    started = time.perf_counter()
    run_inprocess(cfg)
    return {"clients": clients, "clients_per_round": per_round, "wall_s": round(time.perf_counter() - started, 1),
            "vmhwm": _status("VmHWM"), "rounds": rounds}


def _run_case(case: str) -> dict:
    clients, per_round = (int(x) for x in case.split(":"))
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, __file__, "--one", str(clients), str(per_round), out + "/run"],
                              capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(cases: list[str]) -> None:
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(_run_case, cases))
    for result in results:
        last = result["rounds"][-1]
        print(f"{result['clients']:4d} clients, {result['clients_per_round']:3d} per round: VmHWM "
              f"{result['vmhwm'] / 2**20:7.1f} MiB, replies held {last['replies']} = "
              f"{last['reply_bytes'] / 2**20:6.1f} MiB, RSS at aggregate {last['rss_at_aggregate'] / 2**20:7.1f} MiB, "
              f"after {last['rss_after_aggregate'] / 2**20:7.1f} MiB, {result['wall_s']} s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one_case(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
    else:
        main(sys.argv[1:])
