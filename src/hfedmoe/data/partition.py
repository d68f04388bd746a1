"""Train/test split and federated client partitions (IID and Dirichlet non-IID)."""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

from hfedmoe.data.types import TextDataset

__all__ = ["partition_dirichlet", "partition_iid", "train_test_split"]

_DEFAULT_MIN_PARTITION_SIZE = 10


# --------------------------------------------------------------------------- #
# Train / test split
# --------------------------------------------------------------------------- #
def _indices_by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    """Group example positions by label, classes in sorted order."""
    groups: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    return dict(sorted(groups.items()))


def _class_name(dataset: TextDataset, label: int) -> str:
    return dataset.label_names[label] if 0 <= label < dataset.num_classes else str(label)


def _num_test(n_class: int, test_fraction: float) -> int:
    """Test examples for a class of ``n_class``: rounded, but keep >= 1 on each side.

    Clamping keeps every class present in both splits (needed for per-class
    metrics and for stratified client partitions) and moves the count by at
    most one from the rounded value.
    """
    return min(max(round(n_class * test_fraction), 1), n_class - 1)


def train_test_split(
    dataset: TextDataset, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TextDataset, TextDataset]:
    """Split a dataset into train and test parts, stratified by class.

    For each class the example positions are shuffled with
    ``random.Random(seed)`` and ``round(n_c * test_fraction)`` of them (clamped
    to ``[1, n_c - 1]``) go to the test set. Both outputs are then shuffled
    with the same generator so that neither is grouped by class (a prefix of
    the test set is a fair sample). The result depends only on the data and
    ``seed``.

    Parameters
    ----------
    dataset : TextDataset
        The full dataset.
    test_fraction : float, default 0.2
        Share of each class held out for testing, strictly between 0 and 1.
    seed : int, default 0
        Seed of the shuffle.

    Returns
    -------
    tuple of TextDataset
        ``(train, test)``, disjoint, together covering ``dataset``.

    Raises
    ------
    ValueError
        If ``test_fraction`` is not in (0, 1) or a class has fewer than 2 examples.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}."
        )
    groups = _indices_by_class(dataset.labels)
    small = {_class_name(dataset, y): len(ix) for y, ix in groups.items() if len(ix) < 2}
    if small:
        raise ValueError(
            "A stratified split needs at least 2 examples per class (one for train, "
            f"one for test); too few in class(es) {small}. Add examples or drop "
            "those classes."
        )
    rng = random.Random(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for indices in groups.values():
        shuffled = list(indices)
        rng.shuffle(shuffled)
        k = _num_test(len(shuffled), test_fraction)
        test_idx.extend(shuffled[:k])
        train_idx.extend(shuffled[k:])
    rng.shuffle(train_idx)
    rng.shuffle(test_idx)
    return dataset.subset(train_idx), dataset.subset(test_idx)


def holdout_split(dataset: TextDataset, test_fraction: float, seed: int = 0) -> tuple[TextDataset, TextDataset]:
    """One site's own file split into what it trains on and what it holds out for
    federated evaluation: stratified like :func:`train_test_split`, but a class with a
    single example stays in training (a skewed site may hold such a class), and the
    held-out part may be empty (a site of one example).

    Parameters
    ----------
    dataset : TextDataset
        The site's examples.
    test_fraction : float
        Share of each class held out, strictly between 0 and 1.
    seed : int, default 0
        Seed of the shuffle (the run's seed and the site's partition id).

    Returns
    -------
    tuple of TextDataset
        ``(train, held_out)``, disjoint, together covering ``dataset``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}.")
    rng = random.Random(seed)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for indices in _indices_by_class(dataset.labels).values():
        shuffled = list(indices)
        rng.shuffle(shuffled)
        k = _num_test(len(shuffled), test_fraction) if len(shuffled) > 1 else 0
        test_idx.extend(shuffled[:k])
        train_idx.extend(shuffled[k:])
    rng.shuffle(train_idx)
    rng.shuffle(test_idx)
    return dataset.subset(train_idx), dataset.subset(test_idx)


def split_like(labels: Sequence[int], label_counts: Sequence[Sequence[int]], seed: int = 0) -> list[list[int]]:
    """Split a test set among clients the way their training data is split: per class,
    client i gets a share of the class's test examples proportional to its count of
    that class in training (largest remainders, seeded order).

    Each client's part then resembles its own local held-out data (its label skew),
    and the parts together are the whole test set: an example-weighted mean of the
    clients' scores is the score on the whole set.

    Parameters
    ----------
    labels : sequence of int
        Class id of each test example.
    label_counts : sequence of sequence of int
        Per client, its training examples per class id.
    seed : int, default 0
        Seed of the shuffle within each class.

    Returns
    -------
    list of list of int
        One list of test positions per client, disjoint, covering ``range(len(labels))``.
    """
    clients = len(label_counts)
    if clients < 1:
        raise ValueError("split_like needs at least one client")
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for y, indices in _indices_by_class(labels).items():
        shuffled = list(indices)
        rng.shuffle(shuffled)
        weights = [counts[y] if y < len(counts) else 0 for counts in label_counts]
        total = sum(weights)
        if total == 0:  # a class no client trains on: spread evenly
            weights, total = [1] * clients, clients
        exact = [len(shuffled) * w / total for w in weights]
        sizes = [int(e) for e in exact]
        # The remaining examples go to the largest remainders (ties: lower client id).
        for i in sorted(range(clients), key=lambda i: (sizes[i] - exact[i], i))[:len(shuffled) - sum(sizes)]:
            sizes[i] += 1
        start = 0
        for i, size in enumerate(sizes):
            parts[i].extend(shuffled[start:start + size])
            start += size
    return parts


# --------------------------------------------------------------------------- #
# Client partitions
# --------------------------------------------------------------------------- #
def _check_num_partitions(num_samples: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}.")
    if num_partitions > num_samples:
        raise ValueError(
            f"Cannot split {num_samples} samples into {num_partitions} non-empty "
            "partitions; use fewer clients (num_partitions <= number of samples)."
        )


def partition_iid(n: int, num_partitions: int, seed: int = 0) -> list[list[int]]:
    """Split ``range(n)`` uniformly at random into near-equal partitions.

    Parameters
    ----------
    n : int
        Number of samples.
    num_partitions : int
        Number of clients, ``1 <= num_partitions <= n``.
    seed : int, default 0
        Seed of the permutation.

    Returns
    -------
    list of list of int
        Disjoint partitions covering ``range(n)``; sizes differ by at most one.
    """
    _check_num_partitions(n, num_partitions)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    base, extra = divmod(n, num_partitions)
    parts: list[list[int]] = []
    start = 0
    for p in range(num_partitions):
        size = base + (1 if p < extra else 0)
        parts.append(order[start : start + size])
        start += size
    return parts


def _resolve_min_partition_size(
    num_samples: int, num_partitions: int, min_partition_size: int | None
) -> int:
    """Default to 10, shrunk for small inputs so random draws can still satisfy it.

    Half the even share leaves the Dirichlet draws room to vary; at least 1 so
    that no client ends up without data.
    """
    cap = num_samples // num_partitions
    if min_partition_size is None:
        return min(_DEFAULT_MIN_PARTITION_SIZE, max(1, cap // 2))
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}.")
    if min_partition_size > cap:
        raise ValueError(
            f"min_partition_size={min_partition_size} is impossible: {num_samples} "
            f"samples over {num_partitions} partitions allow at most {cap} each. "
            "Lower min_partition_size or use fewer clients."
        )
    return min_partition_size


def partition_dirichlet(
    labels: Sequence[int],
    num_partitions: int,
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int | None = None,
    self_balancing: bool = False,
) -> list[list[int]]:
    """Split sample indices into label-skewed (non-IID) client partitions.

    Thin wrapper around flwr-datasets' ``DirichletPartitioner`` (per class, the
    share of each client is drawn from ``Dirichlet(alpha)``; smaller ``alpha``
    means more skew). The labels are wrapped in an in-memory
    ``datasets.Dataset`` with an ``idx`` column, so the returned indices refer
    to positions in ``labels`` (typically the train split).

    Parameters
    ----------
    labels : sequence of int
        Class id of each sample.
    num_partitions : int
        Number of clients, ``1 <= num_partitions <= len(labels)``.
    alpha : float, default 0.5
        Dirichlet concentration, > 0.
    seed : int, default 0
        Seed of the Dirichlet draws and of the within-partition shuffle.
    min_partition_size : int or None, default None
        Resample until every client has at least this many samples. ``None``
        means ``min(10, max(1, len(labels) // num_partitions // 2))``, halved
        (down to 1) while no draw satisfies it; values
        above ``len(labels) // num_partitions`` are rejected as impossible.
    self_balancing : bool, default False
        Stop giving samples to a client once it holds more than the average
        (flwr-datasets option). Off by default because it weakens the label
        skew that ``alpha`` asks for.

    Returns
    -------
    list of list of int
        ``num_partitions`` disjoint index lists covering ``range(len(labels))``.

    Raises
    ------
    ValueError
        On invalid arguments, or when no draw satisfies ``min_partition_size``
        (try a larger ``alpha``, fewer clients or a smaller minimum).
    """
    n = len(labels)
    _check_num_partitions(n, num_partitions)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (Dirichlet concentration), got {alpha!r}.")
    min_size = _resolve_min_partition_size(n, num_partitions, min_partition_size)
    # The default minimum halves until a draw satisfies it (down to 1): many clients over a
    # small dataset (100 BBC clients hold ~17 samples each) rarely give every client 8 at
    # alpha 0.5. A split that satisfies the first minimum is the same as before.
    sizes = [min_size]
    while min_partition_size is None and sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    for size in sizes[:-1]:
        try:
            return _dirichlet_draw(labels, num_partitions, alpha, seed, size, self_balancing)
        except ValueError:
            continue
    return _dirichlet_draw(labels, num_partitions, alpha, seed, sizes[-1], self_balancing)


def _dirichlet_draw(labels: Sequence[int], num_partitions: int, alpha: float, seed: int, min_size: int,
                    self_balancing: bool) -> list[list[int]]:
    """One DirichletPartitioner split (up to its 10 draws) with minimum ``min_size``."""
    n = len(labels)
    # Imported here: `datasets` and flwr-datasets take ~1 s to import and only
    # this function needs them.
    # heavy (pyarrow, seconds): only the Dirichlet split pays for them
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner  # same reason

    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_size,
        self_balancing=self_balancing,
        shuffle=True,
        seed=seed,
    )
    partitioner.dataset = Dataset.from_dict({"label": list(labels), "idx": list(range(n))})
    try:
        # The partitioner warns on every failed draw before giving up after 10;
        # the final ValueError below says all that matters.
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="The specified min_partition_size", category=UserWarning
            )
            return [
                list(partitioner.load_partition(p)["idx"]) for p in range(num_partitions)
            ]
    except ValueError as err:
        raise ValueError(
            f"Dirichlet partitioning of {n} samples into {num_partitions} clients "
            f"(alpha={alpha}) could not give every client >= {min_size} samples "
            "after 10 draws. Use a larger alpha, fewer clients, or a smaller "
            "min_partition_size."
        ) from err
