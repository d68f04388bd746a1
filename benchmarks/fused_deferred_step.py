"""Step time and peak memory of a fused-expert (transformers 5.x) Mixtral by experts trained
per batch, plain autograd vs the deferred expert backward (hfedmoe.moe.fused_deferred).

Runs hfedmoe.training.train_local (the client's real loop) on a random-weight Mixtral built
from a config (no download), causal-LM loss on random tokens. Budgets 100%, 50%, 25% of
the L x E experts; each constrained budget with ``deferred_backward`` on and off. The
configurations are interleaved in ONE process, ``--repeats`` times, so machine noise
hits them alike; each figure is the median over repeats of train_local's median step
time (its first step dropped) and of its peak memory (weights + peak RSS growth).

    PYTHONPATH=src python benchmarks/fused_deferred_step.py [--repeats 3] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import transformers

from hfedmoe.models.hf_wrappers import HFCausalLM
from hfedmoe.moe import make_access
from hfedmoe.training import LocalTrainConfig, set_torch_threads, train_local


def build(args) -> HFCausalLM:
    config = transformers.MixtralConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=8, num_local_experts=args.experts, num_experts_per_tok=2,
        max_position_embeddings=512)
    torch.manual_seed(0)
    return HFCausalLM(transformers.AutoModelForCausalLM.from_config(config))


def batches(args, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(3, 1000, (args.batch, args.seq), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    set_torch_threads()
    model = build(args)
    access = make_access(model)
    total = access.num_layers * access.num_experts
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [("100%", total, False)]
    for name, fraction in (("50%", 0.5), ("25%", 0.25)):
        for deferred in (False, True):
            runs.append((name, max(access.num_layers, int(total * fraction)), deferred))
    results: dict[str, dict[str, list[float]]] = {}
    print(f"Mixtral L={access.num_layers} E={access.num_experts} hidden={args.hidden} "
          f"intermediate={args.intermediate}, batch {args.batch} x {args.seq}, {args.steps} steps, "
          f"threads {torch.get_num_threads()}", flush=True)
    for repeat in range(args.repeats):
        for name, budget, deferred in runs:
            model.load_state_dict(initial)  # same start for every configuration
            cfg = LocalTrainConfig(local_steps=args.steps, lr=1e-4, task="causal-lm", deferred_backward=deferred)
            result = train_local(model, batches(args, seed=repeat), budget, cfg)
            key = f"{name} {'deferred' if deferred else 'autograd'}"
            entry = results.setdefault(key, {"step_s": [], "peak_mb": [], "experts_per_batch": []})
            entry["step_s"].append(result.extra["step_s"])
            entry["peak_mb"].append(result.peak_mem_bytes / 1e6)
            entry["experts_per_batch"].append(result.experts_trained_mean)
            print(f"  repeat {repeat}: {key:>14}: budget {budget:3d}, step {result.extra['step_s']:.3f} s, "
                  f"peak {result.peak_mem_bytes / 1e6:.0f} MB, {result.experts_trained_mean:.1f} experts/batch",
                  flush=True)
    summary = {k: {m: statistics.median(v) for m, v in entry.items()} for k, entry in results.items()}
    full = summary["100% autograd"]["step_s"]
    print("\nmedian over repeats (step time relative to 100%):")
    for key, entry in summary.items():
        print(f"  {key:>14}: step {entry['step_s']:.3f} s ({entry['step_s'] / full:.2f}x), "
              f"peak {entry['peak_mb']:.0f} MB, {entry['experts_per_batch']:.1f} experts/batch")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
