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
from hfedmoe.moe.upcycle import MoEClassifier, UpcycledSpec, build_upcycled_classifier, embedded_model_path


def resolve_model_path(cfg: RunConfig) -> Path:
    """Directory of the dense encoder to upcycle (the embedded MiniLM by default)."""
    if cfg.model == EMBEDDED_MODEL:
        return embedded_model_path()
    path = Path(cfg.model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ConfigError(
        f"--model {cfg.model!r} is not usable: this version accepts {EMBEDDED_MODEL!r} (the default) or a "
        "local directory holding a BERT-style encoder (config.json + weights + tokenizer) to upcycle; "
        "Hugging Face MoE checkpoints (Mixtral, Qwen-MoE, OLMoE, DeepSeek, Switch) are not supported yet"
    )


@functools.lru_cache(maxsize=4)
def load_dataset_split(dataset: str, test_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Train/test split of the run's dataset (fixed seed, stratified)."""
    if dataset != EMBEDDED_DATASET:
        raise ConfigError(
            f"--dataset {dataset!r} is not available: this version ships the embedded {EMBEDDED_DATASET!r} "
            "(BBC News, 5 topics); local csv/jsonl/parquet files are not supported yet"
        )
    return train_test_split(deduplicate(load_bbc_news()), test_fraction=test_fraction, seed=seed)


def deduplicate(dataset: TextDataset) -> TextDataset:
    """Drop exact duplicate texts (first kept): BBC News holds 98 repeated articles,
    which would otherwise land on both sides of the split and inflate accuracy."""
    seen: set[str] = set()
    keep = [i for i, text in enumerate(dataset.texts) if not (text in seen or seen.add(text))]
    return dataset.subset(keep)


def model_spec(cfg: RunConfig) -> UpcycledSpec:
    train, _ = load_dataset_split(cfg.dataset, cfg.test_fraction, cfg.seed)
    return UpcycledSpec(
        base_path=str(resolve_model_path(cfg)),
        num_labels=train.num_classes,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
    )


def label_names(cfg: RunConfig) -> list[str]:
    train, _ = load_dataset_split(cfg.dataset, cfg.test_fraction, cfg.seed)
    return list(train.label_names)


def num_moe_layers(cfg: RunConfig) -> int:
    """MoE layers of the run's model, read from its config (no weights loaded)."""
    import json

    config = json.loads((resolve_model_path(cfg) / "config.json").read_text())
    if "num_hidden_layers" not in config:
        raise ConfigError(f"{resolve_model_path(cfg)}/config.json has no num_hidden_layers: not a BERT-style encoder")
    return int(config["num_hidden_layers"])


def build_model(cfg: RunConfig, pretrained: bool) -> MoEClassifier:
    """The run's model; ``pretrained=False`` gives the architecture only (clients)."""
    _quiet_transformers()
    return build_upcycled_classifier(model_spec(cfg), pretrained=pretrained, seed=cfg.seed)


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    _quiet_transformers()
    return load_tokenizer(path)


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
    train, _ = load_dataset_split(cfg.dataset, cfg.test_fraction, cfg.seed)
    return _partitions(tuple(train.labels), cfg.clients, cfg.alpha, cfg.seed)


@functools.lru_cache(maxsize=4)
def _partitions(labels: tuple[int, ...], clients: int, alpha: float, seed: int) -> list[list[int]]:
    return partition_dirichlet(list(labels), num_partitions=clients, alpha=alpha, seed=seed)


def load_client_data(cfg: RunConfig, partition_id: int) -> ClientData:
    """Tokenized training partition ``partition_id`` of ``cfg.clients``."""
    if not 0 <= partition_id < cfg.clients:
        raise ConfigError(f"partition id {partition_id} is outside 0..{cfg.clients - 1}")
    train, _ = load_dataset_split(cfg.dataset, cfg.test_fraction, cfg.seed)
    part = train.subset(client_partitions(cfg)[partition_id])
    enc = tokenize_texts(_tokenizer(str(resolve_model_path(cfg))), part.texts, max_length=cfg.max_length)
    batches = TensorBatches(
        enc["input_ids"], enc["attention_mask"], part.labels, cfg.batch_size, shuffle=True,
        seed=cfg.seed * 1000 + partition_id,
    )
    return ClientData(partition_id, batches, part.label_counts())


def load_test_batches(cfg: RunConfig) -> TensorBatches:
    """The held-out test set, in fixed order."""
    _, test = load_dataset_split(cfg.dataset, cfg.test_fraction, cfg.seed)
    enc = tokenize_texts(_tokenizer(str(resolve_model_path(cfg))), test.texts, max_length=cfg.max_length)
    return TensorBatches(enc["input_ids"], enc["attention_mask"], test.labels, cfg.eval_batch_size, shuffle=False)


def endless(batches: TensorBatches):
    """Cycle through epochs forever (local steps need not align with epochs)."""
    while True:
        yield from batches


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

