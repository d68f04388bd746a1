"""The specialised starting point: its build figures and how each topic's tokens spread
over the experts before (upcycled: copies of one FFN, a new router) and after
specialisation (hfedmoe.recipe.specialise). Builds it first if it is not cached.

    PYTHONPATH=src python benchmarks/specialised_model.py [--out docs/results]

Writes ``specialised_usage.png`` (per layer, topics x experts, before | after) and prints
the figures of the build (build time, a topic's own-expert share before and after).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from hfedmoe.config import SPECIALISED_MODEL, RunConfig  # noqa: E402
from hfedmoe.recipe import build_model  # noqa: E402
from hfedmoe.recipe.specialise import cache_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    args = parser.parse_args()
    path = cache_path(args.num_experts, args.top_k)
    if not path.is_file():
        build_model(RunConfig(model=SPECIALISED_MODEL, num_experts=args.num_experts, top_k=args.top_k),
                    pretrained=True)
    figures = json.loads(path.with_suffix(".json").read_text())
    print(json.dumps({k: v for k, v in figures.items() if not k.startswith("usage")}, indent=1))
    before, after, topics = figures["usage_before"], figures["usage_after"], figures["topics"]
    layers = len(before[0])
    fig, axes = plt.subplots(2, layers, figsize=(2.2 * layers, 4.6), squeeze=False)
    top = max(max(max(row) for row in topic) for topic in before + after)
    for row, (name, usage) in enumerate((("before", before), ("after", after))):
        for layer in range(layers):
            ax = axes[row][layer]
            image = ax.imshow([usage[t][layer] for t in range(len(topics))], vmin=0, vmax=top, cmap="viridis")
            ax.set_title(f"{name}, layer {layer}", fontsize=8)
            ax.set_xticks(range(len(usage[0][layer])))
            ax.set_yticks(range(len(topics)))
            ax.set_yticklabels(topics if layer == 0 else [], fontsize=7)
            ax.tick_params(axis="x", labelsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="share of a topic's tokens dispatched to the expert")
    fig.suptitle("Expert usage per topic (public share), upcycled vs specialised start", fontsize=9)
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / "specialised_usage.png", dpi=110)
    print(f"wrote {args.out / 'specialised_usage.png'}")


if __name__ == "__main__":
    main()
