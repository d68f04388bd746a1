"""``hfedmoe compare``: several methods, or one HFedMoE setting swept, over seeds.

Every (method, seed) pair is one ordinary federated run (the same runtime,
splits, seeds and budgets; only ``--method`` differs) in ``DIR/runs/<label>/seed-<s>``.
A run whose ``summary.json`` exists is reused, so an interrupted comparison
continues where it stopped; a run that stopped half-way is started again.
From the run directories it writes ``DIR/results.json``, ``DIR/results.md`` and
the plots of :mod:`hfedmoe.plots`.

Runs go through the engine ``hfedmoe run`` would pick (``engine="auto"``: the in-process
Grid of :mod:`hfedmoe.fl.inprocess`, the same server and client code without Ray, when
clients train one at a time on one device; Flower's simulation engine when several can
train at once); ``engine="simulation"`` or ``"inprocess"`` chooses one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.methods import DEFAULT_METHOD, merge_names, method_names, server_merges

TARGET_ACCURACY = 0.9
# "flower": the name of the simulation engine before `--engine auto`, kept for older commands
ENGINES = ("auto", "inprocess", "simulation", "flower")
# Settings a sweep may vary: scalar run settings, except those that name the run.
_NOT_SWEEPABLE = {"out", "method", "seed", "extra"}


@dataclass(frozen=True)
class Sweep:
    """One HFedMoE setting and the values to run it with (``lam=1.0,0.9,0.8``)."""

    key: str
    values: tuple
    labels: tuple[str, ...]


@dataclass(frozen=True)
class PlannedRun:
    """One federated run of the comparison."""

    label: str  # the table row: a method name, or "key=value" in a sweep
    seed: int
    cfg: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)


# --- parsing the command line --------------------------------------------------------

def parse_methods(text: str) -> list[str]:
    """'hfedmoe,fedavg' -> ['hfedmoe', 'fedavg'] (ConfigError for an unknown or repeated name)."""
    methods = [part.strip() for part in str(text).split(",") if part.strip()]
    if not methods:
        raise ConfigError(f"--methods lists no method; choose from {', '.join(method_names())}")
    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ConfigError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(method_names())}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {text!r}")
    return methods


def sweepable_settings() -> dict[str, type]:
    """Run settings a sweep may vary, with the type of their values."""
    defaults = RunConfig()
    out = {}
    for f in fields(RunConfig):
        value = getattr(defaults, f.name)
        if f.name not in _NOT_SWEEPABLE and type(value) in (int, float, bool, str):
            out[f.name] = type(value)
    return out


def parse_sweep(text: str) -> Sweep:
    """'lam=1.0,0.9,0.8' -> Sweep('lam', (1.0, 0.9, 0.8)), with one-line errors."""
    key, sep, values_text = str(text).partition("=")
    key = key.strip().replace("-", "_")
    tokens = [v.strip() for v in values_text.split(",") if v.strip()]
    if not sep or not key or not tokens:
        raise ConfigError(f"--sweep must look like KEY=V1,V2,... (e.g. lam=1.0,0.9,0.8 or tau=0,0.05,0.1), "
                          f"got {text!r}")
    settings = sweepable_settings()
    if key not in settings:
        raise ConfigError(f"--sweep: {key!r} is not a setting a sweep can vary; choose from {', '.join(settings)}")
    kind = settings[key]
    values = []
    for token in tokens:
        try:
            if kind is bool:
                if token.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                values.append(token.lower() in ("true", "1"))
            else:
                values.append(kind(token))
        except ValueError:
            raise ConfigError(f"--sweep {key}: {token!r} is not a valid {kind.__name__}") from None
    if len(set(values)) != len(values):
        raise ConfigError(f"--sweep {key} lists a value twice: {values_text!r}")
    return Sweep(key, tuple(values), tuple(f"{key}={token}" for token in tokens))


def plan_runs(base: RunConfig, out: Path, methods: list[str] | None = None, seeds: int = 3,
              sweep: Sweep | None = None) -> list[PlannedRun]:
    """Every run of the comparison, validated before any starts (ConfigError otherwise)."""
    from hfedmoe.recipe import moe_shape  # torch, transformers: `hfedmoe compare --help` stays instant

    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be a positive integer (runs per method), got {seeds!r}")
    if sweep is not None and methods is not None:
        raise ConfigError("--sweep runs hfedmoe once per value: give either --sweep or --methods, not both")
    if sweep is not None:
        rows = [(label, {"method": DEFAULT_METHOD, sweep.key: value}) for label, value in zip(sweep.labels, sweep.values)]
    else:
        rows = [(method, {"method": method}) for method in (methods or method_names())]
    runs = []
    for label, changes in rows:
        for seed in range(base.seed, base.seed + seeds):
            run_dir = out / "runs" / label / f"seed-{seed}"
            # resume is decided per run (an unfinished run continues from its checkpoint)
            cfg = replace(base, **changes, seed=seed, out=str(run_dir), resume=False, extra=dict(base.extra))
            try:
                cfg.validate()
            except ConfigError as err:
                raise ConfigError(f"{label}: {err}") from None
            runs.append(PlannedRun(label, seed, cfg))
    shapes: dict[tuple, tuple[int, int]] = {}  # (MoE layers, experts per layer): budgets are checked against it
    for run in runs:
        key = (run.cfg.model, run.cfg.num_experts)  # a sweep may change the model's shape
        if key not in shapes:
            shapes[key] = moe_shape(run.cfg)
        run.cfg.budgets_for(*shapes[key])
    return runs


# --- running ------------------------------------------------------------------------

def check_memory_budgets(runs: list[PlannedRun], log: Callable[[str], None] = print) -> None:
    """Memory budgets -> C_budget of every run still to do, before any starts.

    A budget too small fails now (ConfigError naming the run), and a shape without a
    memory calibration is measured here, once: every later run of that shape (whatever
    its method or seed), and each run's server, finds it cached.
    """
    # torch, transformers: `hfedmoe compare --help` stays instant
    from hfedmoe.budgets import calibration_identity, client_budgets
    from hfedmoe.moe import make_access  # same reason
    from hfedmoe.recipe import build_model  # same reason

    built: tuple[str, object] | None = None  # (identity, access): one model at a time
    for run in runs:
        cfg = run.cfg
        if not (cfg.mem_budgets or cfg.mem_budget_range) or (run.run_dir / "summary.json").exists():
            continue
        identity = json.dumps(calibration_identity(cfg), sort_keys=True)
        if built is None or built[0] != identity:
            built = (identity, make_access(build_model(cfg, pretrained=False)))
        try:
            client_budgets(cfg, built[1], log=log)
        except ConfigError as err:
            raise ConfigError(f"{run.label} seed {run.seed}: {err}") from None


def engine_function(engine: str) -> Callable[..., dict]:
    """``run(cfg, reporter, verbose=...) -> summary`` of ``engine`` (resolved: not auto)."""
    if engine in ("simulation", "flower"):
        from hfedmoe.fl.simulation import run_simulation  # Ray and Flower's simulation engine: only when used

        return run_simulation
    if engine == "inprocess":
        from hfedmoe.fl.inprocess import run_inprocess  # Flower's ServerApp/ClientApp: only when used

        return run_inprocess
    raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")


class _RoundLog:
    """Progress of one run: a line per round (runs can take many minutes)."""

    def __init__(self, log: Callable[[str], None], prefix: str, rounds: int):
        self.log, self.prefix, self.rounds = log, prefix, rounds

    def on_start(self, info: dict) -> None:
        pass

    def on_round(self, row: dict) -> None:
        if row["round"] > 0:
            failed = len(row.get("failures", []))
            self.log(f"{self.prefix}   round {row['round']}/{self.rounds}: accuracy {row['accuracy']:.4f}"
                     + (f", {failed} failed client(s)" if failed else ""))

    def on_end(self, summary: dict) -> None:
        pass


def _settings_differ(run_dir: Path, cfg: RunConfig) -> list[str]:
    """Settings whose value in ``run_dir/config.json`` differs from ``cfg``."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return ["config.json (missing or unreadable)"]
    from hfedmoe.recipe import resolve_data_settings  # torch: `hfedmoe compare --help` stays instant
    from hfedmoe.recipe.device import agreed_dtype  # same reason

    # The server records the dtype it resolved ("auto" -> float32 here); a setting added
    # after the run was made was at its default then.
    saved = RunConfig.saved_settings(saved)
    wanted = json.loads(resolve_data_settings(replace(cfg, dtype=agreed_dtype(cfg))).to_json())
    return sorted(k for k in set(saved) | set(wanted) if k != "resume" and saved.get(k) != wanted.get(k))


def run_compare(base: RunConfig, out: str | Path, methods: list[str] | None = None, seeds: int = 3,
                sweep: Sweep | None = None, target_accuracy: float = TARGET_ACCURACY, engine: str = "auto",
                log: Callable[[str], None] = print, verbose: bool = False) -> dict:
    """Run (or reuse) every planned run, then write results.json, results.md and the plots.

    Parameters
    ----------
    base : RunConfig
        Settings shared by every run; ``method`` and ``out`` are set per run, the
        seeds are ``base.seed .. base.seed + seeds - 1``.
    out : path
        The comparison directory.
    methods : list of str, optional
        Methods to compare (default: all of them). Exclusive with ``sweep``.
    seeds : int
        Runs per method (or per sweep value).
    sweep : Sweep, optional
        Run hfedmoe once per value of one setting instead of several methods.
    target_accuracy : float
        Accuracy for the rounds-to-target column.
    engine : str
        "auto" (default: what ``hfedmoe run`` picks on this machine), "inprocess" or
        "simulation" (Flower's simulation engine; "flower" is an older name for it).
    log : callable
        Receives one progress line at a time.

    Returns
    -------
    dict
        The content of results.json; ``failed_runs`` lists runs that raised.
    """
    if not (isinstance(target_accuracy, (int, float)) and 0.0 < target_accuracy <= 1.0):
        raise ConfigError(f"--target-accuracy must lie in (0, 1], got {target_accuracy!r}")
    out = Path(out)
    runs = plan_runs(base, out, methods, seeds, sweep)
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    from hfedmoe.fl.simulation import resolve_engine  # no Ray until the simulation engine runs

    engine = resolve_engine(base, "simulation" if engine == "flower" else engine)
    run = engine_function(engine)
    check_memory_budgets(runs, log)
    out.mkdir(parents=True, exist_ok=True)
    failed_runs = []
    started = time.perf_counter()
    for index, planned in enumerate(runs, start=1):
        prefix = f"[{index}/{len(runs)}] {planned.label} seed {planned.seed}"
        run_dir = planned.run_dir
        if (run_dir / "summary.json").exists():
            differ = _settings_differ(run_dir, planned.cfg)
            if differ:
                raise ConfigError(f"{run_dir} holds a finished run with other settings ({', '.join(differ)}): "
                                  "use another --out to compare different settings")
            log(f"{prefix}: done before, reusing {run_dir}")
            continue
        cfg = replace(planned.cfg)  # the engine may fill in fields; the plan stays as planned
        if (run_dir / "checkpoints" / "latest.json").is_file():  # stopped half-way: continue it
            cfg.resume = True
            log(f"{prefix}: resuming the unfinished run in {run_dir}")
        elif run_dir.exists():  # stopped before its first checkpoint: start it again
            log(f"{prefix}: removing the unfinished run in {run_dir}")
            shutil.rmtree(run_dir)
        log(f"{prefix}: running ({cfg.rounds} rounds, engine {engine}) ...")
        t0 = time.perf_counter()
        try:
            summary = run(cfg, _RoundLog(log, prefix, cfg.rounds), verbose=verbose)
        except (KeyboardInterrupt, SystemExit):
            raise
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - one broken run must not lose hours of others
            failed_runs.append({"label": planned.label, "seed": planned.seed, "error": f"{type(err).__name__}: {err}"})
            log(f"{prefix}: FAILED ({type(err).__name__}: {err}); rerun the command to retry it")
            continue
        log(f"{prefix}: final accuracy {summary['final_accuracy']:.4f}, best {summary['best_accuracy']:.4f}, "
            f"{summary['failed_client_rounds']} failed client-rounds, {time.perf_counter() - t0:.0f} s "
            f"(elapsed {time.perf_counter() - started:.0f} s)")

    results = summarize(runs, target_accuracy, base, sweep, engine)
    results["failed_runs"] = failed_runs
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    from hfedmoe.plots import write_plots  # matplotlib: only once results exist

    results["plots"] = write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    log(f"results: {out / 'results.md'}")
    return results


# --- results ------------------------------------------------------------------------

def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run_metrics(run_dir: Path, target_accuracy: float, local_steps: int) -> dict:
    """The comparison's figures of one finished run, from its run directory."""
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = sorted(_rows(run_dir), key=lambda r: r["round"])
    trained = [r for r in rows if r["round"] > 0]
    client_rounds = [c for r in trained for c in r.get("clients", [])]
    cumulative, total = [], 0
    for r in rows:
        total += r.get("bytes_up", 0) if r["round"] > 0 else 0
        cumulative.append(total)
    reached = next((r["round"] for r in trained if r["accuracy"] >= target_accuracy), None)

    # Fraction of each layer's experts trained per batch (Fig. 15), over client-rounds.
    per_layer = None
    for c in client_rounds:
        counts = c.get("selection_counts")
        if not counts:
            continue
        steps = c.get("local_steps") or local_steps
        fractions = [sum(layer) / (steps * len(layer)) for layer in counts]
        per_layer = fractions if per_layer is None else [a + b for a, b in zip(per_layer, fractions)]
    num_with_counts = sum(1 for c in client_rounds if c.get("selection_counts"))
    # Usage u_c per client, averaged over rounds: Tensor[L][S] as nested lists.
    usage: dict[int, list[list[float]]] = {}
    usage_rounds: dict[int, int] = {}
    for c in client_rounds:
        if not c.get("usage"):
            continue
        cid = int(c["id"])
        if cid in usage:
            usage[cid] = [[a + b for a, b in zip(ra, rb)] for ra, rb in zip(usage[cid], c["usage"])]
        else:
            usage[cid] = [list(row) for row in c["usage"]]
        usage_rounds[cid] = usage_rounds.get(cid, 0) + 1
    return {
        "run_dir": str(run_dir),
        "rounds": [r["round"] for r in rows],
        "accuracy": [r["accuracy"] for r in rows],
        "cumulative_bytes_up": cumulative,
        "final_accuracy": rows[-1]["accuracy"],
        "best_accuracy": max((r["accuracy"] for r in trained), default=rows[-1]["accuracy"]),
        "rounds_to_target": reached,
        "wall_s": summary.get("wall_s"),
        "bytes_up": summary.get("bytes_up", cumulative[-1]),
        "experts_trained_mean": (statistics.fmean(c["experts_trained"] for c in client_rounds)
                                 if client_rounds else None),
        "budget_violations": sum(1 for c in client_rounds if c["experts_trained"] > c["expert_budget"]),
        "failed_client_rounds": sum(len(r.get("failures", [])) for r in trained),
        "client_rounds": len(client_rounds),
        "expert_budgets": sorted({int(c["expert_budget"]) for c in client_rounds}
                                 | {int(f["expert_budget"]) for r in trained for f in r.get("failures", [])
                                    if "expert_budget" in f}),
        "selected_fraction_per_layer": [x / num_with_counts for x in per_layer] if per_layer else [],
        "usage_per_client": {str(cid): [[x / usage_rounds[cid] for x in row] for row in usage[cid]]
                             for cid in sorted(usage)},
    }


def _stats(values: list) -> dict:
    """mean / std (sample std; 0 for one value) / values, ignoring None."""
    present = [v for v in values if v is not None]
    mean = statistics.fmean(present) if present else None
    std = statistics.stdev(present) if len(present) > 1 else (0.0 if present else None)
    return {"mean": mean, "std": std, "values": values}


def summarize(runs: list[PlannedRun], target_accuracy: float, base: RunConfig, sweep: Sweep | None,
              engine: str) -> dict:
    """results.json: per label the figures over its finished seeds."""
    labels = list(dict.fromkeys(r.label for r in runs))
    entries = []
    for label in labels:
        mine = [r for r in runs if r.label == label]
        done = [r for r in mine if (r.run_dir / "summary.json").exists()]
        per_run = [{"seed": r.seed, **run_metrics(r.run_dir, target_accuracy, r.cfg.local_steps)} for r in done]
        cfg = mine[0].cfg
        expert_agg, gate_agg = merge_names(*server_merges(cfg.method, cfg.expert_agg, cfg.gate_agg))
        layers = [m["selected_fraction_per_layer"] for m in per_run if m["selected_fraction_per_layer"]]
        entry = {
            "label": label,
            "method": cfg.method,
            "setting": {sweep.key: getattr(cfg, sweep.key)} if sweep else {},
            "expert_agg": expert_agg,
            "gate_agg": gate_agg,
            "seeds": [r.seed for r in mine],
            "finished_seeds": [r.seed for r in done],
            "final_accuracy": _stats([m["final_accuracy"] for m in per_run]),
            "best_accuracy": _stats([m["best_accuracy"] for m in per_run]),
            "rounds_to_target": {**_stats([m["rounds_to_target"] for m in per_run]),
                                 "reached": sum(m["rounds_to_target"] is not None for m in per_run),
                                 "runs": len(per_run)},
            "wall_s": _stats([m["wall_s"] for m in per_run]),
            "bytes_up": _stats([m["bytes_up"] for m in per_run]),
            "experts_trained_mean": _stats([m["experts_trained_mean"] for m in per_run]),
            "budget_violations": {"total": sum(m["budget_violations"] for m in per_run),
                                  "values": [m["budget_violations"] for m in per_run]},
            "failed_client_rounds": {"total": sum(m["failed_client_rounds"] for m in per_run),
                                     "values": [m["failed_client_rounds"] for m in per_run]},
            "client_rounds": sum(m["client_rounds"] + m["failed_client_rounds"] for m in per_run),
            "selected_fraction_per_layer": ([statistics.fmean(col) for col in zip(*layers)] if layers else []),
            "runs": per_run,
        }
        entries.append(entry)
    budgets = sorted({b for e in entries for m in e["runs"] for b in m["expert_budgets"]})
    return {
        "settings": {
            "mode": "sweep" if sweep else "methods",
            "sweep": {"key": sweep.key, "values": list(sweep.values)} if sweep else None,
            "labels": labels,
            "seeds": sorted({r.seed for r in runs}),
            "target_accuracy": target_accuracy,
            "engine": engine,
            "rounds": base.rounds,
            "clients": base.clients,
            "expert_budgets_seen": budgets,
            "base_config": json.loads(replace(base, out=None).to_json()),
        },
        "results": entries,
    }


def _pm(stat: dict, digits: int = 4, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def results_markdown(results: dict) -> str:
    """results.md: the comparison table, the per-layer selection table and the plots."""
    s = results["settings"]
    target = s["target_accuracy"]
    if s["mode"] == "sweep":
        title = f"# HFedMoE sweep over {s['sweep']['key']}: {', '.join(str(v) for v in s['sweep']['values'])}"
    else:
        title = f"# Method comparison: {', '.join(s['labels'])}"
    base = s["base_config"]
    budgets = base.get("expert_budgets") or "default (" + ", ".join(str(b) for b in s["expert_budgets_seen"]) + ")"
    lines = [
        title, "",
        f"{s['rounds']} rounds x {base['local_steps']} local steps, {s['clients']} clients, expert budgets "
        f"{budgets}, seeds {', '.join(str(x) for x in s['seeds'])}, engine {s['engine']}; "
        f"model {base['model']} ({base['num_experts']} experts/layer, top-{base['top_k']}), dataset {base['dataset']}.",
        "",
        f"| {'setting' if s['mode'] == 'sweep' else 'method'} | final accuracy | best accuracy | "
        f"rounds to {target:g} | wall time (s) | MB up | experts / batch | budget violations | "
        f"failed client-rounds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results["results"]:
        rtt = e["rounds_to_target"]
        reach = f"{rtt['reached']}/{rtt['runs']}"
        rounds = f"{_pm(rtt, 1)} ({reach})" if rtt["mean"] is not None else f"— ({reach})"
        experts = e["experts_trained_mean"]
        unfinished = "" if len(e["finished_seeds"]) == len(e["seeds"]) else \
            f" ({len(e['finished_seeds'])}/{len(e['seeds'])} seeds)"
        lines.append(
            f"| {e['label']}{unfinished} | {_pm(e['final_accuracy'])} | {_pm(e['best_accuracy'])} | {rounds} | "
            f"{_pm(e['wall_s'], 0)} | {_pm(e['bytes_up'], 1, 1e-6)} | "
            f"{'—' if experts['mean'] is None else format(experts['mean'], '.1f')} | "
            f"{e['budget_violations']['total']} | {e['failed_client_rounds']['total']} / {e['client_rounds']} |"
        )
    lines += [
        "",
        "Mean ± sample standard deviation over seeds. *Best accuracy*: the best test accuracy over rounds "
        f"1..{s['rounds']}. *Rounds to {target:g}*: the first round whose test accuracy reaches {target:g}, "
        "averaged over the seeds that reach it (reached/runs). *MB up*: client-to-server bytes over the run. "
        "*Experts / batch*: experts trained per mini-batch, mean over client-rounds. *Budget violations*: "
        "client-rounds that trained more experts per batch than the client's expert budget (total over seeds). "
        "*Failed client-rounds*: client-rounds that produced no update (e.g. FedAvg's training failure when the "
        "budget cannot hold full fine-tuning), of all client-rounds. Aggregation per row: "
        + "; ".join(f"{e['label']}: experts {e['expert_agg']}, gates {e['gate_agg']}" for e in results["results"])
        + ". What each baseline keeps and simplifies: docs/baselines.md.",
    ]
    layer_rows = [e for e in results["results"] if e["selected_fraction_per_layer"]]
    if layer_rows:
        num_layers = max(len(e["selected_fraction_per_layer"]) for e in layer_rows)
        lines += [
            "", "## Fraction of experts trained per layer (per batch; cf. the paper's Fig. 15)", "",
            "| " + ("setting" if s["mode"] == "sweep" else "method") + " | "
            + " | ".join(f"layer {i}" for i in range(num_layers)) + " |",
            "|---|" + "---|" * num_layers,
        ]
        for e in layer_rows:
            lines.append(f"| {e['label']} | " + " | ".join(f"{x:.2f}" for x in e["selected_fraction_per_layer"]) + " |")
    if results.get("failed_runs"):
        lines += ["", "## Runs that failed (rerun the command to retry them)", ""]
        lines += [f"- {f['label']} seed {f['seed']}: {f['error']}" for f in results["failed_runs"]]
    plots = results.get("plots", {})
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({name})" for title, name in plots.items()]
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------

def add_compare_flags(parser: argparse.ArgumentParser) -> None:
    """The flags ``hfedmoe compare`` adds to the run flags."""
    for action in parser._actions:  # the run flag --out names the comparison directory here
        if action.dest == "out":
            action.help = "comparison directory (default runs/compare-<timestamp>); rerun with it to resume"
        if action.dest == "method":
            action.help = "(use --methods)"
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated methods to compare (default: all: {','.join(method_names())})")
    parser.add_argument("--seeds", type=int, default=3, help="runs per method, with seeds --seed, --seed+1, ...")
    parser.add_argument("--sweep", default=None,
                        help="run hfedmoe once per value of one setting instead of methods, e.g. lam=1.0,0.9,0.8 "
                             "or tau=0,0.05,0.1")
    parser.add_argument("--target-accuracy", type=float, default=TARGET_ACCURACY,
                        help="test accuracy for the rounds-to-target column")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto: as `hfedmoe run` (in-process when clients train one at a time on one device, "
                             "else Flower's simulation engine); inprocess: the same server/client code without "
                             "Ray; simulation (or flower): Flower's simulation engine")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")


def compare_command(args: argparse.Namespace, run_config_from: Callable[[argparse.Namespace], RunConfig]) -> int:
    """``hfedmoe compare``: exit code 0 when every run finished, 1 if some failed, 2 on a usage error."""
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        if args.method != RunConfig().method:
            raise ConfigError("hfedmoe compare runs several methods: use --methods (or --sweep), not --method")
        base = run_config_from(args)
        methods = parse_methods(args.methods) if args.methods is not None else None
        sweep = parse_sweep(args.sweep) if args.sweep is not None else None
        out = Path(args.out) if args.out else Path("runs") / datetime.now().strftime("compare-%Y%m%d-%H%M%S")
        results = run_compare(base, out, methods=methods, seeds=args.seeds, sweep=sweep,
                              target_accuracy=args.target_accuracy, engine=args.engine, log=log,
                              verbose=args.verbose)
    except (ConfigError, FileExistsError) as err:
        print(f"hfedmoe: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hfedmoe: interrupted; finished runs are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    return 1 if results["failed_runs"] else 0
