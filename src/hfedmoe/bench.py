"""`hfedmoe bench`: what the system costs on top of the training it orchestrates.

Every figure is a ratio of two measurements taken in the same process, one after
the other, so it holds on a noisy shared machine:

1. selection_overhead: time in pooling + importance + IB score + selection over
   the local training time (summed over every client step of a federated run);
2. upload_over_floor: bytes clients uploaded over the raw bytes of the tensors they
   uploaded; upload_vs_fedavg_full: the same bytes over what FedAvg-full would send
   (every client uploading the whole model every round);
3. runtime_overhead: a steady-state federated round over the same round done as a
   bare PyTorch loop in one process (same clients, same steps, same aggregation and
   evaluation); engine start-up is reported separately. The federated arm runs on the
   engine ``hfedmoe run`` picks (``--engine auto``: the in-process Grid when clients
   train one at a time), on Flower's simulation engine (Ray, one worker, clients one
   after another), or on both; fixed_cost_per_client_s is the difference of the two
   steady rounds per client. Every arm runs in a fresh process (an arm run after
   another inherits its allocator and caches: measured, that biased the ratio by
   10-15%), and with ``repeats`` > 1 the arms run in mirrored order (A B B A ...) and
   each steady round is the median over the repeats. framework_s is the same cost
   accounted phase by phase inside the federated arm (decode, encode, parse, the
   engine's message path, the checkpoint's hand-over and background write), which does
   not depend on two noisy totals;
4. (full mode) scaling of the round time with 2, 4, 8, 16 clients at fixed local
   steps, and of the server's aggregation time with 8..64 experts per layer;
5. (full mode) peak training memory and step time vs the expert budget.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from hfedmoe.budgets import calibrate
from hfedmoe.client_round import ClientUpload, client_round
from hfedmoe.config import RunConfig
from hfedmoe.fl.records import ReceivedUpload, raw_nbytes
from hfedmoe.fl.inprocess import run_inprocess
from hfedmoe.fl.simulation import resolve_engine, run_simulation
from hfedmoe.fl.strategy import HFedMoE
from hfedmoe.moe import make_access
from hfedmoe.recipe import build_model, load_client_data, load_test_batches
from hfedmoe.training import evaluate, set_torch_threads


def quick_config(out: Path) -> RunConfig:
    """About a minute on 2 CPU cores: 2 clients, 3 rounds, short sequences."""
    return RunConfig(rounds=3, clients=2, local_steps=4, batch_size=8, max_length=32, out=str(out))


def full_config(out: Path) -> RunConfig:
    return RunConfig(rounds=4, clients=4, local_steps=10, out=str(out))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _round_times(rows: list[dict]) -> list[float]:
    """Wall time of each round r >= 1 (from the end of round r-1 to the end of r)."""
    return [b["wall_s"] - a["wall_s"] for a, b in zip(rows, rows[1:])]


@contextlib.contextmanager
def _ray_worker_niceness(value: str):
    """Ray starts its workers at niceness 15 unless told otherwise; the bare arm runs
    at this process's niceness. On a shared machine that handicaps the federated arm
    (its clients train in the Ray worker), so both arms get the same priority."""
    saved = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_worker_niceness", None)
        else:
            os.environ["RAY_worker_niceness"] = saved


def federated_arm(cfg: RunConfig, engine: str = "simulation") -> dict:
    """Run ``cfg`` on ``engine`` (inprocess or simulation); per-round times and the run's metrics."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    if engine == "inprocess":
        run_inprocess(cfg, reporter=None)
    else:
        with _ray_worker_niceness(str(os.getpriority(os.PRIO_PROCESS, 0))):
            run_simulation(cfg, reporter=None)
    total = time.perf_counter() - start
    rows = _rows(Path(cfg.out))
    return {"rows": rows, "round_s": _round_times(rows), "process_s": total,
            "loadavg": [round(load, 2), round(os.getloadavg()[0], 2)]}


def federated_breakdown(rows: list[dict], model_mb: float) -> dict:
    """Mean seconds per steady round (rounds >= 2) of the federated arm, by phase.

    ``transport_s`` is what neither side's own code accounts for: the time between
    the server handing its messages to Flower and holding every reply, minus each
    client's decode + round + encode. On the simulation engine it is Flower's message
    path: pickling each message for Ray, the object store, the actor call, the pickled
    reply, and Flower's 0.1 s polling of its in-memory state. On the in-process Grid
    messages pass by reference, and what is left is the ClientApp's own dispatch
    (Flower's mods, the Message and Context objects).
    """
    steady = rows[2:]
    if not steady:
        return {}

    def mean(values) -> float:
        return statistics.mean(values) if values else 0.0

    def client_sum(key: str) -> float:
        return mean([sum(c.get(key, 0.0) for c in r["clients"]) for r in steady])

    timing = {key: mean([r.get("timing", {}).get(key, 0.0) for r in steady])
              for key in ("configure_s", "clients_s", "parse_s", "aggregate_s", "encode_s", "eval_s", "checkpoint_s",
                          "checkpoint_write_cpu_s")}
    clients = mean([len(r["clients"]) for r in steady])
    out = {
        "round_s": mean([b["wall_s"] - a["wall_s"] for a, b in zip(rows[1:], rows[2:])]),
        "client_round_s": client_sum("round_s"),  # load + train + choose the upload: what the bare arm does too
        "client_decode_s": client_sum("decode_s"),
        "client_encode_s": client_sum("encode_s"),
        **{f"server_{k}": v for k, v in timing.items()},
    }
    out["transport_s"] = timing["clients_s"] - out["client_round_s"] - out["client_decode_s"] - out["client_encode_s"]
    out["other_s"] = out["round_s"] - (timing["configure_s"] + timing["clients_s"] + timing["parse_s"]
                                       + timing["aggregate_s"] + timing["encode_s"] + timing["eval_s"]
                                       + timing["checkpoint_s"])
    # Every second of the round the bare loop does not pay: the messages both ways, the
    # engine's path, the checkpoint (its hand-over, and the CPU its background write took
    # from the cores the clients train on) and what no phase accounts for. (Training,
    # aggregation and evaluation are the same code in both arms.)
    out["framework_s"] = (out["client_decode_s"] + out["client_encode_s"] + out["transport_s"]
                          + timing["configure_s"] + timing["parse_s"] + timing["encode_s"]
                          + timing["checkpoint_s"] + timing["checkpoint_write_cpu_s"] + out["other_s"])
    moved_mb = model_mb + mean([sum(c["bytes_up"] for c in r["clients"]) for r in steady]) / 1e6 / max(clients, 1)
    out["transport_s_per_client"] = out["transport_s"] / max(clients, 1)
    out["transport_s_per_gb"] = out["transport_s_per_client"] / moved_mb * 1e3
    return {k: round(v, 3) for k, v in out.items()}


def bare_arm(cfg: RunConfig) -> dict:
    """The same rounds as a plain PyTorch loop in this process (no Flower, no Ray)."""
    set_torch_threads()
    server_model = build_model(cfg, pretrained=True)
    server = make_access(server_model)
    budgets = cfg.budgets_for(server.num_layers, server.num_experts)
    test = load_test_batches(cfg)
    client_access = make_access(build_model(cfg, pretrained=False))
    data = [load_client_data(cfg, pid) for pid in range(cfg.clients)]
    strategy = HFedMoE(server.param_groups(), dict(enumerate(budgets)), cfg.to_json(), cfg.tau, cfg.gate_normalize)

    state = server.state_dict()
    round_s, accuracies, phases = [], [], []
    load = os.getloadavg()[0]
    for server_round in range(1, cfg.rounds + 1):
        start = time.perf_counter()
        strategy.set_global_state(state)  # what configure_train would hold
        updates, train_s, copy_s = [], 0.0, 0.0
        for pid in range(cfg.clients):
            t0 = time.perf_counter()
            # Loads the server's state into the client model (a copy), trains, chooses the upload.
            upload = client_round(cfg, client_access, data[pid], state, budgets[pid], server_round)
            t1 = time.perf_counter()
            # Copied out (as serialising a reply does): the next client reuses the model.
            updates.append(ReceivedUpload.in_process(pid, upload))
            train_s, copy_s = train_s + t1 - t0, copy_s + time.perf_counter() - t1
        t2 = time.perf_counter()
        new_state = strategy.aggregate(updates)
        new_state.pop("__alpha__")
        state = new_state
        t3 = time.perf_counter()
        server.load_state_dict(state, strict=True)
        accuracies.append(evaluate(server_model, test, task=cfg.task)["accuracy"])
        round_s.append(time.perf_counter() - start)
        phases.append({"client_round_s": train_s, "copy_out_s": copy_s, "aggregate_s": t3 - t2,
                       "eval_s": time.perf_counter() - t3})
    steady = phases[1:] or phases
    breakdown = {k: round(statistics.mean(p[k] for p in steady), 3) for k in steady[0]}
    return {"round_s": round_s, "accuracy": accuracies, "breakdown": breakdown,
            "loadavg": [round(load, 2), round(os.getloadavg()[0], 2)]}


def aggregation_scaling(experts_per_layer: list[int], clients: int = 4) -> list[dict]:
    """Server aggregation time vs model size, on synthetic updates of the embedded shape.

    Every client uploads a random half of the experts (as constrained clients do).
    """
    out = []
    generator = torch.Generator().manual_seed(0)
    for num_experts in experts_per_layer:
        cfg = RunConfig(num_experts=num_experts, clients=clients)
        access = make_access(build_model(cfg, pretrained=False))
        groups = access.param_groups()
        state = access.state_dict()
        strategy = HFedMoE(groups, {i: 1 for i in range(clients)}, "{}", cfg.tau, True)
        strategy.set_global_state(state)
        updates = []
        shape = (groups.num_layers, groups.num_experts)
        for c in range(clients):
            chosen = torch.rand(shape, generator=generator) < 0.5
            keys = [k for (l, e), names in groups.experts.items() if chosen[l, e] for k in names]
            tensors = {**{k: state[k] for k in [*groups.routers, *groups.dense]},
                       **{k: state[k] + 0.01 for k in keys}}
            upload = ClientUpload(tensors=tensors, usage=torch.rand(shape, generator=generator),
                                  importance=torch.rand(shape, generator=generator), selection_counts=chosen.long(),
                                  metrics={"num-examples": 100 + c, "partition-id": c})
            updates.append(ReceivedUpload(node_id=c, upload=upload, bytes_up=0, bytes_up_floor=0))
        start = time.perf_counter()
        strategy.aggregate(updates)
        elapsed = time.perf_counter() - start
        out.append({"experts_per_layer": num_experts, "model_mparams": round(raw_nbytes(state) / 4e6, 1),
                    "aggregate_s": round(elapsed, 3)})
        del access, state, updates, strategy
    return out


def budget_scaling(cfg: RunConfig, log=print) -> list[dict]:
    """Peak training memory and step time vs the expert budget (the resources figures).

    Budgets: one expert per layer (the minimum), a quarter, half and all of the
    experts, trained per batch. Each peak is measured in a fresh process and the step
    times in one process with the budgets interleaved (:func:`hfedmoe.budgets.calibrate`);
    ``*_vs_all`` are the ratios to training every expert.
    """

    access = make_access(build_model(cfg, pretrained=False))
    layers, total = access.num_layers, access.num_layers * access.num_experts
    counts = sorted({layers, max(layers, total // 4), max(layers, total // 2), total})
    del access
    points = calibrate(cfg, counts, steps=4, log=log)["points"]
    full = next(p for p in points if p["trained_experts"] == total)
    return [{"trained_experts": p["trained_experts"], "fraction": round(p["trained_experts"] / total, 3),
             "peak_mb": round(p["peak_bytes"] / 1e6, 1), "step_s": round(p["step_s"], 3),
             "peak_vs_all": round(p["peak_bytes"] / full["peak_bytes"], 3),
             "step_vs_all": round(p["step_s"] / full["step_s"], 3)} for p in points]


def steady_round_s(arms: list[dict]) -> float:
    """The median steady round (rounds >= 2) over every repeat of one arm."""
    return statistics.median(t for arm in arms for t in arm["round_s"][1:])


def runtime_overhead_per_repeat(fed: list[dict], bare: list[dict]) -> list[float]:
    """Steady round of the r-th federated process over that of the r-th bare process, for
    every repeat both arms ran."""
    return [round(steady_round_s([f]) / steady_round_s([b]), 3) for f, b in zip(fed, bare)]


def _mean_dicts(dicts: list[dict]) -> dict:
    keys = [k for k in dicts[0] if all(k in d for d in dicts)]
    return {k: round(statistics.mean(d[k] for d in dicts), 3) for k in keys}


def engine_figures(fed: list[dict], bare: list[dict], clients: int) -> dict:
    """The overhead figures of one federated arm (its repeats) against the bare arm (its repeats)."""
    steady_fed, steady_bare = steady_round_s(fed), steady_round_s(bare)
    rows = fed[0]["rows"]
    per_arm = [federated_breakdown(arm["rows"], arm["rows"][1]["model_bytes"] / 1e6) for arm in fed]
    phases = _mean_dicts(per_arm)
    return {
        "runtime_overhead": round(steady_fed / steady_bare, 3),
        # Each federated process against the bare process of the same repeat (next to it in
        # arm_order, adjacent with one engine, so a drift of the machine's speed weighs on
        # both): their spread is what one ratio of this bench can be trusted to.
        "runtime_overhead_per_repeat": runtime_overhead_per_repeat(fed, bare),
        # What a client-round costs on top of the bare loop's (a steady round's difference per client).
        "fixed_cost_per_client_s": round((steady_fed - steady_bare) / clients, 3),
        # The same cost accounted inside the federated round, phase by phase (not a
        # difference of two noisy totals): see federated_breakdown.
        "framework_s_per_client": round(phases.get("framework_s", 0.0) / clients, 3),
        "framework_share": round(phases.get("framework_s", 0.0) / phases["round_s"], 4) if phases else None,
        # The bare round plus those seconds, over the bare round: runtime_overhead without the
        # noise of the phases both arms share (training, aggregation, evaluation: the same code,
        # which on a shared machine can differ by tens of percent between two processes).
        "accounted_overhead": round((steady_bare + phases.get("framework_s", 0.0)) / steady_bare, 3),
        "steady_round_s": round(steady_fed, 3),
        "federated_round_s": [[round(x, 2) for x in arm["round_s"]] for arm in fed],
        "engine_startup_s": round(statistics.mean(arm["rows"][0]["wall_s"] + arm["round_s"][0] - steady_fed
                                                  for arm in fed), 2),
        "federated_breakdown_s": phases,
        "federated_breakdown_s_per_arm": per_arm,
        "loadavg_federated": [arm["loadavg"] for arm in fed],
        "federated_accuracy": [round(r["accuracy"], 4) for r in rows[1:]],
    }


def bare_figures(bare: list[dict]) -> dict:
    """The bare arm's figures over its repeats (steady round, rounds, phases, accuracy)."""
    return {
        "bare_steady_round_s": round(steady_round_s(bare), 3),
        "bare_round_s": [[round(x, 2) for x in arm["round_s"]] for arm in bare],
        "bare_breakdown_s": _mean_dicts([arm["breakdown"] for arm in bare]),
        "bare_breakdown_s_per_arm": [arm["breakdown"] for arm in bare],
        "loadavg_bare": [arm["loadavg"] for arm in bare],
        "bare_accuracy": [round(a, 4) for a in bare[0]["accuracy"]],
    }


def _arm_child(kind: str, cfg_json: str, result_path: str) -> None:
    """Run one arm in this (fresh) process and write its result as JSON."""
    cfg = RunConfig.from_json(cfg_json)
    result = bare_arm(cfg) if kind == "bare" else federated_arm(cfg, kind)
    Path(result_path).write_text(json.dumps(result))


def arm_in_fresh_process(kind: str, cfg: RunConfig) -> dict:
    """:func:`federated_arm` (``kind`` = the engine) or :func:`bare_arm` (``kind="bare"``)
    in a new interpreter, so that no arm inherits another's allocator state, caches or
    threads. Returns the arm's result; raises RuntimeError if the process fails."""
    result_path = Path(tempfile.mkdtemp(prefix="hfedmoe-arm-")) / "arm.json"
    process = multiprocessing.get_context("spawn").Process(
        target=_arm_child, args=(kind, cfg.to_json(), str(result_path)), name=f"hfedmoe-bench-{kind}")
    process.start()
    try:
        process.join()
    finally:
        if process.is_alive():  # interrupted (Ctrl-C, SIGTERM): no arm left behind
            process.terminate()
            process.join(30)
    if process.exitcode != 0 or not result_path.exists():
        raise RuntimeError(f"the {kind} arm of the benchmark failed (exit code {process.exitcode}); "
                           "its output is above")
    result = json.loads(result_path.read_text())
    result_path.unlink()
    result_path.parent.rmdir()
    return result


def arm_order(engines: list[str], repeats: int) -> list[str]:
    """Arms in mirrored order: e.g. inprocess, bare, bare, inprocess for two repeats, so that
    a drift in the machine's speed over the run weighs on every arm alike."""
    arms = [*engines, "bare"]
    return [kind for r in range(repeats) for kind in (arms if r % 2 == 0 else arms[::-1])]


def measure_arms(cfg: RunConfig, engines: list[str], repeats: int, out_dir: Path, log=print,
                 warmup: bool = True) -> dict[str, list[dict]]:
    """Every arm (``engines`` and bare) ``repeats`` times, each in a fresh process, in
    :func:`arm_order`. Returns kind -> its runs. A federated arm's run directory is
    ``out_dir/federated-<engine>`` for the first repeat, ``...-<engine>-<r>`` after.

    ``warmup``: first one round of the bare arm in a fresh process, not measured. Why: in
    4 of 4 benches here the first process was the slowest of its kind, also in its steady
    rounds (default workload: client training 21.1 and 26.2 s in the first process against
    18.8 and 24.5 s in the last, the bare arms between them 18.4-24.8 s), and mirrored order
    (A B B A) puts the first arm first in every bench. With it the quick bench's two
    federated processes agreed (6.81, 6.53 s); on the default workload the first federated
    process was still the slower one (BENCHMARKS.md, issue 19)."""
    runs: dict[str, list[dict]] = {kind: [] for kind in [*engines, "bare"]}
    order = arm_order(engines, repeats)
    if warmup:
        log("[warm-up] one round of the bare arm (fresh process, not measured) ...")
        arm_in_fresh_process("bare", replace(cfg, rounds=1))
    for i, kind in enumerate(order, 1):
        done = len(runs[kind])
        if kind == "bare":
            log(f"[{i}/{len(order)}] bare arm: the same rounds as a plain PyTorch loop (fresh process) ...")
            arm_cfg = cfg
        else:
            log(f"[{i}/{len(order)}] federated arm: {cfg.clients} clients x {cfg.rounds} rounds x "
                f"{cfg.local_steps} steps on the {kind} engine (fresh process) ...")
            arm_cfg = replace(cfg, out=str(out_dir / (f"federated-{kind}" + (f"-{done}" if done else ""))))
        runs[kind].append(arm_in_fresh_process(kind, arm_cfg))
        log(f"    steady rounds: {[round(t, 2) for t in runs[kind][-1]['round_s'][1:]]} s")
    return runs


def run_bench(quick: bool = True, out_dir: Path | None = None, log=print, engine: str = "auto",
              repeats: int = 2, checkpoint_interval: float | None = None) -> dict:
    """Measure the figures; returns them as a flat dict (the JSON line).

    ``engine``: auto (the one ``hfedmoe run`` would pick), inprocess, simulation, or both
    (a federated arm on each; the top-level figures are the in-process arm's and every
    arm's are under ``engines``). ``repeats``: how often each arm runs (fresh processes,
    mirrored order, see :func:`measure_arms`). ``checkpoint_interval``: the federated
    arm's ``--checkpoint-interval`` (None: the run's default; 0: a checkpoint every round,
    whose write then falls in the steady rounds).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="hfedmoe-bench-"))
    cfg = (quick_config if quick else full_config)(out_dir / "federated")
    if checkpoint_interval is not None:
        cfg = replace(cfg, checkpoint_interval=checkpoint_interval).validate()  # a bad value: one message, now
    engines = ["inprocess", "simulation"] if engine == "both" else [resolve_engine(cfg, engine)]
    runs = measure_arms(cfg, engines, repeats, out_dir, log)
    bare_runs = runs.pop("bare")

    fed = runs[engines[0]][0]
    rows = fed["rows"]
    clients = [c for r in rows[1:] for c in r["clients"]]
    select_s = sum(c["select_s"] for c in clients)
    train_s = sum(c["train_s"] for c in clients)
    bytes_up = sum(c["bytes_up"] for c in clients)
    floor = sum(c["bytes_up_floor"] for c in clients)
    fedavg_full = sum(r["model_bytes"] * len(r["clients"]) for r in rows[1:])
    figures = {name: engine_figures(arm_runs, bare_runs, cfg.clients) for name, arm_runs in runs.items()}
    result = {
        "mode": "quick" if quick else "full",
        "engine": engines[0],
        "selection_overhead": round(select_s / train_s, 4),
        "upload_over_floor": round(bytes_up / floor, 4),
        "upload_vs_fedavg_full": round(bytes_up / fedavg_full, 4),
        **figures[engines[0]],
        "repeats": repeats,
        "checkpoint_interval": cfg.checkpoint_interval,
        "arm_order": arm_order(engines, repeats),
        **bare_figures(bare_runs),
        "engines": figures,
        "clients": cfg.clients, "rounds": cfg.rounds, "local_steps": cfg.local_steps,
        "batch": [cfg.batch_size, cfg.max_length], "model_mb": round(rows[1]["model_bytes"] / 1e6, 1),
    }
    partial = out_dir / "bench.json"  # the full mode is long: what is measured so far
    partial.write_text(json.dumps(result, indent=1) + "\n")
    if not quick:
        log(f"main figures so far in {partial}; scaling: aggregation time vs experts per layer ...")
        result["aggregation_scaling"] = aggregation_scaling([8, 16, 32, 64])
        partial.write_text(json.dumps(result, indent=1) + "\n")
        log("memory and step time vs expert budget (fresh process per budget) ...")
        result["budget_scaling"] = budget_scaling(cfg, log=log)
        partial.write_text(json.dumps(result, indent=1) + "\n")
        log("scaling: round time vs number of clients ...")
        scaling = result["clients_scaling"] = []
        for clients in (2, 4, 8, 16):
            c_cfg = replace(cfg, clients=clients, rounds=2, local_steps=4, expert_budgets=None,
                            out=str(out_dir / f"clients-{clients}"))
            run = arm_in_fresh_process(engines[0], c_cfg)
            times, phases = run["round_s"], federated_breakdown(run["rows"], run["rows"][1]["model_bytes"] / 1e6)
            scaling.append({"clients": clients, "round_s": round(times[-1], 2),
                            "per_client_s": round(times[-1] / clients, 2),
                            "client_round_s": phases.get("client_round_s"), "transport_s": phases.get("transport_s"),
                            "server_s": round(sum(phases.get(f"server_{k}", 0.0) for k in
                                                  ("parse_s", "aggregate_s", "encode_s", "eval_s", "checkpoint_s")), 3),
                            "loadavg": run["loadavg"]})
            partial.write_text(json.dumps(result, indent=1) + "\n")
            log(f"  {clients} clients: {times[-1]:.1f} s per round")
    return result
