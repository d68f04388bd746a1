"""One destructive client among four on the embedded default: accuracy after the round with
each defence, against the same round with that client honest.

Each case is one round (``--rounds R``, default 1) of the embedded default workload
(4 clients x 10 local steps, batch 16 x 64 tokens) in the in-process engine, client 3's
update replaced in every round by its delta x 1000 ("scale") or by noise of the weights'
scale ("noise") through the test-only HFEDMOE_INJECT_UPDATE hook. Prints one line per
case and a JSON list last.

Usage::

    PYTHONPATH=src python benchmarks/hostile_updates.py [--rounds 1] [--only TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

CASES = [  # (name, injected update, settings); "crash" = the round without client 3
    ("honest, default (norm screen 10x)", "", {}),
    ("client 3 absent (crashed)", "crash", {}),
    ("scale, norm screen", "3@*:scale", {}),
    ("noise, norm screen", "3@*:noise", {}),
    ("scale, no defence", "3@*:scale", {"norm_screen": 0}),
    ("noise, no defence", "3@*:noise", {"norm_screen": 0}),
    ("honest, trimmed-mean", "", {"norm_screen": 0, "robust_agg": "trimmed-mean"}),
    ("scale, trimmed-mean", "3@*:scale", {"norm_screen": 0, "robust_agg": "trimmed-mean"}),
    ("noise, trimmed-mean", "3@*:noise", {"norm_screen": 0, "robust_agg": "trimmed-mean"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default="", help="run only the cases whose name contains this text")
    args = parser.parse_args()
    from hfedmoe.config import RunConfig
    from hfedmoe.fl.inprocess import run_inprocess

    results = []
    for name, inject, settings in CASES:
        if args.only not in name:
            continue
        os.environ["HFEDMOE_INJECT_UPDATE"] = "" if inject == "crash" else inject
        os.environ["HFEDMOE_INJECT_CRASH"] = "3@*" if inject == "crash" else ""
        with tempfile.TemporaryDirectory() as out:
            cfg = RunConfig(rounds=args.rounds, out=out + "/run", **settings).validate()
            started = time.perf_counter()
            run_inprocess(cfg)
            rows = [json.loads(line) for line in open(out + "/run/metrics.jsonl")]
        last = rows[-1]
        rejected = sum(1 for r in rows for f in r["failures"] if f.get("kind") == "rejected-update")
        results.append({"case": name, "accuracy": last["accuracy"], "loss": last["loss"],
                        "rejected_client_rounds": rejected, "wall_s": round(time.perf_counter() - started, 1)})
        print(f"{name:36s} accuracy {last['accuracy']:.4f} loss {last['loss']:.4f} rejected {rejected} "
              f"({results[-1]['wall_s']} s)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
