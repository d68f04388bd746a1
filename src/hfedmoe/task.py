"""The task recipe: model and data of a run, rebuilt identically by server and clients.

Given a :class:`~hfedmoe.config.RunConfig`, the server builds the initial
(pretrained, upcycled) model and the held-out test set; a client builds the same
architecture and its own non-IID partition of the training set. Everything is
deterministic in the config's seed, so no data ever crosses the wire.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hfedmoe.config import EMBEDDED_DATASET, EMBEDDED_MODEL, ConfigError, RunConfig
from hfedmoe.data import (
    TensorBatches,
    TextDataset,
    load_bbc_news,
    load_tokenizer,
    partition_dirichlet,
    tokenize_texts,
    train_test_split,
)
from hfedmoe.data.files import load_text_file
from hfedmoe.moe.upcycle import UpcycledSpec, build_upcycled_classifier, embedded_model_path


def resolve_model_path(cfg: RunConfig) -> Path:
    """Local directory of the run's model (the embedded MiniLM by default)."""
    if cfg.model == EMBEDDED_MODEL:
        return embedded_model_path()
    path = Path(cfg.model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.exists() or str(cfg.model).startswith((".", "/", "~")):
        raise ConfigError(f"--model {cfg.model!r}: no config.json there; pass a directory saved with "
                          "save_pretrained, or a Hugging Face hub id")
    return Path(cfg.model)  # a hub id: downloaded by transformers when online


def model_kind(cfg: RunConfig) -> str:
    """"upcycle" for a dense BERT-style encoder (made MoE here), "hf" for a MoE checkpoint."""
    if cfg.model == EMBEDDED_MODEL:
        return "upcycle"
    config = _hf_config(cfg)
    return "upcycle" if getattr(config, "model_type", "") == "bert" else "hf"


def _hf_config(cfg: RunConfig):
    from transformers import AutoConfig

    _quiet_transformers(cfg)
    path = resolve_model_path(cfg)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=path.is_dir())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model {cfg.model!r}: cannot read its config ({str(err).splitlines()[0][:200]})") \
            from None


@functools.lru_cache(maxsize=4)
def load_dataset_split(
    dataset: str, test_fraction: float, seed: int, text_column: str = "text", label_column: str = "label"
) -> tuple[TextDataset, TextDataset]:
    """Train/test split of the run's dataset (fixed seed, stratified, duplicates dropped)."""
    if dataset == EMBEDDED_DATASET:
        data = load_bbc_news()
    elif Path(dataset).expanduser().suffix.lower() in (".csv", ".jsonl", ".json", ".parquet"):
        try:
            data = load_text_file(dataset, text_column, label_column)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    else:
        raise ConfigError(
            f"--dataset {dataset!r} is not available: use {EMBEDDED_DATASET!r} (embedded BBC News) or a local "
            ".csv / .jsonl / .parquet file with --text-column and --label-column"
        )
    return train_test_split(deduplicate(data), test_fraction=test_fraction, seed=seed)


def _split(cfg: RunConfig) -> tuple[TextDataset, TextDataset]:
    return load_dataset_split(cfg.dataset, cfg.test_fraction, cfg.seed, cfg.text_column, cfg.label_column)


def deduplicate(dataset: TextDataset) -> TextDataset:
    """Drop exact duplicate texts (first kept): BBC News holds 98 repeated articles,
    which would otherwise land on both sides of the split and inflate accuracy."""
    seen: set[str] = set()
    keep = [i for i, text in enumerate(dataset.texts) if not (text in seen or seen.add(text))]
    return dataset.subset(keep)


def model_spec(cfg: RunConfig) -> dict:
    """What is needed to rebuild the model (written next to the final weights)."""
    train, _ = _split(cfg)
    if model_kind(cfg) == "hf":
        spec = {"kind": "hf-sequence-classification", "base_path": str(resolve_model_path(cfg)),
                "num_labels": train.num_classes}
        if cfg.lora_rank:  # the saved state holds adapters, routers and head only
            spec["lora"] = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha_value(),
                            "targets": cfg.lora_target_names(), "seed": cfg.seed}
        return spec
    spec = UpcycledSpec(base_path=str(resolve_model_path(cfg)), num_labels=train.num_classes,
                        num_experts=cfg.num_experts, top_k=cfg.top_k)
    return {"kind": "upcycled", **spec.to_dict()}


def label_names(cfg: RunConfig) -> list[str]:
    train, _ = _split(cfg)
    return list(train.label_names)


def moe_shape(cfg: RunConfig) -> tuple[int, int]:
    """(MoE layers L, routed experts per layer S) of the run's model, no weights loaded."""
    if model_kind(cfg) == "upcycle":
        _check_lora(cfg, None)
        return num_moe_layers(cfg), cfg.num_experts
    with torch.device("meta"):
        model = _hf_classifier(cfg, pretrained=False)
        access = _access_or_error(cfg, model)
        _check_lora(cfg, model)  # before any process starts
    return access.num_layers, access.num_experts


def _check_lora(cfg: RunConfig, model) -> None:
    """ConfigError for LoRA flags the model cannot honour (``model``:
    the bare HF classifier, weights not needed; None: an upcycled model)."""
    if not cfg.lora_rank:
        return
    if model is None:
        raise ConfigError(f"--lora-rank applies to Hugging Face MoE checkpoints with fused experts; --model "
                          f"{cfg.model!r} is upcycled here and fine-tuned fully: drop --lora-rank")
    from hfedmoe.moe.hf_fused import find_fused_blocks
    from hfedmoe.moe.lora import LoraTargetError, resolve_targets

    if not find_fused_blocks(model):
        raise ConfigError(f"--model {cfg.model!r}: --lora-rank needs fused experts (transformers 5.x Mixtral, "
                          "Qwen-MoE, DeepSeek, ...); this layout is fine-tuned fully: drop --lora-rank")
    try:
        resolve_targets(model, cfg.lora_target_names())
    except LoraTargetError as err:
        raise ConfigError(f"--model {cfg.model!r}: {err}") from None


def num_moe_layers(cfg: RunConfig) -> int:
    """MoE layers of the run's model, without loading any weights.

    An upcycled encoder has one per transformer layer; for a MoE checkpoint the
    model is built on the meta device (no memory) and its MoE layers counted, so
    dense-only layers (e.g. DeepSeek's first_k_dense_replace) are left out.
    """
    if model_kind(cfg) == "upcycle":
        config = _hf_config(cfg) if cfg.model != EMBEDDED_MODEL else None
        if config is None:
            import json

            return int(json.loads((resolve_model_path(cfg) / "config.json").read_text())["num_hidden_layers"])
        return int(config.num_hidden_layers)
    import torch

    with torch.device("meta"):
        model = _hf_classifier(cfg, pretrained=False)
    return _access_or_error(cfg, model).num_layers


def _access_or_error(cfg: RunConfig, model):
    from hfedmoe.moe.access import NoMoELayersError, make_access

    try:
        return make_access(model)
    except NoMoELayersError as err:
        raise ConfigError(f"--model {cfg.model!r}: {err}") from None


def _hf_classifier(cfg: RunConfig, pretrained: bool) -> "HFSequenceClassifier":
    """A MoE checkpoint with a sequence-classification head, behind one forward signature."""
    from transformers import AutoModelForSequenceClassification

    config = _hf_config(cfg)
    config.num_labels = _split(cfg)[0].num_classes
    if getattr(config, "pad_token_id", None) is None:
        # Sequence classification pools the last non-pad token: it must know the pad id.
        config.pad_token_id = _tokenizer(str(resolve_model_path(cfg))).pad_token_id
    path = resolve_model_path(cfg)
    torch.manual_seed(cfg.seed)  # the new classification head
    try:
        if pretrained:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, local_files_only=path.is_dir())
        else:
            model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as err:  # e.g. OLMoE has no sequence-classification class
        raise ConfigError(f"--model {cfg.model!r} ({config.model_type}) has no sequence-classification head in "
                          f"transformers: {str(err).splitlines()[0][:160]}") from None
    return HFSequenceClassifier(model)


class HFSequenceClassifier(torch.nn.Module):
    """``forward(input_ids, attention_mask) -> logits`` over a transformers model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def build_model(cfg: RunConfig, pretrained: bool) -> torch.nn.Module:
    """The run's model; ``pretrained=False`` gives the architecture only (clients)."""
    _quiet_transformers(cfg)
    if model_kind(cfg) == "hf":
        if cfg.lora_rank:
            return _lora_classifier(cfg)
        model = _hf_classifier(cfg, pretrained)
        _access_or_error(cfg, model)
        return model
    _check_lora(cfg, None)
    spec = UpcycledSpec(**{k: v for k, v in model_spec(cfg).items() if k != "kind"})
    return build_upcycled_classifier(spec, pretrained=pretrained, seed=cfg.seed)


def _lora_classifier(cfg: RunConfig) -> torch.nn.Module:
    """The checkpoint with PEFT LoRA on its experts and dense targets (docs/lora.md).

    The frozen base weights never cross the wire, so every party (clients too) loads
    them from the checkpoint; the trainable state (adapters, routers, head) is seeded
    and then overwritten by the global state each round anyway.
    """
    from hfedmoe.moe.access import NoMoELayersError
    from hfedmoe.moe.lora import LoraTargetError, apply_lora

    model = _hf_classifier(cfg, pretrained=True)
    try:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha_value(), cfg.lora_target_names(), seed=cfg.seed)
    except (NoMoELayersError, LoraTargetError) as err:
        raise ConfigError(f"--model {cfg.model!r}: {err}") from None
    _access_or_error(cfg, model)
    return model


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    _quiet_transformers()
    from transformers import AutoTokenizer

    directory = Path(path)
    try:
        tokenizer = load_tokenizer(path) if directory.is_dir() else AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"no usable tokenizer for {path}: save one next to the model with "
                          f"tokenizer.save_pretrained ({str(err).splitlines()[0][:160]})") from None
    if tokenizer.pad_token is None:  # decoder-only LMs often ship without one
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


@dataclass
class ClientData:
    """One client's tokenized partition."""

    partition_id: int
    batches: TensorBatches
    label_counts: list[int]

    @property
    def num_examples(self) -> int:
        return self.batches.num_samples


def client_partitions(cfg: RunConfig) -> list[list[int]]:
    train, _ = _split(cfg)
    return _partitions(tuple(train.labels), cfg.clients, cfg.alpha, cfg.seed)


@functools.lru_cache(maxsize=4)
def _partitions(labels: tuple[int, ...], clients: int, alpha: float, seed: int) -> list[list[int]]:
    return partition_dirichlet(list(labels), num_partitions=clients, alpha=alpha, seed=seed)


def load_client_data(cfg: RunConfig, partition_id: int) -> ClientData:
    """Tokenized training partition ``partition_id`` of ``cfg.clients``."""
    if not 0 <= partition_id < cfg.clients:
        raise ConfigError(f"partition id {partition_id} is outside 0..{cfg.clients - 1}")
    train, _ = _split(cfg)
    part = train.subset(client_partitions(cfg)[partition_id])
    enc = tokenize_texts(_tokenizer(str(resolve_model_path(cfg))), part.texts, max_length=cfg.max_length)
    batches = TensorBatches(
        enc["input_ids"], enc["attention_mask"], part.labels, cfg.batch_size, shuffle=True,
        seed=cfg.seed * 1000 + partition_id,
    )
    return ClientData(partition_id, batches, part.label_counts())


def load_test_batches(cfg: RunConfig) -> TensorBatches:
    """The held-out test set, in fixed order."""
    _, test = _split(cfg)
    enc = tokenize_texts(_tokenizer(str(resolve_model_path(cfg))), test.texts, max_length=cfg.max_length)
    return TensorBatches(enc["input_ids"], enc["attention_mask"], test.labels, cfg.eval_batch_size, shuffle=False)


def endless(batches: TensorBatches):
    """Cycle through epochs forever (local steps need not align with epochs)."""
    while True:
        yield from batches


def _quiet_transformers(cfg: RunConfig | None = None) -> None:
    # Local and embedded models never touch the hub; a hub id is the user's explicit
    # request to download (when online).
    if cfg is None or cfg.model == EMBEDDED_MODEL or Path(cfg.model).expanduser().is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

