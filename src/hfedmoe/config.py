"""The run configuration: one validated dataclass shared by CLI, server and clients.

It travels to clients inside every message (as JSON in a ConfigRecord), so a
client needs nothing but the message and its own node config to rebuild the same
task. A run is reproducible from its ``config.json``.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hfedmoe.methods.registry import (
    DEFAULT_MERGE,
    DEFAULT_METHOD,
    EXPERT_MERGES,
    ROUTER_WEIGHTS,
    method_entry,
    method_names,
)

POOLINGS = ("mean", "max")
SELECT_BY = ("ib", "importance")
# What the deferred backward does with experts a token was routed to but the client does not
# train: detach (constants: no weight or input gradient) or freeze (no weight gradient, the
# input gradient flows through them; the paper's reading). docs/method.md compares them.
UNSELECTED_EXPERTS = ("detach", "freeze")
# Task formats (hfedmoe.training.objectives): what a batch's loss and the test metrics are.
TASKS = ("classification", "multiple-choice", "causal-lm")
CLASSIFIERS = ("auto", "head", "label-words")  # classification on a MoE checkpoint: new head or label words
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # --dtype (hfedmoe.recipe.device resolves auto)
EMBEDDED_MODEL = "embedded-minilm-moe"
# The same upcycled MiniLM whose experts and routers were first specialised on a public share
# of the embedded data that no client holds (hfedmoe.recipe.specialise): experts that differ
# and routing that differs by topic, built once on first use and cached.
SPECIALISED_MODEL = "embedded-minilm-moe-specialised"
EMBEDDED_MODELS = (EMBEDDED_MODEL, SPECIALISED_MODEL)
# --calibration analytic: the first-principles memory estimate, no measurement (possibly
# below the real peak); unset: the cached calibration of the run's shape, measured on
# first use (hfedmoe.budgets.calibration)
ANALYTIC_CALIBRATION = "analytic"
EMBEDDED_DATASET = "bbc-news"
# --evaluation: where the global model is scored each round. server: on a test set the server
# holds (the split of --dataset, or --test-data); federated: each client on its own held-out
# part, aggregated by the server; both; auto: server when the server holds a test set, else federated
EVALUATIONS = ("auto", "server", "federated", "both")
# What a setting added later meant in runs recorded before it existed, where that is not
# its default now (a resumed or compared older run reads its config.json with these).
LEGACY_VALUES = {"evaluation": "server", "unselected_experts": "detach"}
ROBUST_MERGES = ("none", "trimmed-mean", "median")  # hfedmoe.core.robust (config stays torch-free)
DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")  # hfedmoe.data.files.FORMATS


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the fix."""


@dataclass
class RunConfig:
    """Every knob of a federated run (CLI flag ``--x-y`` sets field ``x_y``)."""

    rounds: int = 3
    clients: int = 4
    clients_per_round: int = 0  # K clients sampled per round (seeded); 0: every client, every round
    fraction_train: float = 0.0  # Flower's fraction-train: K = max(1, round(f x clients)); 0: unset
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 1e-4
    new_param_lr_mult: float = 10.0
    lam: float = 0.9
    beta: float = 0.1
    tau: float = 0.05
    alpha: float = 0.5  # Dirichlet concentration of the non-IID client split
    expert_budgets: list[int] | None = None  # C_budget per client; None -> paper-like default
    mem_budgets: list[str] | None = None  # memory budget per client ("600MB"); mapped to C_budget
    mem_budget_range: str | None = None  # "600MB:2GB": seeded uniform per client (the paper's scheme)
    time_budgets: list[float] | None = None  # seconds of local training per round, per client
    calibration: str | None = None  # memory calibration file, "analytic", or None: the cache (measured on first use)
    mem_headroom: float = 0.05  # share of a memory budget left unplanned (model error, allocator growth)
    resume: bool = False  # continue the run in --out from its last checkpoint, up to --rounds
    # The global state is checkpointed after a round once this many seconds have passed since
    # the last checkpoint, and after the last round; 0: after every round (hfedmoe.rundir)
    checkpoint_interval: float = 60.0
    round_timeout: float = 3600.0  # seconds the server waits for replies; late clients count as failed
    max_empty_rounds: int = 3  # stop after this many rounds in a row with no usable update (0: never)
    norm_screen: float = 10.0  # reject a client whose update norm in a group is > this x the round's median (0: off)
    robust_agg: str = "none"  # none | trimmed-mean | median: per expert over its uploaders, routers, dense
    trim_fraction: float = 0.25  # --robust-agg trimmed-mean: share of values dropped at each end, per coordinate
    export_every: int = 0  # also export the global model every K rounds to exports/round-K/ (0: final/ only)
    dp_epsilon: float = 0.0  # local differential privacy on uploads (0: off); see hfedmoe.fl.dp
    dp_delta: float = 1e-5
    dp_clip: float = 1.0  # L2 clipping norm of a client's update (also the sensitivity)
    seed: int = 0
    out: str | None = None
    model: str = EMBEDDED_MODEL
    dataset: str = EMBEDDED_DATASET
    client_data: list[str] | None = None  # one data file per client (or one directory of them) instead of --dataset
    labels: list[str] | None = None  # the class names of the federation (classification); None: found in the data
    test_data: str | None = None  # a test file the server holds (instead of --dataset's test split)
    evaluation: str = "auto"  # auto | server | federated | both (EVALUATIONS above)
    task: str = "classification"  # classification | multiple-choice | causal-lm
    classifier: str = "auto"  # classification on a checkpoint: "head" (new linear head), "label-words", auto
    text_column: str = "text"  # for --dataset FILE: the text, question (multiple-choice) or prompt (causal-lm)
    label_column: str = "label"  # the class (classification); an optional grouping for causal-lm's split
    choices_column: str = "choices"  # multiple-choice: one list column, or several columns "sol1,sol2"
    answer_column: str = "answer"  # multiple-choice: index, letter or text of the right choice
    response_column: str = "response"  # causal-lm: the response trained on (loss on its tokens only)
    method: str = DEFAULT_METHOD
    num_experts: int = 8
    top_k: int = 2
    max_length: int = 64
    test_fraction: float = 0.2
    eval_batch_size: int = 64
    pooling: str = "mean"
    select_by: str = "ib"
    unselected_experts: str = "freeze"  # the paper's reading; chosen on measured accuracy (docs/method.md)
    gate_normalize: bool = True
    expert_agg: str = DEFAULT_MERGE
    gate_agg: str = DEFAULT_MERGE
    aux_loss_coef: float = 0.01
    lora_rank: int = 0  # 0: full fine-tuning; R > 0: PEFT LoRA on experts + attention (docs/lora.md)
    lora_alpha: float = 0.0  # LoRA scaling numerator; 0: 2 x lora_rank
    lora_targets: str = ""  # comma-separated Linear names for dense LoRA; "": the model's attention projections
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto: CUDA when the process sees a GPU (hfedmoe.recipe.device)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto: bfloat16 on a GPU that has it, else float32
    gradient_checkpointing: bool = False  # recompute activations in the backward (transformers' own)
    # Every client's exact peak training memory on the CPU (costs ~15% of a local round,
    # hfedmoe.training.memory.PeakMemory); clients with a memory budget measure it anyway
    measure_memory: bool = False
    load_in_4bit: bool = False  # QLoRA: NF4 base weights (bitsandbytes), LoRA on top; needs --lora-rank and CUDA
    client_gpus: float = 0.0  # simulation: GPUs per client (0.25: four clients share one); 0: auto (1 on CUDA)
    client_cpus: int = 0  # simulation: CPU cores per client; 0: auto (all cores, or their GPU share)
    extra: dict = field(default_factory=dict)

    # --- validation -------------------------------------------------------------
    def validate(self) -> "RunConfig":
        """Raise ConfigError naming the first invalid field and a valid choice."""
        positive = ("rounds", "clients", "local_steps", "batch_size", "num_experts", "top_k", "max_length",
                    "eval_batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        self._validate_sampling()
        for name in ("lr", "alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"--{_flag(name)} must be a positive number, got {value!r}")
        if not (isinstance(self.lam, (int, float)) and 0.0 <= self.lam <= 1.0):
            raise ConfigError(f"--lam must lie in [0, 1], got {self.lam}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"--beta must be a finite number >= 0, got {self.beta}")
        if not (isinstance(self.tau, (int, float)) and 0.0 <= self.tau <= 1.0):
            raise ConfigError(f"--tau must lie in [0, 1] (a usage threshold), got {self.tau}")
        if isinstance(self.checkpoint_interval, bool) or not (
                isinstance(self.checkpoint_interval, (int, float)) and math.isfinite(self.checkpoint_interval)
                and self.checkpoint_interval >= 0):
            raise ConfigError(f"--checkpoint-interval must be seconds >= 0 (0: every round), "
                              f"got {self.checkpoint_interval!r}")
        if not (isinstance(self.round_timeout, (int, float)) and math.isfinite(self.round_timeout)
                and self.round_timeout > 0):
            raise ConfigError(f"--round-timeout must be positive seconds, got {self.round_timeout!r}")
        if isinstance(self.max_empty_rounds, bool) or not isinstance(self.max_empty_rounds, int) \
                or self.max_empty_rounds < 0:
            raise ConfigError(f"--max-empty-rounds must be an integer >= 0, got {self.max_empty_rounds!r}")
        if isinstance(self.export_every, bool) or not isinstance(self.export_every, int) or self.export_every < 0:
            raise ConfigError(f"--export-every must be an integer >= 0 (rounds; 0: final/ only), "
                              f"got {self.export_every!r}")
        if not (isinstance(self.dp_epsilon, (int, float)) and math.isfinite(self.dp_epsilon) and self.dp_epsilon >= 0):
            raise ConfigError(f"--dp-epsilon must be >= 0 (0 switches local DP off), got {self.dp_epsilon!r}")
        if self.dp_epsilon and not (0.0 < self.dp_delta < 1.0 and self.dp_clip > 0):
            raise ConfigError(f"local DP needs 0 < --dp-delta < 1 and --dp-clip > 0, got {self.dp_delta}, "
                              f"{self.dp_clip}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"--test-fraction must lie in (0, 1), got {self.test_fraction}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"--top-k {self.top_k} exceeds --num-experts {self.num_experts}")
        if self.method not in method_names():
            raise ConfigError(f"--method {self.method!r} is not available; choose one of "
                              f"{', '.join(method_names())}")
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.classifier not in CLASSIFIERS:
            raise ConfigError(f"--classifier must be one of {', '.join(CLASSIFIERS)}, got {self.classifier!r}")
        if self.task != "classification" and self.model in EMBEDDED_MODELS:
            raise ConfigError(f"--task {self.task} scores text with a language-model head; the embedded MiniLM "
                              "is an encoder without one: pass a MoE causal LM with --model (e.g. a Mixtral, "
                              "Qwen-MoE, OLMoE or DeepSeek checkpoint)")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"--pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.select_by not in SELECT_BY:
            raise ConfigError(f"--select-by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}")
        if self.unselected_experts not in UNSELECTED_EXPERTS:
            raise ConfigError(f"--unselected-experts must be one of {', '.join(UNSELECTED_EXPERTS)}, "
                              f"got {self.unselected_experts!r}")
        for name, choices in (("expert_agg", EXPERT_MERGES), ("gate_agg", ROUTER_WEIGHTS)):
            if getattr(self, name) not in choices:
                value = getattr(self, name)
                raise ConfigError(f"--{_flag(name)} must be one of {', '.join(choices)}, got {value!r}")
        # The aggregation switches ablate HFedMoE's server; baselines bring their own.
        defaults = RunConfig()
        if not method_entry(self.method).ablation_switches and \
                (self.expert_agg, self.gate_agg) != (defaults.expert_agg, defaults.gate_agg):
            raise ConfigError(f"--expert-agg/--gate-agg ablate HFedMoE; --method {self.method} has its own "
                              "aggregation (docs/baselines.md): leave them at hfedmoe")
        self._validate_data()
        self._validate_robustness()
        self._validate_lora()
        self._validate_hardware()
        if self.expert_budgets is not None:
            if len(self.expert_budgets) != self.clients:
                raise ConfigError(
                    f"--expert-budgets lists {len(self.expert_budgets)} budgets for {self.clients} clients: "
                    "give exactly one per client (or set --clients to match)"
                )
            if any((not isinstance(b, int)) or b < 1 for b in self.expert_budgets):
                raise ConfigError(f"--expert-budgets must be positive integers, got {self.expert_budgets}")
        given = [flag for flag, value in (("--expert-budgets", self.expert_budgets), ("--mem-budgets", self.mem_budgets),
                                          ("--mem-budget-range", self.mem_budget_range)) if value]
        if len(given) > 1:
            raise ConfigError(f"{' and '.join(given)} both set budgets: give only one of them")
        if self.mem_budgets is not None:
            if len(self.mem_budgets) != self.clients:
                raise ConfigError(f"--mem-budgets lists {len(self.mem_budgets)} budgets for {self.clients} clients: "
                                  "give exactly one per client")
            for text in self.mem_budgets:
                _bytes(text, "--mem-budgets")
        if self.mem_budget_range is not None:
            self.mem_budget_bounds()
        if self.calibration is not None and (not isinstance(self.calibration, str) or not self.calibration.strip()):
            raise ConfigError(f"--calibration takes a calibration file from `hfedmoe calibrate` or "
                              f"{ANALYTIC_CALIBRATION!r} (the unmeasured estimate), got {self.calibration!r}")
        if self.calibration and self.calibration.strip().lower() == ANALYTIC_CALIBRATION \
                and self.calibration != ANALYTIC_CALIBRATION:
            raise ConfigError(f"--calibration {self.calibration!r}: write {ANALYTIC_CALIBRATION!r} for the unmeasured "
                              "estimate")
        if isinstance(self.mem_headroom, bool) or not (isinstance(self.mem_headroom, (int, float))
                                                       and 0.0 <= self.mem_headroom < 0.5):
            raise ConfigError(f"--mem-headroom must lie in [0, 0.5) (a share of each memory budget, e.g. 0.05), "
                              f"got {self.mem_headroom!r}")
        if self.time_budgets is not None:
            if len(self.time_budgets) != self.clients:
                raise ConfigError(f"--time-budgets lists {len(self.time_budgets)} budgets for {self.clients} "
                                  "clients: give exactly one per client (seconds)")
            if any(not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0) for t in self.time_budgets):
                raise ConfigError(f"--time-budgets must be positive seconds, got {self.time_budgets}")
        return self

    def _validate_sampling(self) -> None:
        k, f = self.clients_per_round, self.fraction_train
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.clients:
            raise ConfigError(f"--clients-per-round must be an integer in [0, --clients {self.clients}] (0: every "
                              f"client takes part in every round), got {k!r}: lower it or raise --clients")
        if isinstance(f, bool) or not (isinstance(f, (int, float)) and 0.0 <= f <= 1.0):
            raise ConfigError(f"--fraction-train (Flower's fraction-train) must lie in [0, 1] (0: unset, 1: every "
                              f"client), got {f!r}")
        if k and 0.0 < f < 1.0:
            raise ConfigError(f"--clients-per-round {k} and --fraction-train {f} both set the clients of a round: "
                              "give only one of them (fraction-train 1.0 or 0 leaves clients-per-round in charge)")

    def participants_per_round(self) -> int:
        """K, the clients that take part in one round: ``clients_per_round`` when set,
        else ``max(1, round(fraction_train x clients))`` when fraction_train is set
        (1.0 gives every client), else every client."""
        if self.clients_per_round:
            return self.clients_per_round
        if self.fraction_train:
            return min(self.clients, max(1, round(self.fraction_train * self.clients)))
        return self.clients

    def round_participants(self, server_round: int) -> list[int]:
        """The partition ids sampled for ``server_round`` (the run's absolute round), sorted.

        Seeded by (seed, round, clients, K) only: every method of a compare seed, and a
        resumed run, sample the same clients as an uninterrupted run. K = clients: all.
        """
        k = self.participants_per_round()
        if k >= self.clients:
            return list(range(self.clients))
        # A str seed is hashed with SHA-512 (random.seed version 2): stable across processes.
        rng = random.Random(f"hfedmoe-participants:{self.seed}:{server_round}:{self.clients}:{k}")
        return sorted(rng.sample(range(self.clients), k))

    def _validate_data(self) -> None:
        if self.evaluation not in EVALUATIONS:
            raise ConfigError(f"--evaluation must be one of {', '.join(EVALUATIONS)}, got {self.evaluation!r}")
        if self.labels is not None:
            if self.task != "classification":
                raise ConfigError(f"--labels names the classes of a classification task; --task {self.task} has "
                                  "none: drop --labels")
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) \
                    or any(not isinstance(x, str) or not x.strip() for x in self.labels):
                raise ConfigError(f"--labels takes two or more distinct class names, e.g. business,sport,tech; "
                                  f"got {self.labels!r}")
        if self.test_data is not None:
            _data_file(self.test_data, "--test-data")
        if self.client_data is not None:
            files = self.client_data_files()
            if len(files) != self.clients:
                raise ConfigError(f"--client-data gives {len(files)} files for {self.clients} clients: give one "
                                  "file per client (and --clients to match, or leave --clients out)")
            if self.dataset != EMBEDDED_DATASET:
                raise ConfigError("--client-data and --dataset both say where the clients' data is: give one of "
                                  "them (a server-side test file is --test-data)")
        if self.task != "classification" and self.dataset == EMBEDDED_DATASET and not self.client_data:
            raise ConfigError(f"--task {self.task} needs a dataset in that format: pass --dataset FILE "
                              "(csv/jsonl/parquet), a hub id such as piqa, hellaswag or cais/mmlu, or "
                              "--client-data FILES")

    def _validate_robustness(self) -> None:
        if self.robust_agg not in ROBUST_MERGES:
            raise ConfigError(f"--robust-agg must be one of {', '.join(ROBUST_MERGES)}, got {self.robust_agg!r}")
        screen = self.norm_screen
        if isinstance(screen, bool) or not (isinstance(screen, (int, float)) and math.isfinite(screen)
                                            and (screen == 0 or screen > 1)):
            raise ConfigError(f"--norm-screen must be 0 (off) or a factor above 1 (e.g. 10: reject an update "
                              f"10x the round's median norm), got {screen!r}")
        trim = self.trim_fraction
        if isinstance(trim, bool) or not (isinstance(trim, (int, float)) and 0.0 <= trim < 0.5):
            raise ConfigError(f"--trim-fraction must lie in [0, 0.5) (share dropped at each end), got {trim!r}")

    def client_data_files(self) -> list[str]:
        """The files of ``--client-data``, client i's first: the list given, or the data
        files of one directory in name order (empty without --client-data)."""
        if not self.client_data:
            return []
        entries = [str(e) for e in self.client_data]
        if len(entries) == 1 and _is_dir(entries[0]):
            folder = Path(entries[0]).expanduser()
            files = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
            if not files:
                raise ConfigError(f"--client-data {entries[0]}: the directory holds no .csv / .jsonl / .parquet "
                                  "file: put one file per client there")
            return files
        for entry in entries:
            _data_file(entry, "--client-data")
        return entries

    def _validate_lora(self) -> None:
        rank = self.lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ConfigError(f"--lora-rank must be an integer >= 0 (0 = full fine-tuning), got {rank!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ConfigError(f"--lora-alpha must be a number >= 0 (0 = 2 x --lora-rank), got {alpha!r}")
        if not rank:
            if alpha or self.lora_targets:
                raise ConfigError("--lora-alpha/--lora-targets configure LoRA: also pass --lora-rank R (e.g. 8)")
            return
        names = [part.strip() for part in str(self.lora_targets).split(",")] if self.lora_targets else []
        bad = [n for n in names if not n.isidentifier()]
        if bad:
            raise ConfigError(f"--lora-targets takes comma-separated module names like q_proj,v_proj, got {bad[0]!r}")
        if self.model in EMBEDDED_MODELS:
            raise ConfigError(f"--lora-rank applies to Hugging Face MoE checkpoints with fused experts; the embedded "
                              f"{EMBEDDED_MODEL!r} is fine-tuned fully: drop --lora-rank or pass --model DIR")

    def _validate_hardware(self) -> None:
        """The hardware flags' syntax; whether this machine can honour them is checked where
        torch is loaded (hfedmoe.recipe.device.check_runtime)."""
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.load_in_4bit:
            if self.model in EMBEDDED_MODELS:
                raise ConfigError(f"--load-in-4bit quantizes a Hugging Face checkpoint's linear layers; the embedded "
                                  f"{EMBEDDED_MODEL!r} is small and fine-tuned fully: drop --load-in-4bit or pass "
                                  "--model DIR")
            if not self.lora_rank:
                raise ConfigError("--load-in-4bit (QLoRA) trains LoRA adapters over frozen 4-bit weights: also pass "
                                  "--lora-rank R (e.g. 8)")
        gpus = self.client_gpus
        if isinstance(gpus, bool) or not (isinstance(gpus, (int, float)) and math.isfinite(gpus) and gpus >= 0):
            raise ConfigError(f"--client-gpus must be a number >= 0 (0.25: four clients share a GPU; 0: auto), "
                              f"got {gpus!r}")
        cpus = self.client_cpus
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 0:
            raise ConfigError(f"--client-cpus must be an integer >= 0 (0: auto), got {cpus!r}")

    def lora_alpha_value(self) -> float:
        """The effective LoRA alpha (``--lora-alpha``, or 2 x rank when left at 0)."""
        return float(self.lora_alpha) if self.lora_alpha else 2.0 * self.lora_rank

    def lora_target_names(self) -> list[str]:
        """The names of ``--lora-targets`` (empty: discover the attention projections)."""
        return [part.strip() for part in str(self.lora_targets).split(",") if part.strip()]

    def mem_budget_bounds(self) -> tuple[int, int]:
        """(low, high) bytes of --mem-budget-range."""
        parts = str(self.mem_budget_range).split(":")
        if len(parts) != 2:
            raise ConfigError(f"--mem-budget-range must look like 600MB:2GB, got {self.mem_budget_range!r}")
        low, high = (_bytes(p, "--mem-budget-range") for p in parts)
        if low > high:
            raise ConfigError(f"--mem-budget-range {self.mem_budget_range}: the low end exceeds the high end")
        return low, high

    def budgets_for(self, num_layers: int, experts_per_layer: int | None = None) -> list[int]:
        """C_budget per client, checked against the model's ``num_layers`` MoE layers.

        Default (paper-like: about half the clients constrained): the first
        ceil(C/2) clients may train every expert; the others get fractions from
        1/2 down to 1/4 of all experts, never below one expert per layer.
        """
        # A MoE checkpoint brings its own expert count; --num-experts shapes upcycling only.
        total = num_layers * (experts_per_layer or self.num_experts)
        if self.expert_budgets is not None:
            budgets = list(self.expert_budgets)
        else:
            full = math.ceil(self.clients / 2)
            constrained = self.clients - full
            budgets = [total] * full
            for i in range(constrained):
                frac = 0.5 if constrained == 1 else 0.5 - 0.25 * i / (constrained - 1)
                budgets.append(max(num_layers, round(total * frac)))
        too_small = [(i, b) for i, b in enumerate(budgets) if b < num_layers]
        if too_small:
            i, b = too_small[0]
            raise ConfigError(
                f"expert budget {b} of client {i} cannot cover the model's {num_layers} MoE layers "
                f"(HFedMoE trains at least one expert per layer): the minimum budget is {num_layers}; "
                f"raise it in --expert-budgets"
            )
        return [min(b, total) for b in budgets]

    # --- (de)serialisation --------------------------------------------------------
    @classmethod
    def saved_settings(cls, saved: dict) -> dict:
        """A recorded ``config.json`` with every setting added since filled in: its
        value then (LEGACY_VALUES), else its default."""
        return {**json.loads(cls().to_json()), **LEGACY_VALUES, **saved}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown configuration key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_flower_run_config(cls, run_config: dict) -> "RunConfig":
        """Build from ``[tool.flwr.app.config]`` (dash-separated keys, as ``flwr run`` passes)."""
        data: dict = {}
        aliases = {"num-server-rounds": "rounds", "dirichlet-alpha": "alpha", "num-clients": "clients"}
        known = {f.name for f in fields(cls)}
        for key, value in run_config.items():
            name = aliases.get(key, key.replace("-", "_"))
            if name not in known:
                raise ConfigError(f"unknown run config key {key!r} in [tool.flwr.app.config]")
            if name == "expert_budgets":
                value = parse_int_list(value) if value else None
            elif name == "mem_budgets":
                value = parse_str_list(value) if value else None
            elif name == "time_budgets":
                value = parse_float_list(value) if value else None
            elif name in ("client_data", "labels"):
                value = parse_str_list(value) if value else None
            elif name == "test_data" and value == "":
                value = None
            elif name in ("mem_budget_range", "calibration") and value == "":
                value = None
            elif name in ("out",) and value == "":
                value = None
            elif name in ("model", "dataset") and value == "":
                continue
            data[name] = value
        return cls(**data)


def _is_dir(path: str) -> bool:
    return Path(path).expanduser().is_dir()


def _data_file(path: str, flag: str) -> None:
    """A data file the user named: it exists and has a readable suffix."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    if p.suffix.lower() not in DATA_SUFFIXES:
        raise ConfigError(f"{flag} {path}: unsupported file type {p.suffix!r}; use .csv, .jsonl or .parquet")


def _bytes(text: str, flag: str) -> int:
    # hfedmoe.core's package imports torch: loaded here, so --help and flag errors stay instant
    from hfedmoe.core.budget import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as err:
        raise ConfigError(f"{flag}: {err}") from None


def parse_str_list(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def parse_float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers like 30,60,120, got {text!r}") from None


def parse_int_list(text: str) -> list[int]:
    """'48,48,24,12' -> [48, 48, 24, 12], with a clear error for anything else."""
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers like 48,48,24,12, got {text!r}") from None


def _flag(name: str) -> str:
    return name.replace("_", "-")
