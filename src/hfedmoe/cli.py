"""Command line of hfedmoe: federated fine-tuning of Mixture-of-Experts models on clients with
unequal compute (HFedMoE, arXiv 2601.00583) and its baselines, on Flower.

Subcommands: ``run`` (one federated run), ``compare`` (methods x seeds, sweeps),
``calibrate`` (fit the memory model), ``bench`` (the system's own costs), ``eval`` (test
metrics of an exported model) and ``export`` (a run's model as a Hugging Face / PEFT directory)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import fields
from pathlib import Path

from hfedmoe.compare import add_compare_flags, compare_command
from hfedmoe.config import (
    EMBEDDED_DATASET,
    EMBEDDED_MODEL,
    SPECIALISED_MODEL,
    ConfigError,
    RunConfig,
    parse_float_list,
    parse_int_list,
    parse_str_list,
)
from hfedmoe.methods import METHODS

_HELP = {
    "rounds": "federated rounds",
    "clients": "number of clients (virtual SuperNodes)",
    "clients_per_round": "clients sampled per round (seeded by seed and round, the same for every method); "
                         "0: every client, every round",
    "fraction_train": "Flower's fraction-train: the share of clients sampled per round, K = max(1, round(f x "
                      "clients)); 0: unset; give it or --clients-per-round, not both",
    "local_steps": "local mini-batches per client and round",
    "batch_size": "mini-batch size",
    "lr": "learning rate of pretrained weights (router and head use lr x new-param-lr-mult)",
    "new_param_lr_mult": "learning-rate multiplier for freshly initialised router and head",
    "lam": "lambda: weight of cumulative vs specific importance (Eq. 5)",
    "beta": "beta: weight of the information-bottleneck KL term (Eq. 14)",
    "tau": "usage threshold for uploading an expert and for gate weights (Eq. 18)",
    "alpha": "Dirichlet concentration of the non-IID client split (smaller = more skewed)",
    "expert_budgets": "comma-separated C_budget (experts trained per batch) per client, e.g. 48,48,24,12",
    "mem_budgets": "memory budget per client (B/KB/MB/GB), e.g. 600MB,800MB,1.2GB,2GB; mapped to C_budget "
                   "through the (calibrated) memory model",
    "mem_budget_range": "memory budgets drawn uniformly per client (seeded), e.g. 600MB:2GB (the paper's scheme)",
    "time_budgets": "compute budget per client: seconds of local training per round, e.g. 30,30,15,15",
    "calibration": "memory model of --mem-budgets/--mem-budget-range: a calibration file from `hfedmoe calibrate`; "
                   "'analytic': the first-principles estimate, nothing measured (may lie below the real peak: "
                   "budgets can be exceeded); default: the cached calibration of this model, batch shape, device "
                   "and dtype, measured on first use (a few fresh processes, once)",
    "mem_headroom": "share of each memory budget left unplanned, for the memory model's error and the "
                    "allocator's slow growth over long runs (0.05: plan for 95%%)",
    "round_timeout": "seconds the server waits for a round's replies; later clients count as failed",
    "max_empty_rounds": "stop after this many consecutive rounds without any usable update (0: never)",
    "export_every": "also export the global model every K rounds to <out>/exports/round-K/ (0: final/ only)",
    "dp_epsilon": "local differential privacy on each client's uploaded tensors: epsilon (0 = off)",
    "dp_delta": "local DP delta",
    "dp_clip": "local DP: L2 norm the update of the uploaded tensors is clipped to",
    "resume": "continue the run in --out from its last checkpoint up to --rounds (the rounds after that "
              "checkpoint run again, to the same result)",
    "checkpoint_interval": "seconds between checkpoints of the global state: one is written after a round once "
                           "this long has passed since the last, and after the last round; 0: after every round "
                           "(each write is the whole model: 289 MB for the embedded one, ~0.5 s of CPU)",
    "seed": "random seed (data split, partitions, initialisation)",
    "out": "run directory (default runs/<timestamp>)",
    "model": f"model: {EMBEDDED_MODEL!r} (default: upcycled, every expert a copy of one FFN), "
             f"{SPECIALISED_MODEL!r} (its experts and routers first specialised by topic on a public share of "
             "the embedded data no client holds; built once, cached), a Hugging Face MoE checkpoint (local directory or hub id: "
             "Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, ...) or a BERT-style encoder to upcycle",
    "dataset": f"dataset: {EMBEDDED_DATASET!r} (default, embedded), a local .csv/.jsonl/.parquet file, or a "
               "hub id when online (ag_news, piqa, hellaswag, cais/mmlu map their own fields)",
    "task": "classification, multiple-choice (highest length-normalised log-likelihood) or causal-lm "
            "(instruction SFT, loss on response tokens; reports perplexity)",
    "classifier": "classification on a MoE checkpoint: head (new linear head), label-words (the LM's logits "
                  "of each label's first token), auto (head when transformers has one for the family)",
    "norm_screen": "reject a client's update for the round when its norm, for any expert, the routers or the "
                   "dense parameters, exceeds this many times the median of the round's holders (3 or more); 0: off",
    "robust_agg": "none (the method's weighted merges), trimmed-mean or median: coordinate-wise, each expert over "
                  "the clients that uploaded it, routers and dense over all (unweighted)",
    "trim_fraction": "--robust-agg trimmed-mean: share of the values dropped at each end, per coordinate "
                     "(0.25 of 4 clients: one each side)",
    "client_data": "each client's own data: one .csv/.jsonl/.parquet file per client, comma-separated (client i "
                   "reads the i-th), or a directory of such files (name order); --clients defaults to their number; "
                   "each client holds out --test-fraction of its file for --evaluation federated",
    "labels": "classification: the federation's class names, comma-separated (default: the union of the labels "
              "the clients' data holds, agreed before round 1 without moving data)",
    "test_data": "a test file the server holds and scores the global model on each round (default: the test "
                 "split of --dataset; none with --client-data)",
    "evaluation": "where the global model is scored each round: server (a test set the server holds), federated "
                  "(each client on its held-out part, example-weighted), both, or auto (server when it holds a "
                  "test set, else federated)",
    "text_column": "text column of --dataset FILE (the question for multiple-choice, the prompt for causal-lm)",
    "label_column": "label column of --dataset FILE (labels are discovered from the data; for causal-lm an "
                    "optional category that drives the non-IID split)",
    "choices_column": "multiple-choice: the column holding each example's list of choices, or several "
                      "columns, e.g. sol1,sol2",
    "answer_column": "multiple-choice: the right choice as a 0-based index, a letter (A, B, ...) or its text",
    "response_column": "causal-lm: the response column (the loss covers its tokens only)",
    "num_experts": "experts per MoE layer when upcycling",
    "top_k": "experts per token",
    "max_length": "tokens per text (truncation)",
    "test_fraction": "held-out test share (stratified)",
    "eval_batch_size": "batch size of server-side evaluation",
    "pooling": "token-to-sample pooling of router scores: mean or max",
    "select_by": "expert ranking: ib (I_b, Eq. 15) or importance (s_b, the paper's text)",
    "unselected_experts": "experts a token was routed to but the client does not train this batch: freeze (no "
                          "weight gradient, the input gradient flows through them to the layers below: the paper's "
                          "reading) or detach (their output is a constant: no weight or input gradient, 4-12%% "
                          "cheaper steps; docs/method.md)",
    "gate_normalize": "normalise gate weights alpha to sum to 1 (true) or use the literal Eq. 20 (false)",
    "expert_agg": "expert aggregation: hfedmoe (Eq. 17, over uploaders), fedavg (over all clients; HFedMoE "
                  "ablation, Fig. 16) or activation (FLAME's: over uploaders, weighted by activation frequency^2 x |D|)",
    "gate_agg": "router aggregation: hfedmoe (Eq. 18-21) or fedavg (num_examples-weighted; HFedMoE ablation, Fig. 16)",
    "aux_loss_coef": "load-balancing loss coefficient",
    "lora_rank": "LoRA rank R on every routed expert (one adapter per expert) and the attention projections; "
                 "0 = full fine-tuning (docs/lora.md)",
    "lora_alpha": "LoRA alpha (scaling alpha/R); 0 = 2 x --lora-rank",
    "lora_targets": "comma-separated Linear module names for dense LoRA, e.g. q_proj,v_proj "
                    "(default: the attention projections found in the model)",
    "device": "where clients train and the server evaluates: auto (CUDA when the process sees a GPU), cpu, "
              "cuda or cuda:N",
    "dtype": "model precision: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16; "
             "messages carry this dtype; selection math, losses and LoRA adapters stay float32",
    "gradient_checkpointing": "recompute activations in the backward (transformers' gradient checkpointing): "
                              "less activation memory for about one more forward per step",
    "measure_memory": "report every client's exact peak training memory (peak_mem_bytes) on the CPU too: "
                      "before each local round the process collects garbage and returns freed memory to the "
                      "kernel, which the round then faults back in (about 15%% of a local round here); clients "
                      "with a memory budget, and any CUDA client, always report it",
    "load_in_4bit": "QLoRA: load the checkpoint's linear layers in 4-bit NF4 (bitsandbytes, CUDA only) and train "
                    "LoRA adapters over them; needs --lora-rank",
    "client_gpus": "simulation: GPUs per client, passed to Flower's client_resources (0.25: four clients share a "
                   "GPU and train at once); 0: auto (1 on CUDA, none on CPU)",
    "client_cpus": "simulation: CPU cores per client (Flower's client_resources); 0: auto (all cores, or the "
                   "client's GPU share of them)",
}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def help_text(field: str) -> str | None:
    """The help of run flag ``field``; the method list is read from the registry now, so
    methods registered by plug-ins appear too."""
    if field == "method":
        return "federated method (docs/baselines.md): " + "; ".join(
            f"{name}: {entry.summary}" for name, entry in METHODS.items())
    return _HELP.get(field)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field (``--x-y`` sets ``x_y``), for every subcommand that runs."""
    defaults = RunConfig()
    for f in fields(RunConfig):
        if f.name == "extra":
            continue
        default = getattr(defaults, f.name)
        kind = {bool: _bool, int: int, float: float}.get(type(default), str)
        kind = {"expert_budgets": parse_int_list, "mem_budgets": parse_str_list, "time_budgets": parse_float_list,
                "client_data": parse_str_list, "labels": parse_str_list}.get(f.name, kind)
        flag = f"--{f.name.replace('_', '-')}"
        if f.name == "clients":  # None: one per --client-data file, else the default (run_config_from)
            parser.add_argument(flag, type=int, default=None,
                                help=f"{help_text(f.name)}; default {default}, or one per --client-data file")
            continue
        if default is False:  # an opt-in switch: `--resume`, not `--resume true`
            parser.add_argument(flag, action="store_true", help=help_text(f.name))
        else:
            parser.add_argument(flag, type=kind, default=default, help=help_text(f.name))


def run_config_from(args: argparse.Namespace) -> RunConfig:
    """The validated RunConfig of parsed run flags (raises ConfigError)."""
    values = {f.name: getattr(args, f.name) for f in fields(RunConfig) if f.name != "extra"}
    if values["clients"] is None:
        values["clients"] = RunConfig().clients
        if values["client_data"]:
            values["clients"] = len(RunConfig(client_data=values["client_data"]).client_data_files())
    return RunConfig(**values).validate()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfedmoe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run federated fine-tuning (in-process or on Flower's simulation engine)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_flags(run)
    run.add_argument("--engine", choices=("auto", "inprocess", "simulation"), default="auto",
                     help="auto: in-process (the same ServerApp/ClientApp code without Ray) when clients train one "
                          "at a time on one device, else Flower's simulation engine; inprocess; simulation")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")

    calibrate = sub.add_parser(
        "calibrate", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="measure peak memory and step time vs experts trained per batch; fit the memory model",
    )
    add_run_flags(calibrate)
    calibrate.add_argument("--counts", type=parse_int_list, default=None,
                           help="experts per batch to measure (default: 1/8, 1/4, 1/2, all, at least one per layer)")
    calibrate.add_argument("--steps", type=int, default=None,
                           help="training steps per measurement (default: --local-steps, as in a round: "
                                "allocator fragmentation grows over a round's steps)")
    calibrate.add_argument("--calibration-out", default=None,
                           help="where to write the calibration (default: the cache the run reads)")

    compare = sub.add_parser(
        "compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="run several methods (or an HFedMoE setting sweep) over seeds; write results.md/.json and plots",
    )
    add_run_flags(compare)
    add_compare_flags(compare)

    evaluate = sub.add_parser(
        "eval", help="test metrics (the run's own) of an exported model or a checkpoint on a dataset")
    evaluate.add_argument("--model", required=True,
                          help="an exported directory (a run's final/ or exports/round-K/) or a base checkpoint")
    evaluate.add_argument("--split", choices=("test", "all"), default="test",
                          help="test: the dataset's seeded test split (the run's own when it is the run's "
                               "dataset; the default); all: every example")
    for name in ("dataset", "task", "classifier", "text_column", "label_column", "choices_column", "answer_column",
                 "response_column", "max_length", "test_fraction", "seed", "eval_batch_size", "device", "dtype"):
        kind = {"max_length": int, "seed": int, "eval_batch_size": int, "test_fraction": float}.get(name, str)
        evaluate.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                              help=(_HELP.get(name) or name) + " (default: the exported run's)")
    export = sub.add_parser("export", help="export a run's last checkpoint (Hugging Face / PEFT directory)")
    export.add_argument("run_dir", help="the run directory (holds config.json and checkpoints/)")
    export.add_argument("--out", default=None, help="target directory (default RUN_DIR/final, with --merge RUN_DIR/merged)")
    export.add_argument("--merge", action="store_true",
                        help="LoRA runs: merge the adapters into the base and write a full checkpoint")

    bench = sub.add_parser("bench", help="measure the system's own costs (selection, upload, runtime overhead)")
    bench.add_argument("--quick", action="store_true", help="about a minute: 2 clients, 3 short rounds")
    bench.add_argument("--out", default=None, help="directory for the benchmark's runs (default: a temp dir)")
    bench.add_argument("--engine", choices=("auto", "inprocess", "simulation", "both"), default="auto",
                       help="the federated arm's engine: auto (the one `hfedmoe run` picks here), inprocess, "
                            "simulation (Flower's, on Ray), or both (one federated arm on each, one bare arm)")
    bench.add_argument("--repeats", type=_positive_int, default=2,
                       help="runs of each arm, each in a fresh process, in mirrored order (A B B A); steady "
                            "rounds are the median over them (default 2; 1 halves the time)")
    bench.add_argument("--checkpoint-interval", type=_checkpoint_interval, default=None,
                       help="the federated arm's --checkpoint-interval (default: the run's, 60 s, which these short "
                            "runs reach only after their last round; 0: a checkpoint every round, its cost included)")
    return parser


def _checkpoint_interval(text: str) -> float:
    """argparse type: a --checkpoint-interval that RunConfig accepts (its rule, checked before any arm runs)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    try:
        RunConfig(checkpoint_interval=value).validate()
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (argparse names the flag in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "export":
        return _export(args)
    if args.command == "compare":
        signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so every run's `finally` stops its processes
        return compare_command(args, run_config_from)
    return 2


def _calibrate(args: argparse.Namespace) -> int:
    # torch, transformers: loaded once a command runs, so --help and flag errors stay instant
    from hfedmoe.budgets import calibrate, default_calibration_path, default_counts, write_calibration
    from hfedmoe.recipe import moe_shape  # same reason

    try:
        cfg = run_config_from(args)
        layers, experts = moe_shape(cfg)
    except ConfigError as err:
        print(f"hfedmoe: error: {err}", file=sys.stderr)
        return 2
    total = layers * experts
    counts = args.counts or default_counts(layers, total)
    if min(counts) < layers or max(counts) > total:
        print(f"hfedmoe: error: --counts must lie in {layers}..{total} (one expert per layer .. all)", file=sys.stderr)
        return 2
    print(f"calibrating {total} experts ({layers} MoE layers), batch {cfg.batch_size} x {cfg.max_length} tokens, "
          f"{args.steps or cfg.local_steps} steps per point, each in a fresh process ...", file=sys.stderr)
    steps = args.steps or cfg.local_steps
    result = calibrate(cfg, counts, steps=steps, log=lambda t: print(t, file=sys.stderr, flush=True))
    path = Path(args.calibration_out) if args.calibration_out else default_calibration_path(cfg)
    write_calibration(path, result)
    model = result["memory_model"]
    full = next(p for p in result["points"] if p["trained_experts"] == max(counts))
    print(f"memory model: {model['base_bytes'] / 1e6:.1f} MB + {model['per_expert_bytes'] / 1e6:.2f} MB per trained "
          f"expert, raised {result['upper_bound']['raised_by_bytes'] / 1e6:.1f} MB above the least-squares fit "
          f"to cover every measured peak; max |fit/measured - 1| = {result['max_abs_error']:.1%}", file=sys.stderr)
    for p in result["points"]:
        print(f"  {p['trained_experts']:>4} experts ({p['trained_experts'] / total:5.0%}): step "
              f"{p['step_s']:.3f} s = {p['step_s'] / full['step_s']:.2f}x of all, peak {p['peak_bytes'] / 1e6:.0f} MB "
              f"(predicted {p['predicted_bytes'] / 1e6:.0f} MB)", file=sys.stderr)
    print(f"written to {path}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hfedmoe.export import EVAL_SETTINGS, evaluate_directory  # torch, transformers: only a command pays

    try:
        result = evaluate_directory(args.model, {k: getattr(args, k) for k in EVAL_SETTINGS}, split=args.split)
    except (ConfigError, OSError, ValueError) as err:
        print(f"hfedmoe: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    shown = ", ".join(f"{k} {result[k]:.4f}" for k in ("accuracy", "loss", "perplexity") if k in result)
    print(f"{result['model']} on {result['dataset']} ({result['split']}, {result['num_examples']} examples): "
          f"{shown}", file=sys.stderr)
    print(json.dumps(result), flush=True)  # the last line: machine-readable
    return 0


def _export(args: argparse.Namespace) -> int:
    from hfedmoe.export import export_run  # torch, transformers: only a command pays

    try:
        out = export_run(args.run_dir, args.out, merge=args.merge)
    except (ConfigError, OSError) as err:
        print(f"hfedmoe: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(str(out))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from hfedmoe.bench import run_bench  # starts Ray's simulation engine: loaded only for `bench`

    signal.signal(signal.SIGTERM, _exit_on_sigterm)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    result = run_bench(quick=args.quick, out_dir=Path(args.out) if args.out else None, log=log,
                       engine=args.engine, repeats=args.repeats, checkpoint_interval=args.checkpoint_interval)
    for key in ("engine", "selection_overhead", "upload_over_floor", "upload_vs_fedavg_full", "runtime_overhead",
                "runtime_overhead_per_repeat", "fixed_cost_per_client_s", "framework_s_per_client", "accounted_overhead"):
        log(f"{key:>27}: {result[key]}")
    for name, figures in result.get("engines", {}).items():
        if name != result["engine"]:
            log(f"{name:>27}: runtime_overhead {figures['runtime_overhead']}, "
                f"fixed_cost_per_client_s {figures['fixed_cost_per_client_s']}, "
                f"framework_s_per_client {figures['framework_s_per_client']}, "
                f"accounted_overhead {figures['accounted_overhead']}")
    print(json.dumps(result), flush=True)  # the last line: machine-readable
    return 0


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    # torch, transformers, rich: loaded once a command runs, so --help and flag errors stay instant
    from hfedmoe.budgets import client_budgets
    from hfedmoe.moe import make_access  # same reason
    from hfedmoe.progress import RichReporter  # same reason
    from hfedmoe.recipe import build_model, moe_shape, resolve_data_settings  # same reason
    from hfedmoe.recipe.device import agreed_dtype  # same reason
    from hfedmoe.rundir import RunRecorder, default_run_dir  # same reason

    try:
        cfg = run_config_from(args)
        cfg.budgets_for(*moe_shape(cfg))  # fail before any process starts
        if cfg.resume and not cfg.out:
            raise ConfigError("--resume needs --out: the directory of the run to continue")
        cfg.dtype = agreed_dtype(cfg)  # as the server will: a resumed run compares the resolved dtype
        resolve_data_settings(cfg)  # labels and evaluation mode, as the server will
        cfg.out = str(cfg.out or default_run_dir())
        if cfg.resume:
            RunRecorder(cfg.out, cfg)  # checks the checkpoint and the settings before anything starts
        elif (Path(cfg.out) / "metrics.jsonl").exists():
            raise ConfigError(f"{cfg.out} already holds a run (metrics.jsonl): add --resume to continue it, "
                              "or choose another --out")
        if cfg.mem_budgets or cfg.mem_budget_range:
            # Memory budgets -> C_budget now, so a budget too small fails before Flower starts; without a
            # calibration for this shape this measures one (first use), which the server then finds cached.
            client_budgets(cfg, make_access(build_model(cfg, pretrained=False)))
    except (ConfigError, FileExistsError) as err:
        print(f"hfedmoe: error: {err}", file=sys.stderr)
        return 2
    from hfedmoe.fl.simulation import resolve_engine  # torch is loaded by now; Ray only once it runs

    engine = resolve_engine(cfg, args.engine)
    if engine == "simulation":
        from hfedmoe.fl.simulation import run_simulation as run_federation  # Flower's simulation engine and Ray
    else:
        from hfedmoe.fl.inprocess import run_inprocess as run_federation  # the ServerApp/ClientApp, no Ray

    reporter = RichReporter(cfg)
    print(f"hfedmoe: engine {engine}" + (" (clients train one at a time here; --engine simulation for Flower's "
                                         "simulation engine)" if engine == "inprocess" and args.engine == "auto"
                                         else ""), flush=True)
    # SIGTERM -> SystemExit, so the `finally` that stops Ray's processes runs.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        summary = run_federation(cfg, reporter, verbose=args.verbose)
    except KeyboardInterrupt:
        print("hfedmoe: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    except (ConfigError, FileExistsError) as err:
        print(f"hfedmoe: error: {err}", file=sys.stderr)
        return 2
    if summary.get("aborted"):
        print(f"hfedmoe: error: the run stopped: {summary['aborted']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
