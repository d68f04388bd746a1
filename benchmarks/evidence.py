"""Issue 17's evidence: every method, 3 seeds, a hard heterogeneity setting, on the
specialised and the upcycled start; then the figures a reviewer asks for.

    # run (resumable: rerun the same command; finished runs are kept)
    PYTHONPATH=src python benchmarks/evidence.py run specialised-hard --out runs/evidence --seeds 0,1,2
    # tables, paired comparison and where-it-loses figures -> <out>/<setting>/evidence.{md,json}
    PYTHONPATH=src python benchmarks/evidence.py report specialised-hard --out runs/evidence

``run`` calls ``hfedmoe compare`` once per seed (all methods of that seed first, so a cut
run leaves whole seeds) and once more per seed for HFedMoE with the other
``--unselected-experts``. ``report`` reads their results.json and the runs' metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

METHODS = "hfedmoe,fedavg-full,fedavg,pfl-moe,fedmoe,seer-moe,flame,random"
BUDGET_RESPECTING = ("fedavg", "pfl-moe", "fedmoe", "seer-moe", "flame", "random")
# 8 clients, Dirichlet 0.1, seven of eight below full fine-tuning (L x S = 48 experts)
HARD = ["--clients", "8", "--alpha", "0.1", "--expert-budgets", "6,6,8,12,12,16,24,48", "--rounds", "6",
        "--local-steps", "4", "--max-length", "32", "--batch-size", "16", "--engine", "inprocess",
        "--evaluation", "both"]  # both: the server's test split, and each client's own share (per-client accuracy)
SETTINGS = {
    "specialised-hard": ["--model", "embedded-minilm-moe-specialised", *HARD],
    "upcycled-hard": ["--model", "embedded-minilm-moe", *HARD],
}
TARGET_SHARE = 0.95  # rounds to 95% of fedavg-full's final accuracy (same seed)


def run(setting: str, out: Path, seeds: list[int]) -> None:
    flags = SETTINGS[setting]
    for seed in seeds:
        base = [sys.executable, "-m", "hfedmoe.cli", "compare", *flags, "--seed", str(seed), "--seeds", "1"]
        jobs = [(out / setting / f"seed-{seed}" / "methods", ["--methods", METHODS]),
                (out / setting / f"seed-{seed}" / "freeze", ["--sweep", "unselected_experts=freeze"])]
        for directory, extra in jobs:
            print(f"== {setting} seed {seed}: {' '.join(extra)} -> {directory}", flush=True)
            subprocess.run([*base, *extra, "--out", str(directory)], check=False)


def _runs(out: Path, setting: str) -> dict[str, dict[int, dict]]:
    """label -> seed -> that run's record in its compare's results.json."""
    found: dict[str, dict[int, dict]] = {}
    for results in sorted((out / setting).glob("seed-*/*/results.json")):
        for row in json.loads(results.read_text())["results"]:
            label = "hfedmoe (freeze)" if row["label"].startswith("unselected_experts=") else row["label"]
            for r in row["runs"]:
                found.setdefault(label, {})[r["seed"]] = r
    return found


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else float("nan")


def usage_similarity(run_dir: Path) -> float:
    """Mean pairwise cosine similarity of the clients' expert usage u_c (all rounds pooled)."""
    usage: dict[int, list[float]] = {}
    for row in _rows(run_dir)[1:]:
        for c in row.get("clients", []):
            flat = [x for layer in c["usage"] for x in layer]
            usage[c["id"]] = [a + b for a, b in zip(usage[c["id"]], flat)] if c["id"] in usage else flat
    ids = sorted(usage)
    pairs = [_cosine(usage[i], usage[j]) for n, i in enumerate(ids) for j in ids[n + 1:]]
    return statistics.mean(pairs) if pairs else float("nan")


def per_client_accuracy(run_dir: Path) -> dict[str, float]:
    """Each client's accuracy on its own share of the test split, after the last round."""
    last = _rows(run_dir)[-1].get("federated") or {}
    return {pid: c["accuracy"] for pid, c in (last.get("per_client") or {}).items()}


def trained_token_share(run_dir: Path) -> float:
    """Mean over client-rounds of the share of routed token slots that went to experts the
    client trained that round (activation frequency summed over trained experts / top-k)."""
    shares = []
    for row in _rows(run_dir)[1:]:
        for c in row.get("clients", []):
            if not c.get("activation"):
                continue
            counts, act = c["selection_counts"], c["activation"]
            per_layer = [sum(a for a, n in zip(act[l], counts[l]) if n > 0) / max(1e-12, sum(act[l]))
                         for l in range(len(act))]
            shares.append(statistics.mean(per_layer))
    return statistics.mean(shares) if shares else float("nan")


def report(setting: str, out: Path) -> dict:
    runs = _runs(out, setting)
    if "fedavg-full" not in runs:
        raise SystemExit(f"no fedavg-full runs under {out / setting}: run first")
    seeds = sorted(runs["fedavg-full"])
    target = {s: TARGET_SHARE * runs["fedavg-full"][s]["final_accuracy"] for s in seeds}
    table = {}
    for label, by_seed in runs.items():
        finished = [s for s in seeds if s in by_seed]
        final = [by_seed[s]["final_accuracy"] for s in finished]
        best = [by_seed[s]["best_accuracy"] for s in finished]
        to_target = []
        for s in finished:
            hit = [r for r, a in zip(by_seed[s]["rounds"], by_seed[s]["accuracy"]) if r > 0 and a >= target[s]]
            to_target.append(hit[0] if hit else None)
        dirs = [Path(by_seed[s]["run_dir"]) for s in finished]
        table[label] = {
            "seeds": finished, "final": _mean_std(final), "best": _mean_std(best), "final_values": final,
            "rounds_to_target": to_target,
            "mb_up": statistics.mean(by_seed[s]["bytes_up"] for s in finished) / 1e6,
            "experts_per_batch": statistics.mean(by_seed[s]["experts_trained_mean"] for s in finished),
            "budget_violations": sum(by_seed[s]["budget_violations"] for s in finished),
            "failed_client_rounds": sum(by_seed[s]["failed_client_rounds"] for s in finished),
            # every client-round, trained or failed
            "client_rounds": sum(by_seed[s]["client_rounds"] + by_seed[s]["failed_client_rounds"] for s in finished),
            "usage_similarity": statistics.mean(usage_similarity(d) for d in dirs),
            "trained_token_share": statistics.mean(trained_token_share(d) for d in dirs),
            "per_client_accuracy": {str(s): per_client_accuracy(d) for s, d in zip(finished, dirs)},
        }
    respecting = [m for m in BUDGET_RESPECTING if m in table and table[m]["seeds"] == seeds]
    best_baseline = max(respecting, key=lambda m: table[m]["final"][0]) if respecting else None
    paired = None
    if best_baseline and "hfedmoe" in table and table["hfedmoe"]["seeds"] == seeds:
        diffs = [a - b for a, b in zip(table["hfedmoe"]["final_values"], table[best_baseline]["final_values"])]
        mean, std = _mean_std(diffs)
        t = mean / (std / math.sqrt(len(diffs))) if std > 0 and len(diffs) > 1 else float("nan")
        paired = {"baseline": best_baseline, "differences": diffs, "mean": mean, "std": std, "t": t,
                  "hfedmoe_wins": sum(d > 0 for d in diffs), "seeds": len(diffs)}
    result = {"setting": setting, "flags": SETTINGS.get(setting), "seeds": seeds, "target_share": TARGET_SHARE,
              "targets": target, "methods": table, "paired": paired}
    plot_curves(runs, seeds, out / setting / "accuracy_vs_round.png", setting)
    (out / setting / "evidence.json").write_text(json.dumps(result, indent=1))
    (out / setting / "evidence.md").write_text(markdown(result))
    print(markdown(result))
    return result


def plot_curves(runs: dict[str, dict[int, dict]], seeds: list[int], path: Path, title: str) -> None:
    """Test accuracy per round, mean over the seeds with a band of one standard deviation."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, by_seed in sorted(runs.items()):
        curves = [by_seed[s]["accuracy"] for s in seeds if s in by_seed]
        if not curves:
            continue
        length = min(map(len, curves))
        mean = [statistics.mean(c[r] for c in curves) for r in range(length)]
        std = [statistics.stdev(c[r] for c in curves) if len(curves) > 1 else 0.0 for r in range(length)]
        style = "-" if label.startswith("hfedmoe") else "--"
        line, = ax.plot(range(length), mean, style, marker="o", markersize=3, label=f"{label} ({len(curves)})")
        ax.fill_between(range(length), [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color=line.get_color(), alpha=0.12)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [f"### {result['setting']}: {len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))})", "",
             "| method (seeds) | final accuracy | best accuracy | rounds to 95% of fedavg-full | MB up | experts / batch "
             "| budget violations | failed client-rounds | client usage similarity | token share of trained experts |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, m in sorted(result["methods"].items(), key=lambda kv: -kv[1]["final"][0]):
        reached = [r for r in m["rounds_to_target"] if r is not None]
        rounds = (f"{statistics.mean(reached):.1f} ({len(reached)}/{len(m['rounds_to_target'])})" if reached
                  else f"— (0/{len(m['rounds_to_target'])})")
        lines.append(f"| {label} ({len(m['seeds'])}) | {m['final'][0]:.4f} ± {m['final'][1]:.4f} | {m['best'][0]:.4f} ± {m['best'][1]:.4f} "
                     f"| {rounds} | {m['mb_up']:.0f} | {m['experts_per_batch']:.1f} | {m['budget_violations']} "
                     f"| {m['failed_client_rounds']} / {m['client_rounds']} | {m['usage_similarity']:.3f} "
                     f"| {m['trained_token_share']:.3f} |")
    p = result["paired"]
    if p:
        lines += ["", f"Paired by seed, HFedMoE minus {p['baseline']} (the best budget-respecting baseline by mean "
                      f"final accuracy): {', '.join(f'{d:+.4f}' for d in p['differences'])}; mean {p['mean']:+.4f} "
                      f"± {p['std']:.4f}, t = {p['t']:.2f} over {p['seeds']} seeds; HFedMoE higher in "
                      f"{p['hfedmoe_wins']} of {p['seeds']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "report"))
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--out", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    if args.action == "run":
        run(args.setting, args.out, [int(s) for s in args.seeds.split(",")])
    else:
        report(args.setting, args.out)


if __name__ == "__main__":
    main()
