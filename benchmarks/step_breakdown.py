"""Where a local training step's time goes, by experts trained per batch (issue 5).

Runs HFedMoE's local round (hfedmoe.training.train_local itself) on the embedded model
and times its phases through the loop's ``on_phase`` hook:

- forward: model forward + loss + aux loss; of which ``moe_fwd`` inside the MoE blocks
- select: pooling, importance, I_b, select_experts
- backward: ``total.backward(inputs=...)``, all of it; of which ``deferred`` is the
  time inside DeferredExperts.backward (selected experts: recomputed forward + their
  backward) and ``recompute`` an estimate of the recomputed forward alone (the same
  expert forwards timed once more on the side, without grad; not counted in the step)
- clip, opt (optimizer.step), zero (zero_grad + state eviction)

The counts are interleaved (48, 24, 12, 6, 48, ...) in ONE process so machine noise
hits them alike; the median over the steps (first step of each round dropped) is
reported. Usage:

    PYTHONPATH=src python benchmarks/step_breakdown.py [--repeats 3] [--steps 4] [--counts 48,24,12,6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

from hfedmoe.config import RunConfig
from hfedmoe.models import moe_block as moe_layers
from hfedmoe.moe import make_access
from hfedmoe.recipe import build_model, endless, load_client_data
from hfedmoe.training import LocalTrainConfig, set_torch_threads, train_local

TIMES: dict[str, float] = defaultdict(float)


def _timed_backward(original):
    """Wrap DeferredExperts.backward: time its recompute forward and its backward."""

    def backward(ctx, grad_out):
        tokens, top_idx = ctx.saved_tensors
        layer = ctx.layer
        start = time.perf_counter()
        out = original(ctx, grad_out)
        TIMES["expert_bwd_total"] += time.perf_counter() - start
        # recompute alone (no backward), measured on the side: forward of the selected experts
        with torch.no_grad():
            start = time.perf_counter()
            for e in layer.selected.nonzero().flatten().tolist():
                token_idx, _ = (top_idx == e).nonzero(as_tuple=True)
                if token_idx.numel():
                    expert = layer.experts[e]
                    if hasattr(moe_layers, "expert_backward"):  # recomputes fc1 + activation only
                        moe_layers.ACTIVATIONS[expert.activation](expert.fc1(tokens[token_idx]))
                    else:
                        expert(tokens[token_idx])
            TIMES["recompute_est"] += time.perf_counter() - start
        return out

    return backward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="48,24,12,6")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

    set_torch_threads()
    cfg = RunConfig()
    model = build_model(cfg, pretrained=False)
    access = make_access(model)
    batches = endless(load_client_data(cfg, 0).batches)
    local = LocalTrainConfig(local_steps=args.steps)
    total_experts = access.num_layers * access.num_experts
    moe_layers.DeferredExperts.backward = staticmethod(_timed_backward(moe_layers.DeferredExperts.backward))

    moe_start: dict[int, float] = {}

    def pre(module, _inputs):
        moe_start[id(module)] = time.perf_counter()

    def post(module, _inputs, _output):
        TIMES["moe_fwd"] += time.perf_counter() - moe_start.pop(id(module))

    for layer in access.layers:
        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)

    rows: dict[int, list[dict]] = {n: [] for n in counts}
    tokens_selected: dict[int, list[float]] = {n: [] for n in counts}
    marks: dict[str, float] = {}

    def on_phase(phase: str, step: int, batch, selected) -> None:
        marks[phase] = time.perf_counter()
        if phase == "start":
            TIMES.clear()
            return
        if phase != "zero" or step == 0:  # step 0: optimizer state allocation, cache warm-up
            return
        # share of routed token slots (real tokens) that went to selected experts
        dispatch = access.dispatch() & batch["attention_mask"].bool()[:, :, None, None]
        tokens_selected[current].append(float((dispatch & selected[None, None]).sum()) / max(1, int(dispatch.sum())))
        t = marks
        row = {"step": t["zero"] - t["start"], "forward": t["forward"] - t["start"], "moe_fwd": TIMES["moe_fwd"],
               "select": t["select"] - t["forward"],
               "backward": t["backward"] - t["select"] - TIMES["recompute_est"], "clip": t["clip"] - t["backward"],
               "opt": t["optimizer"] - t["clip"], "zero": t["zero"] - t["optimizer"],
               "deferred": TIMES["expert_bwd_total"], "recompute": TIMES["recompute_est"]}
        row["step"] -= TIMES["recompute_est"]  # the side measurement is not part of the step
        rows[current].append(row)

    current = counts[0]
    for _ in range(args.repeats):
        for n in counts:
            current = n
            # the client's real loop: deferred backward when n < all experts, AdamW built per round
            train_local(model, batches, n, local, on_phase=on_phase)

    full = max(counts)
    result = {}
    for n in counts:
        med = {k: statistics.median(r[k] for r in rows[n]) for k in rows[n][0]}
        med["token_share_selected"] = statistics.mean(tokens_selected[n])
        result[n] = med
    keys = ["step", "forward", "moe_fwd", "select", "backward", "deferred", "recompute", "clip", "opt", "zero"]
    print(f"{'experts':>8} {'share':>6} " + " ".join(f"{k:>15}" for k in keys) + f" {'vs full':>8} {'tok sel':>8}")
    for n in counts:
        med = result[n]
        print(f"{n:>8} {n / total_experts:>6.1%} " + " ".join(f"{med[k]:>15.3f}" for k in keys)
              + f" {med['step'] / result[full]['step']:>8.2f} {med['token_share_selected']:>8.2f}")
    print(json.dumps({str(n): v for n, v in result.items()}))


if __name__ == "__main__":
    main()
