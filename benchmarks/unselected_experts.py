"""What ``--unselected-experts freeze`` costs against ``detach``: step time and peak memory
of a constrained client's local round on the embedded model (issue 17).

``detach`` (the deferred backward's original rule) treats the experts a token was routed
to but the client does not train as constants: no weight and no input gradient.
``freeze`` gives them no weight gradient but passes the input gradient through them (the
backward recomputes their activations), so every layer below gets plain autograd's
gradient. Both run HFedMoE's own local loop (``train_local``) on the same batches, at
25% and 50% of the experts (12 and 24 of 48) and, for reference, all 48 (plain autograd:
the two modes coincide there). The settings are interleaved in ONE process so machine
noise hits them alike; medians over the rounds' steps (step 0 dropped). Usage:

    PYTHONPATH=src python benchmarks/unselected_experts.py [--repeats 3] [--steps 5] [--counts 12,24,48]

Final accuracy of each mode comes from federated runs (docs/method.md gives the commands).
"""

from __future__ import annotations

import argparse
import json
import statistics

from hfedmoe.config import RunConfig
from hfedmoe.moe import make_access
from hfedmoe.recipe import build_model, endless, load_client_data
from hfedmoe.training import LocalTrainConfig, set_torch_threads, train_local


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="12,24,48")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    set_torch_threads()
    cfg = RunConfig()
    model = build_model(cfg, pretrained=True)
    state = {k: v.clone() for k, v in make_access(model).state_dict().items()}
    batches = endless(load_client_data(cfg, 0).batches)
    results: dict[tuple[int, str], list[dict]] = {}
    for _ in range(args.repeats):
        for n in counts:
            for mode in ("detach", "freeze"):
                make_access(model).load_state_dict(state)  # every round starts from the same model
                local = LocalTrainConfig(local_steps=args.steps, unselected_experts=mode)
                result = train_local(model, batches, n, local)
                results.setdefault((n, mode), []).append(
                    {"step_s": result.extra["step_s"], "peak_mb": result.peak_mem_bytes / 1e6,
                     "loss": result.train_loss})
    print(f"{'experts':>8} {'mode':>7} {'step s':>8} {'peak MB':>9} {'step vs detach':>15} {'peak vs detach':>15}")
    summary = {}
    for n in counts:
        for mode in ("detach", "freeze"):
            rows = results[(n, mode)]
            summary[f"{n}-{mode}"] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        base = summary[f"{n}-detach"]
        for mode in ("detach", "freeze"):
            row = summary[f"{n}-{mode}"]
            print(f"{n:>8} {mode:>7} {row['step_s']:>8.3f} {row['peak_mb']:>9.1f} "
                  f"{row['step_s'] / base['step_s']:>15.2f} {row['peak_mb'] / base['peak_mb']:>15.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
