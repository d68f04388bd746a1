"""A run's model as a directory other tools load: Hugging Face, PEFT, or hfedmoe's own.

:func:`export_model` writes one global state (the final one in ``final/``, or every K
rounds under ``exports/round-K/``) as:

- full fine-tuning of a transformers checkpoint: ``save_pretrained`` of the
  transformers model itself (``config.json``, ``model.safetensors``; a
  sequence-classification head carries the run's labels as ``id2label``/``label2id``)
  plus the tokenizer: ``AutoModelFor<Task>.from_pretrained(dir)`` loads it;
- LoRA (``--lora-rank``): a PEFT adapter directory (``adapter_config.json``,
  ``adapter_model.safetensors``; routers and head as ``modules_to_save``):
  ``PeftModel.from_pretrained(base, dir)`` loads it; ``merge=True`` writes the merged
  full checkpoint instead;
- the embedded upcycled MiniLM (no transformers class): the module's state dict in
  ``model.safetensors``, which :func:`load_exported` rebuilds.

Every export holds ``hfedmoe.json``: the model spec, the label names and the run's
settings (so ``hfedmoe eval`` finds the run's data and split).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hfedmoe.config import ConfigError, RunConfig
from hfedmoe.models.hf_wrappers import (
    HFCausalLM,
    HFSequenceClassifier,
    LabelWordsClassifier,
    Seq2SeqAsLM,
    Seq2SeqLabelWords,
)
from hfedmoe.models.upcycled import UpcycledSpec, build_upcycled_classifier
from hfedmoe.moe.fused import find_fused_blocks
from hfedmoe.moe.lora import resolve_targets
from hfedmoe.moe.switch import decoder_layer_flags
from hfedmoe.moe import make_access
from hfedmoe.recipe import (
    build_model,
    dataset_batches,
    label_names,
    load_dataset_examples,
    load_run_test_examples,
    model_spec,
    quiet_transformers,
    resolve_model_path,
    tokenizer_for,
)
from hfedmoe.recipe.device import run_device, run_dtype
from hfedmoe.training import evaluate

INFO_FILE = "hfedmoe.json"  # next to HF's config.json, never in its place


def _modules_to_save(inner: torch.nn.Module) -> list[str]:
    """Module paths (inside the transformers model) of what LoRA trains fully: routers and heads."""
    return sorted({name.rpartition(".")[0] for name, p in inner.named_parameters()
                   if p.requires_grad and ".lora_" not in name})


def export_model(cfg: RunConfig, model: torch.nn.Module, out: str | Path, labels: list[str],
                 merge: bool = False) -> Path:
    """Write ``model`` (the run's model, its global state already loaded) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = model_spec(cfg)
    info = {"spec": spec, "label_names": list(labels), "run_config": json.loads(cfg.to_json())}
    if spec["kind"] == "upcycled":
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(out / "model.safetensors"))
        info["format"] = "hfedmoe-upcycled"
    else:
        inner = model.model  # the transformers model inside hfedmoe's forward wrapper
        if spec["kind"] == "hf-sequence-classification":
            inner.config.id2label = dict(enumerate(labels))
            inner.config.label2id = {name: i for i, name in enumerate(labels)}
        if cfg.lora_rank:
            if merge:
                _as_peft_model(cfg, inner).merge_and_unload().save_pretrained(out)
                info["format"] = "transformers"
                info["merged_from_lora"] = True
            else:
                _save_adapter(cfg, inner, out)
                info["format"] = "peft"
        else:
            inner.save_pretrained(out)
            info["format"] = "transformers"
    tokenizer_for(str(resolve_model_path(cfg))).save_pretrained(out)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _lora_config(cfg: RunConfig, inner: torch.nn.Module, base: torch.nn.Module):
    """The run's LoRA as a PEFT ``LoraConfig`` (as :func:`hfedmoe.moe.lora.apply_lora` injects it),
    with the fully trained routers and head of ``inner`` as ``modules_to_save``."""
    from peft import LoraConfig  # optional, heavy: LoRA runs only

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha_value(), lora_dropout=0.0, bias="none",
                      target_modules=resolve_targets(base, cfg.lora_target_names()),
                      target_parameters=[key for block in find_fused_blocks(base) for key in block.expert_keys],
                      modules_to_save=_modules_to_save(inner), base_model_name_or_path=str(resolve_model_path(cfg)))


def _save_adapter(cfg: RunConfig, inner: torch.nn.Module, out: Path) -> None:
    """PEFT's adapter directory of ``inner`` (LoRA injected in place), without a second base in memory.

    The key names PEFT saves and loads are read from a ``PeftModel`` over a meta-device
    copy of the architecture (no weights); the tensors are ``inner``'s own trainable
    ones (adapters, routers, head), so the file is what ``PeftModel.save_pretrained``
    writes and ``PeftModel.from_pretrained(base, out)`` loads.
    """
    from peft import get_peft_model, get_peft_model_state_dict  # optional, heavy: LoRA runs only

    with torch.device("meta"):
        skeleton = type(inner)(inner.config)
    config = _lora_config(cfg, inner, skeleton)
    expected = set(get_peft_model_state_dict(get_peft_model(skeleton, config)))
    tensors = {}
    for name, param in inner.named_parameters():
        if param.requires_grad:
            key = "base_model.model." + name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.",
                                                                                            ".lora_B.")
            tensors[key] = param.detach().cpu().contiguous()
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise RuntimeError(f"LoRA export: the trained tensors do not match PEFT's adapter keys, e.g. {odd[:3]}")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))


def _as_peft_model(cfg: RunConfig, inner: torch.nn.Module):
    """A ``PeftModel`` over a fresh copy of the base holding ``inner``'s trained tensors
    (``--merge``: a second full model in memory, then merged).

    hfedmoe injects LoRA with ``inject_adapter_in_model`` (no PeftModel); PEFT saves
    and loads adapters through a PeftModel, so one is built over the same base
    checkpoint with the same LoRA config plus ``modules_to_save`` (routers, head), and
    every trainable tensor is copied into it by name.
    """
    from peft import get_peft_model  # optional, heavy: LoRA runs only

    # The same base, built as the run built it (config with num_labels / pad id, dtype).
    base = type(inner).from_pretrained(resolve_model_path(cfg), config=inner.config, dtype=inner.dtype,
                                       local_files_only=resolve_model_path(cfg).is_dir())
    peft_model = get_peft_model(base, _lora_config(cfg, inner, base))
    source = inner.state_dict()
    with torch.no_grad():
        for name, tensor in peft_model.named_parameters():
            if not tensor.requires_grad:
                continue
            key = name.removeprefix("base_model.model.").replace(".modules_to_save.default.", ".")
            if key not in source:
                raise RuntimeError(f"LoRA export: no trained tensor for {name} ({key})")
            tensor.copy_(source[key].to(tensor.dtype))
    return peft_model


def read_info(directory: str | Path) -> dict | None:
    """The ``hfedmoe.json`` of an exported directory, or None for any other directory."""
    path = Path(directory) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_exported(directory: str | Path, cfg: RunConfig) -> torch.nn.Module:
    """An exported directory as hfedmoe's model (``forward(input_ids, attention_mask)``),
    on ``cfg``'s device and dtype. transformers and PEFT exports load through their
    own ``from_pretrained``; only the forward wrapper is hfedmoe's."""
    directory = Path(directory)
    info = read_info(directory)
    if info is None:
        raise ConfigError(f"{directory} holds no {INFO_FILE}: not an hfedmoe export")
    spec, kind = info["spec"], info["spec"]["kind"]
    quiet_transformers()
    dtype = run_dtype(cfg)
    if kind == "upcycled":
        fields = {k: v for k, v in spec.items() if k != "kind"}
        if not Path(fields["base_path"]).is_dir():  # the embedded MiniLM, installed elsewhere on this machine
            fields["base_path"] = str(resolve_model_path(cfg))
        upcycled = UpcycledSpec(**fields)
        model = build_upcycled_classifier(upcycled, pretrained=False)
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
        return model.to(dtype).to(run_device(cfg))
    # heavy (seconds): only loading pays
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    head = kind.removeprefix("hf-")
    auto = {"sequence-classification": AutoModelForSequenceClassification, "label-words": AutoModelForCausalLM,
            "causal-lm": AutoModelForCausalLM}.get(head, AutoModelForSeq2SeqLM)
    if info["format"] == "peft":
        from peft import PeftModel  # optional, heavy: LoRA exports only

        base_path = Path(spec["base_path"])
        extra = {"num_labels": spec["num_labels"]} if "num_labels" in spec else {}
        base = auto.from_pretrained(base_path, dtype=dtype, local_files_only=base_path.is_dir(), **extra)
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer_for(str(directory)).pad_token_id
        inner = PeftModel.from_pretrained(base, directory).get_base_model()
    else:
        inner = auto.from_pretrained(directory, dtype=dtype, local_files_only=True)
    if head == "sequence-classification":
        model = HFSequenceClassifier(inner)
    elif head == "label-words":
        model = LabelWordsClassifier(inner, spec["label_token_ids"])
    elif head == "seq2seq-label-words":
        model = Seq2SeqLabelWords(inner, spec["label_token_ids"], decoder_layer_flags(inner))
    elif head == "seq2seq":
        model = Seq2SeqAsLM(inner, decoder_layer_flags(inner))
    else:
        model = HFCausalLM(inner)
    return model.to(run_device(cfg))


# --- re-exporting a run, evaluating an export -------------------------------------------------

def export_run(run_dir: str | Path, out: str | Path | None = None, merge: bool = False) -> Path:
    """Export the last checkpoint of the run in ``run_dir`` (default: ``run_dir/final``,
    or ``run_dir/merged`` with ``merge``); also turns a run from before exports existed
    into one."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"{run_dir} holds no run (no config.json)")
    latest = run_dir / "checkpoints" / "latest.json"
    if not latest.is_file():
        raise ConfigError(f"{run_dir} holds no checkpoint (checkpoints/latest.json): nothing trained to export")
    # A setting added after the run started was at its default then.
    saved = {**json.loads(RunConfig().to_json()), **json.loads((run_dir / "config.json").read_text())}
    cfg = RunConfig.from_dict(saved)
    if merge and not cfg.lora_rank:
        raise ConfigError("--merge: the run fine-tuned fully (no --lora-rank), there is no adapter to merge; "
                          "drop --merge")

    model = build_model(cfg, pretrained=True)
    state = load_file(str(latest.parent / json.loads(latest.read_text())["file"]))
    make_access(model).load_state_dict(state, strict=True)
    target = Path(out) if out else run_dir / ("merged" if merge else "final")
    stale = target / "config.json"
    if stale.is_file() and "spec" in json.loads(stale.read_text()):  # the layout from before exports
        stale.unlink()
        (target / "model.safetensors").unlink(missing_ok=True)
    return export_model(cfg, model, target, label_names(cfg), merge=merge)


EVAL_SETTINGS = ("dataset", "task", "classifier", "text_column", "label_column", "choices_column", "answer_column",
                 "response_column", "max_length", "test_fraction", "seed", "eval_batch_size", "device", "dtype")


def eval_config(model_dir: str | Path, overrides: dict) -> tuple[RunConfig, dict | None]:
    """The settings ``hfedmoe eval`` runs with: the exported run's own (same data, same
    seeded split), changed by ``overrides``; for a directory that is no export (a base
    checkpoint), the defaults with ``model=model_dir`` and ``overrides`` (--dataset needed)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"--model {str(model_dir)!r} is not a directory (an exported run's final/, exports/round-K/, "
                          "or a checkpoint saved with save_pretrained)")
    info = read_info(model_dir)
    given = {k: v for k, v in overrides.items() if v is not None}
    if info is None:
        old = model_dir / "config.json"
        if old.is_file() and "spec" in json.loads(old.read_text()):
            raise ConfigError(f"{model_dir} was written before exports existed (an internal state dict): re-export "
                              f"the run with `hfedmoe export {model_dir.parent}`")
        if "dataset" not in given:
            raise ConfigError(f"--model {str(model_dir)!r} is no hfedmoe export (no {INFO_FILE}): name the data "
                              "with --dataset (and its columns)")
        settings = {"model": str(model_dir)}
    else:
        settings = {**json.loads(RunConfig().to_json()), **info.get("run_config", {})}
        if "run_config" not in info:
            settings["model"] = info["spec"].get("base_path", settings["model"])
        settings["device"] = "auto"  # this machine's, not the run's (--device to choose); the run's dtype stays
    settings.update(given)
    settings.update(out=None, resume=False)
    return RunConfig.from_dict(settings).validate(), info


def evaluate_directory(model_dir: str | Path, overrides: dict, split: str = "test") -> dict:
    """``hfedmoe eval``: the run's test metrics (its task's objective) for ``model_dir`` on
    the dataset's test split (``split="test"``) or all of it (``"all"``)."""

    cfg, info = eval_config(model_dir, overrides)
    own_data = info is not None and overrides.get("dataset") is None and cfg.extra.get("own_data")
    if own_data and split != "test":
        raise ConfigError("--split all reads a dataset, and this run's clients held their own data: name one "
                          "with --dataset")
    if info is not None and cfg.task == "classification":
        cfg.labels = list(info["label_names"])  # a file holding some of the classes is scored with the model's ids
    data = load_run_test_examples(cfg) if own_data else load_dataset_examples(cfg, split)
    if info is not None and cfg.task == "classification":
        expected = list(info["label_names"])
        if list(data.label_names) != expected:
            raise ConfigError(f"--dataset {cfg.dataset}: labels {list(data.label_names)} are not the model's "
                              f"{expected} (same names, same order)")
    model = load_exported(model_dir, cfg) if info is not None else build_model(cfg, pretrained=True)
    # An export carries its tokenizer: the run's base checkpoint need not be where the run left it.
    tokenizer = str(model_dir) if (Path(model_dir) / "tokenizer_config.json").is_file() else None
    scores = evaluate(model, dataset_batches(cfg, data, tokenizer), task=cfg.task)
    source = ("the run's test file " + cfg.test_data if cfg.test_data else "the clients' held-out data") \
        if own_data else cfg.dataset
    return {**scores, "model": str(model_dir), "dataset": source, "split": split, "task": cfg.task}
