"""Peak training memory and step time of a fused-expert Mixtral with and without
``--gradient-checkpointing`` (transformers' own, non-reentrant; see
hfedmoe.recipe.models.enable_gradient_checkpointing), for a full budget (plain autograd) and
a constrained one (the deferred expert backward).

Runs hfedmoe.training.train_local (the client's real loop) on a random-weight Mixtral built
from a config (no download), causal-LM loss on random tokens, in float32 on the CPU. Every
allocation of 1 MiB or more gets its own mapping (hfedmoe.training.memory.bound_allocator, what
clients with a memory budget use), so freed activations go back to the kernel and the peak
RSS of each configuration is its own. The configurations are interleaved in ONE process,
``--repeats`` times; each figure is the median over repeats of train_local's peak memory
(weights + peak RSS growth during the round) and of its median step time.

    PYTHONPATH=src python benchmarks/gradient_checkpointing_memory.py [--repeats 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import transformers

from hfedmoe.config import RunConfig
from hfedmoe.models.hf_wrappers import HFCausalLM
from hfedmoe.moe import make_access
from hfedmoe.recipe.models import enable_gradient_checkpointing
from hfedmoe.training import LocalTrainConfig, set_torch_threads, train_local
from hfedmoe.training.memory import bound_allocator, weight_bytes


def build(args) -> HFCausalLM:
    config = transformers.MixtralConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=8, num_local_experts=args.experts, num_experts_per_tok=2,
        max_position_embeddings=max(512, args.seq), use_cache=False)
    torch.manual_seed(0)
    return HFCausalLM(transformers.AutoModelForCausalLM.from_config(config))


def batches(args, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(3, 1000, (args.batch, args.seq), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    set_torch_threads()
    bound_allocator()
    plain, checkpointed = build(args), build(args)
    enable_gradient_checkpointing(RunConfig(), checkpointed)
    access = make_access(plain)
    total = access.num_layers * access.num_experts
    runs = [(f"{budget_name} {'ckpt' if ckpt else 'no-ckpt'}", budget, ckpt)
            for budget_name, budget in (("100%", total), ("25%", max(access.num_layers, total // 4)))
            for ckpt in (False, True)]
    initial = {k: v.clone() for k, v in plain.state_dict().items()}
    print(f"Mixtral L={access.num_layers} E={access.num_experts} hidden={args.hidden} "
          f"intermediate={args.intermediate}, batch {args.batch} x {args.seq}, {args.steps} steps, float32, "
          f"threads {torch.get_num_threads()}, weights {weight_bytes(plain) / 1e6:.0f} MB", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    for repeat in range(args.repeats):
        for key, budget, ckpt in runs:
            model = checkpointed if ckpt else plain
            model.load_state_dict(initial)  # same start for every configuration
            cfg = LocalTrainConfig(local_steps=args.steps, lr=1e-4, task="causal-lm")
            result = train_local(model, batches(args, seed=repeat), budget, cfg)
            entry = results.setdefault(key, {"peak_mb": [], "step_s": [], "loss": []})
            entry["peak_mb"].append(result.peak_mem_bytes / 1e6)
            entry["step_s"].append(result.extra["step_s"])
            entry["loss"].append(result.train_loss)
            print(f"  repeat {repeat}: {key:>12}: budget {budget:3d}, peak {result.peak_mem_bytes / 1e6:.0f} MB, "
                  f"step {result.extra['step_s']:.2f} s, loss {result.train_loss:.6f}", flush=True)
    summary = {k: {m: statistics.median(v) for m, v in entry.items()} for k, entry in results.items()}
    print("\nmedian over repeats:")
    for key, entry in summary.items():
        base = summary[key.replace("ckpt", "no-ckpt") if "no-ckpt" not in key else key]
        print(f"  {key:>12}: peak {entry['peak_mb']:.0f} MB ({entry['peak_mb'] - base['peak_mb']:+.0f} MB), "
              f"step {entry['step_s']:.2f} s ({entry['step_s'] / base['step_s']:.2f}x)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
