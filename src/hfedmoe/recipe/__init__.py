"""The recipe of a run: its model and data, rebuilt identically by server and clients from a
:class:`~hfedmoe.config.RunConfig` (sources.py: where model and tokenizer come from;
data.py: dataset, split, partitions, tensors; models.py: how a checkpoint meets the task;
device.py: which device and dtype; local.py: the local loop's settings)."""

from hfedmoe.recipe.data import (
    ClientData,
    DataSpec,
    client_partitions,
    dataset_batches,
    dataset_split,
    deduplicate,
    encode,
    endless,
    label_names,
    load_client_data,
    load_dataset_examples,
    load_dataset_split,
    load_examples,
    load_test_batches,
)
from hfedmoe.recipe.local import local_train_config
from hfedmoe.recipe.models import (
    build_model,
    hf_head,
    label_token_ids,
    model_spec,
    moe_shape,
    num_moe_layers,
)
from hfedmoe.recipe.sources import hf_config, model_kind, quiet_transformers, resolve_model_path, tokenizer_for

__all__ = [
    "ClientData",
    "DataSpec",
    "build_model",
    "client_partitions",
    "dataset_batches",
    "dataset_split",
    "deduplicate",
    "encode",
    "endless",
    "hf_config",
    "hf_head",
    "label_names",
    "label_token_ids",
    "load_client_data",
    "load_dataset_examples",
    "load_dataset_split",
    "load_examples",
    "load_test_batches",
    "local_train_config",
    "model_kind",
    "model_spec",
    "moe_shape",
    "num_moe_layers",
    "quiet_transformers",
    "resolve_model_path",
    "tokenizer_for",
]
