"""The data of a run, rebuilt identically by server and clients: the dataset, its fixed-seed
train/test split, each client's non-IID partition, and their tensors in the task's format.
Everything is deterministic in the config's seed, so no data ever crosses the wire."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from hfedmoe.config import EMBEDDED_DATASET, ConfigError, RunConfig
from hfedmoe.data import (
    TensorBatches,
    TextDataset,
    encode_choices,
    encode_instructions,
    load_bbc_news,
    partition_dirichlet,
    partition_iid,
    tokenize_texts,
    train_test_split,
)
from hfedmoe.data.files import FORMATS, read_table
from hfedmoe.data.hub import HubDataset, load_hub_dataset, table_to_dataset
from hfedmoe.recipe.sources import resolve_model_path, tokenizer_for


@dataclass(frozen=True)
class DataSpec:
    """Where a run's examples come from and how their columns map onto its task."""

    dataset: str
    task: str = "classification"
    text_column: str = "text"
    label_column: str = "label"
    choices_column: str = "choices"
    answer_column: str = "answer"
    response_column: str = "response"

    @classmethod
    def of(cls, cfg: RunConfig) -> "DataSpec":
        return cls(cfg.dataset, cfg.task, cfg.text_column, cfg.label_column, cfg.choices_column,
                   cfg.answer_column, cfg.response_column)


def load_examples(spec: DataSpec) -> TextDataset:
    """All examples of the run's dataset, in ``spec.task``'s format (not yet split)."""
    if spec.dataset == EMBEDDED_DATASET:
        return load_bbc_news()
    path = Path(spec.dataset).expanduser()
    try:
        if path.suffix.lower() in FORMATS:
            table = read_table(path)
            columns = HubDataset(spec.task, text=spec.text_column, label=spec.label_column,
                                 choices=spec.choices_column, answer=spec.answer_column,
                                 response=spec.response_column)
            return table_to_dataset(table, str(path), columns)
        if path.exists() or spec.dataset.startswith((".", "/", "~")):
            raise ValueError(f"--dataset {spec.dataset!r} is not a .csv / .jsonl / .parquet file")
        return load_hub_dataset(spec.dataset, spec.task, spec.text_column, spec.label_column, spec.choices_column,
                                spec.answer_column, spec.response_column)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@functools.lru_cache(maxsize=4)
def load_dataset_split(spec: DataSpec | str, test_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Train/test split of the run's dataset (fixed seed, stratified, duplicates dropped)."""
    spec = DataSpec(spec) if isinstance(spec, str) else spec
    data = deduplicate(load_examples(spec))
    try:
        return train_test_split(data, test_fraction=test_fraction, seed=seed)
    except ValueError as err:
        raise ConfigError(f"--dataset {spec.dataset}: {err}") from None


def dataset_split(cfg: RunConfig) -> tuple[TextDataset, TextDataset]:
    return load_dataset_split(DataSpec.of(cfg), cfg.test_fraction, cfg.seed)


def deduplicate(dataset: TextDataset) -> TextDataset:
    """Drop exact duplicate texts (first kept): BBC News holds 98 repeated articles,
    which would otherwise land on both sides of the split and inflate accuracy."""
    seen: set[tuple] = set()
    keep = [i for i in range(len(dataset)) if not ((key := dataset.key(i)) in seen or seen.add(key))]
    return dataset.subset(keep)


def label_names(cfg: RunConfig) -> list[str]:
    train, _ = dataset_split(cfg)
    return list(train.label_names)


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
    train, _ = dataset_split(cfg)
    if train.num_classes == 1:  # causal-lm without a category column: nothing to skew by
        if len(train) < cfg.clients:
            raise ConfigError(f"{len(train)} training examples cannot fill {cfg.clients} clients: "
                              "lower --clients or add data")
        return partition_iid(len(train), cfg.clients, seed=cfg.seed)
    return _partitions(tuple(train.labels), cfg.clients, cfg.alpha, cfg.seed)


@functools.lru_cache(maxsize=4)
def _partitions(labels: tuple[int, ...], clients: int, alpha: float, seed: int) -> list[list[int]]:
    return partition_dirichlet(list(labels), num_partitions=clients, alpha=alpha, seed=seed)


def encode(cfg: RunConfig, data: TextDataset, tokenizer_path: str | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tensors of ``data`` in the run's task format: (inputs, labels); tokenized with the
    run's model's tokenizer, or the one saved in ``tokenizer_path``."""
    if data.task != cfg.task:
        raise ConfigError(f"--dataset {cfg.dataset} holds {data.task} data but --task is {cfg.task}")
    tokenizer = tokenizer_for(tokenizer_path or str(resolve_model_path(cfg)))
    if cfg.task == "multiple-choice":
        return encode_choices(tokenizer, data.texts, data.choices, max_length=cfg.max_length), \
            torch.tensor(data.labels)
    if cfg.task == "causal-lm":
        enc = encode_instructions(tokenizer, data.texts, data.responses, max_length=cfg.max_length)
        return {k: v for k, v in enc.items() if k != "labels"}, enc["labels"]
    return tokenize_texts(tokenizer, data.texts, max_length=cfg.max_length), torch.tensor(data.labels)


def _batches(cfg: RunConfig, data: TextDataset, batch_size: int, shuffle: bool, seed: int = 0,
             tokenizer_path: str | None = None) -> TensorBatches:
    inputs, labels = encode(cfg, data, tokenizer_path)
    extras = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return TensorBatches(inputs["input_ids"], inputs["attention_mask"], labels, batch_size, shuffle=shuffle,
                         seed=seed, extras=extras)


def load_client_data(cfg: RunConfig, partition_id: int) -> ClientData:
    """Tokenized training partition ``partition_id`` of ``cfg.clients``."""
    if not 0 <= partition_id < cfg.clients:
        raise ConfigError(f"partition id {partition_id} is outside 0..{cfg.clients - 1}")
    train, _ = dataset_split(cfg)
    part = train.subset(client_partitions(cfg)[partition_id])
    batches = _batches(cfg, part, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + partition_id)
    return ClientData(partition_id, batches, part.label_counts())


def load_test_batches(cfg: RunConfig) -> TensorBatches:
    """The held-out test set, in fixed order."""
    _, test = dataset_split(cfg)
    return _batches(cfg, test, cfg.eval_batch_size, shuffle=False)


def load_dataset_examples(cfg: RunConfig, split: str = "test") -> TextDataset:
    """The run's test split (``"test"``: the same seeded split the run used) or every
    example of the dataset (``"all"``, duplicates dropped)."""
    if split == "test":
        return dataset_split(cfg)[1]
    if split == "all":
        return deduplicate(load_examples(DataSpec.of(cfg)))
    raise ConfigError(f"--split must be test or all, got {split!r}")


def dataset_batches(cfg: RunConfig, data: TextDataset, tokenizer_path: str | None = None) -> TensorBatches:
    """Evaluation batches of ``data`` (fixed order, --eval-batch-size)."""
    return _batches(cfg, data, cfg.eval_batch_size, shuffle=False, tokenizer_path=tokenizer_path)


def endless(batches: TensorBatches):
    """Cycle through epochs forever (local steps need not align with epochs)."""
    while True:
        yield from batches
