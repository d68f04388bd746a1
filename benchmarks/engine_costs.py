"""Two costs of Flower's simulation engine that no message or checkpoint explains
(issue 8, BENCHMARKS.md): measured here in isolation, each as a ratio within one run.

    python benchmarks/engine_costs.py [--part=ray-idle [--renice]] [--part=thread] [--part=thread-alone]

ray-idle: local training (the quick bench's client workload, 8 steps) in this
    process, alone and then with an idle Ray node up as Flower's simulation starts it
    (same ray.init arguments as hfedmoe.fl.simulation, one idle actor holding both
    cores), alternated twice; prints the ratio ray-up / alone per repetition and the CPU
    seconds Ray's own processes used meanwhile. In the simulation every client trains
    next to those processes; the bare loop does not. --renice: Ray's own processes
    (not its workers) at niceness 19.
thread: the server's evaluation of the embedded model in the main thread and in a
    second thread of the same process, alternated (so both threads have run parallel
    torch work).
thread-alone: the same, each side in a fresh process where only that thread ever runs
    torch (as in the simulation's server process, whose main thread runs Flower's
    engine), alternated twice.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from hfedmoe.bench import quick_config
from hfedmoe.fl.processes import descendants
from hfedmoe.recipe import build_model, endless, load_client_data, load_test_batches
from hfedmoe.training import LocalTrainConfig, evaluate, set_torch_threads, train_local


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _renice_ray_daemons(pids: list[int]) -> None:
    """Lowest CPU priority for Ray's own processes (not its workers, ``ray::...``)."""
    for pid in pids:
        try:
            if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                os.setpriority(os.PRIO_PROCESS, pid, 19)
        except OSError:
            pass


def ray_idle(repeats: int = 2, samples: int = 4, renice: bool = False) -> dict:
    import ray

    cfg = quick_config(Path("/tmp/hfedmoe-engine-costs"))
    set_torch_threads()
    model = build_model(cfg, pretrained=False)
    batches = endless(load_client_data(cfg, 0).batches)
    local = LocalTrainConfig(local_steps=8, lr=cfg.lr, lam=cfg.lam, beta=cfg.beta)

    def median_train_s() -> float:
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            train_local(model, batches, 12, local)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    median_train_s()  # warm-up
    out = []
    cores = os.cpu_count() or 1
    for _ in range(repeats):
        alone = median_train_s()
        ray.init(num_cpus=cores, num_gpus=0, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=True)

        @ray.remote(num_cpus=cores)
        class Idle:
            def ping(self) -> int:
                return 1

        actor = Idle.remote()
        ray.get(actor.ping.remote())
        time.sleep(3)
        pids = descendants()
        if renice:
            _renice_ray_daemons(pids)
        cpu0, wall0 = _cpu_seconds(pids), time.perf_counter()
        with_ray = median_train_s()
        ray_cpu = _cpu_seconds(pids) - cpu0
        wall = time.perf_counter() - wall0
        ray.shutdown()
        time.sleep(2)
        out.append({"renice": renice, "alone_s": round(alone, 3), "ray_up_s": round(with_ray, 3), "ratio": round(with_ray / alone, 3),
                    "ray_cpu_share_of_one_core": round(ray_cpu / wall, 3)})
        print(out[-1], flush=True)
    return {"ray_idle": out}


def thread(repeats: int = 3) -> dict:
    cfg = quick_config(Path("/tmp/hfedmoe-engine-costs"))
    set_torch_threads()
    model = build_model(cfg, pretrained=True)
    test = load_test_batches(cfg)
    times: dict[str, list[float]] = {"main": [], "thread": []}

    def timed(where: str) -> None:
        start = time.perf_counter()
        evaluate(model, test, task=cfg.task)
        times[where].append(time.perf_counter() - start)

    timed("main")  # warm-up
    times["main"].clear()
    for _ in range(repeats):
        timed("main")
        worker = threading.Thread(target=timed, args=("thread",))
        worker.start()
        worker.join()
    result = {k: [round(x, 3) for x in v] for k, v in times.items()}
    result["ratio_of_medians"] = round(statistics.median(times["thread"]) / statistics.median(times["main"]), 3)
    print(result, flush=True)
    return {"thread": result}


def _evaluate_alone(where: str) -> None:
    """Build the model and evaluate it 3 times, all in the main thread or all in a second
    thread (nothing parallel ever runs in the other); prints the times."""
    def work() -> None:
        cfg = quick_config(Path("/tmp/hfedmoe-engine-costs"))
        set_torch_threads()
        model = build_model(cfg, pretrained=True)
        test = load_test_batches(cfg)
        evaluate(model, test, task=cfg.task)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            evaluate(model, test, task=cfg.task)
            times.append(time.perf_counter() - start)
        print(statistics.median(times), flush=True)

    if where == "main":
        work()
    else:
        worker = threading.Thread(target=work)
        worker.start()
        worker.join()


def thread_alone(repeats: int = 2) -> dict:
    """Like ``thread``, but each side in its own fresh process (alternated), so the second
    thread is the only one that ever ran parallel torch work, as in the simulation's
    server process (its main thread runs Flower's engine, no torch)."""
    import subprocess

    medians: dict[str, list[float]] = {"main": [], "thread": []}
    for _ in range(repeats):
        for where in ("main", "thread"):
            out = subprocess.run([sys.executable, __file__, f"--alone={where}"], capture_output=True, text=True,
                                 check=True).stdout
            medians[where].append(round(float(out.strip().splitlines()[-1]), 3))
    result = {**medians, "ratio_of_means": round(statistics.mean(medians["thread"]) / statistics.mean(medians["main"]), 3)}
    print(result, flush=True)
    return {"thread_alone": result}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    alone = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--alone=")]
    if alone:
        _evaluate_alone(alone[0])
        sys.exit(0)
    parts = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--part=")] or ["ray-idle", "thread",
                                                                                       "thread-alone"]
    for part in parts:
        if part == "ray-idle":
            ray_idle(renice="--renice" in sys.argv)
        elif part == "thread-alone":
            thread_alone()
        else:
            thread()
