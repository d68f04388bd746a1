"""Where a local training step's time goes, by experts trained per batch (issue 5).

Runs HFedMoE's local step (hfedmoe.training.train_local's loop body, same calls) on the
embedded model and times its phases:

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
from torch.nn import functional as F

from hfedmoe import core
from hfedmoe.config import RunConfig
from hfedmoe.models import moe_block as moe_layers
from hfedmoe.moe import make_access
from hfedmoe.recipe import build_model, endless, load_client_data
from hfedmoe.training import LocalTrainConfig, hfedmoe_policy, make_optimizer, set_torch_threads

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
    local = LocalTrainConfig()
    policy = hfedmoe_policy(local.select_by)
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
    for _ in range(args.repeats):
        for n in counts:
            optimizer = make_optimizer(model, access, local)
            deferred = n < total_experts
            access.enable_deferred_backward(deferred)
            model.train()
            for step in range(args.steps):
                TIMES.clear()
                t0 = time.perf_counter()
                batch = next(batches)
                mask = batch["attention_mask"]
                logits = model(batch["input_ids"], mask)
                loss = F.cross_entropy(logits, batch["labels"])
                total = loss + local.aux_loss_coef * access.aux_loss()
                t1 = time.perf_counter()
                gates = core.pool_token_scores(access.router_probs(), mask, mode=local.pooling)
                real_tokens = mask.bool()[:, :, None, None]
                dispatch = access.dispatch() & real_tokens
                candidates = dispatch.any(dim=1).any(dim=0)
                s_b = core.importance(gates, lam=local.lam)
                i_b = core.ib_score(gates, lam=local.lam, beta=local.beta)
                from hfedmoe.training import BatchRouting

                selected = policy(BatchRouting(gates, candidates, s_b, i_b, n, step))
                t2 = time.perf_counter()
                params = access.trainable_parameters(selected)
                access.set_selection(selected)
                total.backward(inputs=params)
                t3 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(params, local.max_grad_norm)
                t4 = time.perf_counter()
                with access.freeze_unselected(selected, optimizer):
                    optimizer.step()
                t5 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                for param in access.unselected_expert_parameters(selected):
                    optimizer.state.pop(param, None)
                t6 = time.perf_counter()
                # share of routed token slots that went to selected experts
                share = float((dispatch & selected[None, None]).sum()) / max(1, int(dispatch.sum()))
                if step == 0:
                    continue  # optimizer state allocation, cache warm-up
                row = {"step": t6 - t0, "forward": t1 - t0, "moe_fwd": TIMES["moe_fwd"], "select": t2 - t1,
                       "backward": t3 - t2 - TIMES["recompute_est"], "clip": t4 - t3, "opt": t5 - t4,
                       "zero": t6 - t5, "deferred": TIMES["expert_bwd_total"], "recompute": TIMES["recompute_est"]}
                row["step"] -= TIMES["recompute_est"]  # the side measurement is not part of the step
                rows[n].append(row)
                tokens_selected[n].append(share)
    access.enable_deferred_backward(False)

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
