"""The data of a run, in the task's tensor format. Two ways to hold it:

- a shared dataset (``--dataset``): server and clients rebuild the same fixed-seed
  train/test split and each client's non-IID partition of it, deterministically in the
  config's seed, so no data crosses the wire;
- each site's own file (a SuperNode's ``data-path``, or ``--client-data`` in
  simulation): only that client reads it; it trains on most of it and holds out
  ``test_fraction`` for federated evaluation. The server never reads it: the
  classification label set is agreed from the label names the sites report
  (:func:`site_label_names`) or given as ``--labels``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from hfedmoe.config import EMBEDDED_DATASET, SPECIALISED_MODEL, ConfigError, RunConfig
from hfedmoe.data import (
    TensorBatches,
    holdout_split,
    split_like,
    TextDataset,
    encode_choices,
    encode_instructions,
    load_bbc_news,
    partition_dirichlet,
    partition_iid,
    tokenize_texts,
    train_test_split,
)
from hfedmoe.data.files import FORMATS, label_sort_key, read_table, relabel
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
    without_public_share: bool = False  # drop the embedded data's public share (the specialised model saw it)

    @classmethod
    def of(cls, cfg: RunConfig) -> "DataSpec":
        # The specialised model was trained on PUBLIC_SHARE of the embedded data: no client
        # trains on those examples and no test scores them.
        hidden = cfg.model == SPECIALISED_MODEL and cfg.dataset == EMBEDDED_DATASET
        return cls(cfg.dataset, cfg.task, cfg.text_column, cfg.label_column, cfg.choices_column,
                   cfg.answer_column, cfg.response_column, hidden)


COLUMN_FIELDS = ("text_column", "label_column", "choices_column", "answer_column", "response_column")


@dataclass(frozen=True)
class SiteSource:
    """One client's own data file, with the column names it uses where they differ
    from the run's (a SuperNode's node config may name them: ``text-column=...``)."""

    path: str
    columns: tuple[tuple[str, str], ...] = ()  # (RunConfig column field, this file's column)

    def spec(self, cfg: RunConfig) -> DataSpec:
        names = {f: getattr(cfg, f) for f in COLUMN_FIELDS} | dict(self.columns)
        return DataSpec(self.path, cfg.task, **names)


def site_source(cfg: RunConfig, partition_id: int, node_config: dict | None = None) -> SiteSource | None:
    """Where client ``partition_id``'s own data is: its node config's ``data-path`` (a
    SuperNode under the deployment engine), else its ``--client-data`` file
    (simulation), else None (a partition of the shared ``--dataset``)."""
    node_config = node_config or {}
    if "data-path" in node_config:
        columns = tuple((f, str(node_config[f.replace("_", "-")])) for f in COLUMN_FIELDS
                        if f.replace("_", "-") in node_config)
        return SiteSource(str(node_config["data-path"]), columns)
    files = cfg.client_data_files()
    if files:
        if not 0 <= partition_id < len(files):
            raise ConfigError(f"partition id {partition_id} has no --client-data file (there are {len(files)})")
        return SiteSource(files[partition_id])
    return None


def load_examples(spec: DataSpec, site: bool = False) -> TextDataset:
    """All examples of the run's dataset (or, with ``site``, of one client's own file),
    in ``spec.task``'s format (not yet split)."""
    if spec.dataset == EMBEDDED_DATASET:
        return load_bbc_news()
    path = Path(spec.dataset).expanduser()
    try:
        if path.suffix.lower() in FORMATS:
            table = read_table(path)
            columns = HubDataset(spec.task, text=spec.text_column, label=spec.label_column,
                                 choices=spec.choices_column, answer=spec.answer_column,
                                 response=spec.response_column)
            return table_to_dataset(table, str(path), columns, site=site)
        if site:
            raise ValueError(f"client data {spec.dataset!r} is not a .csv / .jsonl / .parquet file")
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
    if spec.without_public_share:
        data = public_share_split(data)[1]
    try:
        return train_test_split(data, test_fraction=test_fraction, seed=seed)
    except ValueError as err:
        raise ConfigError(f"--dataset {spec.dataset}: {err}") from None


# The share of the (deduplicated) embedded data set aside as public, stratified, with its own
# fixed seed: the specialised model's training data (hfedmoe.recipe.specialise), never a client's.
PUBLIC_SHARE = 0.15
PUBLIC_SEED = 20261202


def public_share_split(data: TextDataset) -> tuple[TextDataset, TextDataset]:
    """(public share, the rest) of the embedded data: fixed, whatever the run's seed."""
    return train_test_split(data, test_fraction=1.0 - PUBLIC_SHARE, seed=PUBLIC_SEED)


def public_examples() -> TextDataset:
    """The embedded data's public share (what the specialised model trains on)."""
    return public_share_split(deduplicate(load_bbc_news()))[0]


def private_sample(size: int) -> TextDataset:
    """``size`` examples of the embedded data outside its public share (fixed): for
    measuring the specialised model on text it never trained on."""
    rest = public_share_split(deduplicate(load_bbc_news()))[1]
    fraction = min(0.5, size / len(rest.texts))
    return train_test_split(rest, test_fraction=fraction, seed=PUBLIC_SEED)[1]


def dataset_split(cfg: RunConfig) -> tuple[TextDataset, TextDataset]:
    """The shared dataset's (train, test); with ``--labels``, class ids in that order."""
    train, test = load_dataset_split(DataSpec.of(cfg), cfg.test_fraction, cfg.seed)
    if cfg.labels and cfg.task == "classification" and list(train.label_names) != list(cfg.labels):
        try:
            return (relabel(train, list(cfg.labels), f"--dataset {cfg.dataset}"),
                    relabel(test, list(cfg.labels), f"--dataset {cfg.dataset}"))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return train, test


def deduplicate(dataset: TextDataset) -> TextDataset:
    """Drop exact duplicate texts (first kept): BBC News holds 98 repeated articles,
    which would otherwise land on both sides of the split and inflate accuracy."""
    seen: set[tuple] = set()
    keep = [i for i in range(len(dataset)) if not ((key := dataset.key(i)) in seen or seen.add(key))]
    return dataset.subset(keep)


@functools.lru_cache(maxsize=16)
def read_site(spec: DataSpec) -> TextDataset:
    """One site's file, duplicates dropped, its own label names (not yet agreed)."""
    return deduplicate(load_examples(spec, site=True))


def site_label_names(cfg: RunConfig, source: SiteSource) -> list[str]:
    """The class names a site's file holds: what a SuperNode reports before round 1 so
    that the server can agree the label set without seeing any data. Reading the file
    here also means a missing file or column fails before round 1."""
    data = read_site(source.spec(cfg))
    return list(data.label_names) if cfg.task == "classification" else []


def union_label_names(reported: list[list[str]]) -> list[str]:
    """The federation's label set: every name any site reported, in id order."""
    return sorted({name for names in reported for name in names}, key=label_sort_key)


def label_names(cfg: RunConfig) -> list[str]:
    """The run's class names, class id order: ``--labels`` (or the set agreed with the
    sites), else the union of the ``--client-data`` files' labels, else the dataset's."""
    if cfg.labels:
        return list(cfg.labels)
    files = cfg.client_data_files()
    if files:
        return union_label_names([site_label_names(cfg, SiteSource(f)) for f in files])
    train, _ = dataset_split(cfg)
    return list(train.label_names)


def num_labels(cfg: RunConfig) -> int:
    return len(label_names(cfg))


def site_split(cfg: RunConfig, partition_id: int, source: SiteSource) -> tuple[TextDataset, TextDataset]:
    """A site's (train, held-out) parts; class ids in the run's agreed label set."""
    data = _in_agreed_labels(cfg, read_site(source.spec(cfg)), source.path)
    return holdout_split(data, cfg.test_fraction, seed=cfg.seed * 1000 + partition_id)


@dataclass
class ClientData:
    """One client's tokenized partition."""

    partition_id: int
    batches: TensorBatches
    label_counts: list[int]
    source: str = "shared"  # "shared": a partition of --dataset; else the site's own file

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


def load_client_data(cfg: RunConfig, partition_id: int, source: SiteSource | None = None) -> ClientData:
    """Tokenized training data of client ``partition_id`` of ``cfg.clients``: its
    partition of the shared dataset, or the training part of its own file."""
    if not 0 <= partition_id < cfg.clients:
        raise ConfigError(f"partition id {partition_id} is outside 0..{cfg.clients - 1}")
    source = source or site_source(cfg, partition_id)
    if source is not None:
        part, _ = site_split(cfg, partition_id, source)
        if len(part) == 0:
            raise ConfigError(f"{source.path} leaves no training example after holding out --test-fraction "
                              f"{cfg.test_fraction}: add rows")
    else:
        train, _ = dataset_split(cfg)
        part = train.subset(client_partitions(cfg)[partition_id])
    batches = _batches(cfg, part, cfg.batch_size, shuffle=True, seed=cfg.seed * 1000 + partition_id)
    return ClientData(partition_id, batches, part.label_counts(), source.path if source else "shared")


def load_client_test(cfg: RunConfig, partition_id: int, source: SiteSource | None = None) -> TensorBatches | None:
    """What client ``partition_id`` scores the global model on in federated evaluation
    (None: nothing held out): the held-out part of its own file, or, on a shared
    dataset, its share of the test split, split like the clients' training data
    (:func:`~hfedmoe.data.partition.split_like`: the shares together are the test
    split, so their example-weighted mean is the server-side score)."""
    source = source or site_source(cfg, partition_id)
    if source is not None:
        _, held_out = site_split(cfg, partition_id, source)
    else:
        _, test = dataset_split(cfg)
        held_out = test.subset(_test_shares(cfg)[partition_id])
    if len(held_out) == 0:
        return None
    return _batches(cfg, held_out, cfg.eval_batch_size, shuffle=False)


def _test_shares(cfg: RunConfig) -> list[list[int]]:
    train, test = dataset_split(cfg)
    counts = [train.subset(part).label_counts() for part in client_partitions(cfg)]
    return _split_like(tuple(test.labels), tuple(tuple(c) for c in counts), cfg.seed)


@functools.lru_cache(maxsize=4)
def _split_like(labels: tuple[int, ...], counts: tuple[tuple[int, ...], ...], seed: int) -> list[list[int]]:
    return split_like(list(labels), [list(c) for c in counts], seed=seed)


def server_holds_test(cfg: RunConfig, sites: bool) -> bool:
    """Whether the server has a test set: ``--test-data``, or the split of the shared
    dataset (not when the clients hold their own data: ``sites``)."""
    return bool(cfg.test_data) or not sites


def resolve_evaluation(cfg: RunConfig, sites: bool) -> str:
    """``cfg.evaluation`` resolved: auto -> server when the server holds a test set
    (``--test-data`` or the shared dataset's split), else federated."""
    holds = server_holds_test(cfg, sites)
    if cfg.evaluation == "auto":
        return "server" if holds else "federated"
    if cfg.evaluation in ("server", "both") and not holds:
        raise ConfigError(f"--evaluation {cfg.evaluation} scores the model on a test set the server holds, and "
                          "the clients hold their own data: pass --test-data FILE (test-data in the run config) "
                          "or choose --evaluation federated")
    return cfg.evaluation


def resolve_data_settings(cfg: RunConfig) -> RunConfig:
    """Set what the server resolves before round 1 in simulation, where the clients'
    files are readable here: the label set of ``--client-data`` (the union of the
    files' labels) and the evaluation mode. A resumed run compares these resolved
    values with its ``config.json``."""
    if cfg.client_data and cfg.task == "classification" and not cfg.labels:
        cfg.labels = label_names(cfg)
    if cfg.client_data:
        cfg.extra["own_data"] = True
    cfg.evaluation = resolve_evaluation(cfg, sites=bool(cfg.client_data))
    return cfg


def _in_agreed_labels(cfg: RunConfig, data: TextDataset, source: str) -> TextDataset:
    """``data`` with class ids in the run's label set (classification; others unchanged)."""
    if cfg.task != "classification":
        return data
    try:
        return relabel(data, label_names(cfg), source)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def server_test_examples(cfg: RunConfig) -> TextDataset:
    """The server's ``--test-data`` file, duplicates dropped, in the run's label set."""
    spec = DataSpec(cfg.test_data, cfg.task, cfg.text_column, cfg.label_column, cfg.choices_column,
                    cfg.answer_column, cfg.response_column)
    return _in_agreed_labels(cfg, deduplicate(load_examples(spec, site=True)), f"--test-data {cfg.test_data}")


def load_test_batches(cfg: RunConfig) -> TensorBatches:
    """The server's test set, in fixed order: ``--test-data`` or the dataset's test split."""
    if cfg.test_data:
        return _batches(cfg, server_test_examples(cfg), cfg.eval_batch_size, shuffle=False)
    if cfg.client_data:
        raise ConfigError("the clients hold their own data (--client-data): the server has no test set; pass "
                          "--test-data FILE or --evaluation federated")
    _, test = dataset_split(cfg)
    return _batches(cfg, test, cfg.eval_batch_size, shuffle=False)


def load_dataset_examples(cfg: RunConfig, split: str = "test") -> TextDataset:
    """The run's test split (``"test"``: the same seeded split the run used) or every
    example of the dataset (``"all"``, duplicates dropped)."""
    if split not in ("test", "all"):
        raise ConfigError(f"--split must be test or all, got {split!r}")
    if split == "test":
        return dataset_split(cfg)[1]
    data = deduplicate(load_examples(DataSpec.of(cfg)))
    return relabel(data, list(cfg.labels), cfg.dataset) if cfg.labels and cfg.task == "classification" else data


def load_run_test_examples(cfg: RunConfig) -> TextDataset:
    """What a run with the clients' own data was scored on, where this machine can read
    it: the server's ``--test-data``, else the clients' held-out parts together
    (``--client-data``; their pooled score is the run's federated score)."""
    if cfg.test_data:
        return server_test_examples(cfg)
    files = cfg.client_data_files()
    if not files:
        raise ConfigError("this run's clients held their own data on their own machines (a SuperNode data-path), "
                          "so there is no test split here: name a file with --dataset")
    parts = [site_split(cfg, pid, SiteSource(f))[1] for pid, f in enumerate(files)]
    merged = parts[0]
    for part in parts[1:]:
        merged = TextDataset(texts=merged.texts + part.texts, labels=merged.labels + part.labels,
                             label_names=merged.label_names,
                             choices=None if merged.choices is None else merged.choices + part.choices,
                             responses=None if merged.responses is None else merged.responses + part.responses)
    return merged


def dataset_batches(cfg: RunConfig, data: TextDataset, tokenizer_path: str | None = None) -> TensorBatches:
    """Evaluation batches of ``data`` (fixed order, --eval-batch-size)."""
    return _batches(cfg, data, cfg.eval_batch_size, shuffle=False, tokenizer_path=tokenizer_path)


def endless(batches: TensorBatches):
    """Cycle through epochs forever (local steps need not align with epochs)."""
    while True:
        yield from batches
