"""Issue 17's evidence: every method, 3 seeds, a hard heterogeneity setting, on the
specialised and the upcycled start; then the figures a reviewer asks for.

    # run (resumable: rerun the same command; finished runs are kept)
    PYTHONPATH=src python benchmarks/evidence.py run specialised-hard --out runs/evidence --seeds 0,1,2
    # tables, paired comparison and where-it-loses figures -> <out>/<setting>/evidence.{md,json}
    PYTHONPATH=src python benchmarks/evidence.py report specialised-hard --out runs/evidence
    # copy the records a report needs (no checkpoints) into the committed folder
    PYTHONPATH=src python benchmarks/evidence.py pack specialised-hard --out runs/evidence --to docs/results/evidence

``run`` calls ``hfedmoe compare`` once per seed (all methods of that seed first, so a cut
run leaves whole seeds) and once more per seed for HFedMoE with the other
``--unselected-experts``. ``report`` reads their results.json and the runs' metrics.jsonl
(from the run directory, or from the packed copy beside results.json). ``pack`` copies
each compare's results and plots and each run's config.json, summary.json and
metrics.jsonl, without checkpoints, so a committed folder can be reported on and resumed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
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
        "--evaluation", "both",  # both: the server's test split, and each client's own share (per-client accuracy)
        # every method as first measured (detach was the default then); the second job of a
        # seed sweeps HFedMoE to freeze (the default since)
        "--unselected-experts", "detach"]
SETTINGS = {
    "specialised-hard": ["--model", "embedded-minilm-moe-specialised", *HARD],
    "upcycled-hard": ["--model", "embedded-minilm-moe", *HARD],
}
TARGET_SHARE = 0.95  # rounds to 95% of fedavg-full's final accuracy (same seed)


def run(setting: str, out: Path, seeds: list[int], methods: str = METHODS) -> None:
    flags = SETTINGS[setting]
    for seed in seeds:
        base = [sys.executable, "-m", "hfedmoe.cli", "compare", *flags, "--seed", str(seed), "--seeds", "1"]
        jobs = [(out / setting / f"seed-{seed}" / "methods", ["--methods", methods]),
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
                found.setdefault(label, {})[r["seed"]] = {**r, "logs": _run_dir(results, r["run_dir"])}
    return found


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run_dir(results: Path, recorded: str) -> Path | None:
    """The run's directory: where compare wrote it, or its packed copy beside results.json
    (compare lays runs out as <compare dir>/runs/<label>/seed-<s>); None when neither has logs."""
    for candidate in (Path(recorded), results.parent.joinpath(*Path(recorded).parts[-3:])):
        if (candidate / "metrics.jsonl").exists():
            return candidate
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else float("nan")


def usage_similarity(record: dict) -> float:
    """Mean pairwise cosine similarity of the clients' expert usage u_c (all rounds pooled).

    From compare's per-client usage (the mean over rounds: the same direction as the sum)."""
    usage = {pid: [x for layer in u for x in layer] for pid, u in record["usage_per_client"].items()}
    ids = sorted(usage)
    pairs = [_cosine(usage[i], usage[j]) for n, i in enumerate(ids) for j in ids[n + 1:]]
    return statistics.mean(pairs) if pairs else float("nan")


def per_client_accuracy(run_dir: Path | None) -> dict[str, float]:
    """Each client's accuracy on its own share of the test split, after the last round."""
    if run_dir is None:
        return {}
    last = _rows(run_dir)[-1].get("federated") or {}
    return {pid: c["accuracy"] for pid, c in (last.get("per_client") or {}).items()}


def trained_token_share(run_dir: Path | None) -> float:
    """Mean over client-rounds of the share of routed token slots that went to experts the
    client trained that round (activation frequency summed over trained experts / top-k)."""
    if run_dir is None:
        return float("nan")
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
    # A run whose logs are gone keeps the per-client accuracy an earlier report read from them.
    earlier_path = out / setting / "evidence.json"
    earlier = json.loads(earlier_path.read_text())["methods"] if earlier_path.exists() else {}
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
        logs = [by_seed[s]["logs"] for s in finished]
        shares = [v for v in (trained_token_share(d) for d in logs) if not math.isnan(v)]
        table[label] = {
            "seeds": finished, "final": _mean_std(final), "best": _mean_std(best), "final_values": final,
            "rounds_to_target": to_target,
            "mb_up": statistics.mean(by_seed[s]["bytes_up"] for s in finished) / 1e6,
            "experts_per_batch": statistics.mean(by_seed[s]["experts_trained_mean"] for s in finished),
            "budget_violations": sum(by_seed[s]["budget_violations"] for s in finished),
            "failed_client_rounds": sum(by_seed[s]["failed_client_rounds"] for s in finished),
            # every client-round, trained or failed
            "client_rounds": sum(by_seed[s]["client_rounds"] + by_seed[s]["failed_client_rounds"] for s in finished),
            "usage_similarity": statistics.mean(usage_similarity(by_seed[s]) for s in finished),
            # needs the runs' logs: over the seeds whose metrics.jsonl is at hand
            "trained_token_share": statistics.mean(shares) if shares else float("nan"),
            "trained_token_share_seeds": len(shares),
            "per_client_accuracy": {
                str(s): per_client_accuracy(d) if d else earlier.get(label, {}).get("per_client_accuracy", {}).get(str(s), {})
                for s, d in zip(finished, logs)},
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


def pack(setting: str, out: Path, to: Path) -> None:
    """Copy every compare's results and plots and each run's small records (no checkpoints)."""
    copied = 0
    # every compare directory, also one whose compare was cut (its finished runs are reused on resume)
    for job in sorted(d for d in (out / setting).glob("seed-*/*") if (d / "runs").is_dir()):
        target = to / setting / job.relative_to(out / setting)
        target.mkdir(parents=True, exist_ok=True)
        for f in job.iterdir():
            if f.is_file():
                shutil.copy2(f, target / f.name)
        for run_dir in sorted(job.glob("runs/*/seed-*")):
            dest = target / run_dir.relative_to(job)
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("config.json", "summary.json", "metrics.jsonl"):
                if (run_dir / name).exists():
                    shutil.copy2(run_dir / name, dest / name)
                    copied += 1
    for name in ("evidence.json", "evidence.md", "accuracy_vs_round.png"):
        if (out / setting / name).exists():
            shutil.copy2(out / setting / name, to / setting / name)
    print(f"packed {copied} run records of {setting} into {to / setting}")


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
             "| budget violations | failed client-rounds | client usage similarity "
             "| token share of trained experts (seeds with logs) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, m in sorted(result["methods"].items(), key=lambda kv: -kv[1]["final"][0]):
        reached = [r for r in m["rounds_to_target"] if r is not None]
        rounds = (f"{statistics.mean(reached):.1f} ({len(reached)}/{len(m['rounds_to_target'])})" if reached
                  else f"— (0/{len(m['rounds_to_target'])})")
        lines.append(f"| {label} ({len(m['seeds'])}) | {m['final'][0]:.4f} ± {m['final'][1]:.4f} | {m['best'][0]:.4f} ± {m['best'][1]:.4f} "
                     f"| {rounds} | {m['mb_up']:.0f} | {m['experts_per_batch']:.1f} | {m['budget_violations']} "
                     f"| {m['failed_client_rounds']} / {m['client_rounds']} | {m['usage_similarity']:.3f} "
                     f"| {m['trained_token_share']:.3f} ({m['trained_token_share_seeds']}) |")
    p = result["paired"]
    if p:
        lines += ["", f"Paired by seed, HFedMoE minus {p['baseline']} (the best budget-respecting baseline by mean "
                      f"final accuracy): {', '.join(f'{d:+.4f}' for d in p['differences'])}; mean {p['mean']:+.4f} "
                      f"± {p['std']:.4f}, t = {p['t']:.2f} over {p['seeds']} seeds; HFedMoE higher in "
                      f"{p['hfedmoe_wins']} of {p['seeds']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("run", "report", "pack"))
    parser.add_argument("setting", choices=sorted(SETTINGS))
    parser.add_argument("--out", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=METHODS,
                        help="run: a subset when compute is short (a later run with all of them reuses the finished "
                             "ones); report: the table lists each method over the seeds it has")
    parser.add_argument("--to", type=Path, default=Path("docs/results/evidence"), help="pack: the committed folder")
    args = parser.parse_args()
    if args.action == "run":
        run(args.setting, args.out, [int(s) for s in args.seeds.split(",")], args.methods)
    elif args.action == "pack":
        pack(args.setting, args.out, args.to)
    else:
        report(args.setting, args.out)


if __name__ == "__main__":
    main()
