"""PNG plots of a comparison (``hfedmoe compare``), drawn from its results.json content.

- accuracy vs round, every method (mean over seeds, band = ± std);
- accuracy vs cumulative bytes uploaded;
- expert usage u_c per client and layer, for HFedMoE (heatmaps);
- fraction of each layer's experts trained per batch (the paper's Fig. 15).

Matplotlib runs on the Agg backend (files only, no display).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.ticker import MaxNLocator  # noqa: E402

from hfedmoe.methods import DEFAULT_METHOD  # noqa: E402


def _mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Per round, mean and std of ``key`` over runs (rounds common to every run)."""
    length = min(len(r[key]) for r in runs)
    columns = [[r[key][i] for r in runs] for i in range(length)]
    means = [statistics.fmean(c) for c in columns]
    stds = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
    return means, stds


def _finished(results: dict) -> list[dict]:
    return [e for e in results["results"] if e["runs"]]


def accuracy_vs_round(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in _finished(results):
        mean, std = _mean_curve(e["runs"], "accuracy")
        rounds = list(range(len(mean)))
        ax.plot(rounds, mean, marker="o", markersize=3, label=e["label"])
        ax.fill_between(rounds, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    target = results["settings"]["target_accuracy"]
    ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy vs round (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_vs_bytes(results: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in _finished(results):
        accuracy, _ = _mean_curve(e["runs"], "accuracy")
        sent, _ = _mean_curve(e["runs"], "cumulative_bytes_up")
        n = min(len(accuracy), len(sent))
        ax.plot([b / 1e6 for b in sent[:n]], accuracy[:n], marker="o", markersize=3, label=e["label"])
    ax.set_xlabel("cumulative MB uploaded by clients")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy vs communication (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def usage_heatmaps(entry: dict, path: Path) -> bool:
    """u_c per client (one panel each): layers x experts, mean over rounds, first seed.

    Returns False (and draws nothing) when the runs recorded no usage.
    """
    run = next((r for r in entry["runs"] if r["usage_per_client"]), None)
    if run is None:
        return False
    clients = sorted(run["usage_per_client"], key=int)
    fig, axes = plt.subplots(1, len(clients), figsize=(3.2 * len(clients) + 1, 3.6), squeeze=False,
                             constrained_layout=True)
    vmax = max(x for c in clients for row in run["usage_per_client"][c] for x in row) or 1.0
    image = None
    for ax, client in zip(axes[0], clients):
        usage = run["usage_per_client"][client]
        image = ax.imshow(usage, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(f"client {client}", fontsize=9)
        ax.set_xlabel("expert")
        if ax is axes[0][0]:
            ax.set_ylabel("MoE layer")
        ax.set_xticks(range(len(usage[0])))
        ax.set_yticks(range(len(usage)))
    fig.colorbar(image, ax=axes[0].tolist(), label="usage u_c (Eq. 16)")
    fig.suptitle(f"{entry['label']}: expert usage per client and layer (seed {run['seed']}, mean over rounds)",
                 fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def selected_per_layer(results: dict, path: Path) -> bool:
    """Grouped bars: per layer, the fraction of its experts trained per batch, per method."""
    entries = [e for e in _finished(results) if e["selected_fraction_per_layer"]]
    if not entries:
        return False
    num_layers = max(len(e["selected_fraction_per_layer"]) for e in entries)
    width = 0.8 / len(entries)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * num_layers + 2), 4.5))
    for i, e in enumerate(entries):
        fractions = e["selected_fraction_per_layer"]
        ax.bar([layer - 0.4 + width * (i + 0.5) for layer in range(len(fractions))], fractions, width=width,
               label=e["label"])
    ax.set_xticks(range(num_layers))
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("fraction of the layer's experts trained per batch")
    ax.set_ylim(0, 1.05)
    ax.set_title("Experts selected per layer (cf. Fig. 15)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_plots(results: dict, out: Path) -> dict[str, str]:
    """Draw every plot into ``out``; returns title -> file name of those drawn."""
    out = Path(out)
    drawn: dict[str, str] = {}
    if not _finished(results):
        return drawn
    accuracy_vs_round(results, out / "accuracy_vs_round.png")
    drawn["accuracy vs round"] = "accuracy_vs_round.png"
    accuracy_vs_bytes(results, out / "accuracy_vs_bytes.png")
    drawn["accuracy vs cumulative bytes up"] = "accuracy_vs_bytes.png"
    # HFedMoE's usage heatmap: the hfedmoe row, or in a sweep the first setting.
    hfedmoe = next((e for e in _finished(results) if e["label"] == DEFAULT_METHOD), None) or \
        next((e for e in _finished(results) if e["method"] == DEFAULT_METHOD), None)
    if hfedmoe is not None and usage_heatmaps(hfedmoe, out / "expert_usage_hfedmoe.png"):
        drawn[f"expert usage per client and layer ({hfedmoe['label']})"] = "expert_usage_hfedmoe.png"
    if selected_per_layer(results, out / "experts_per_layer.png"):
        drawn["fraction of experts selected per layer"] = "experts_per_layer.png"
    return drawn
