"""Client partitions: disjoint, complete, seeded, and the reference's shard semantics."""

from __future__ import annotations

import numpy as np
import pytest

from mona_sfl.data import DataError
from mona_sfl.data.partition import PARTITIONS, dirichlet, iid, label_shards, partition


def balanced(n_per_class: int = 100, classes: int = 10, seed: int = 0) -> np.ndarray:
    """Shuffled labels with exactly n_per_class of each class."""
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), n_per_class))


def check_partition(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    assert all(p.size > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert allidx.size == n  # disjoint + complete
    assert np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize("method", PARTITIONS)
@pytest.mark.parametrize("num_clients", [1, 3, 5, 20])
def test_disjoint_complete_nonempty(method: str, num_clients: int) -> None:
    labels = balanced(101, 10)  # 1010 samples: not divisible by most client counts
    parts = partition(labels, num_clients, method, rng=np.random.default_rng(0))
    check_partition(parts, labels.size, num_clients)


@pytest.mark.parametrize("method", PARTITIONS)
def test_seeded(method: str) -> None:
    labels = balanced()
    a = partition(labels, 5, method, rng=np.random.default_rng(7))
    b = partition(labels, 5, method, rng=np.random.default_rng(7))
    c = partition(labels, 5, method, rng=np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_and_pinned_values() -> None:
    parts = iid(np.zeros(10, dtype=np.int64), 3, np.random.default_rng(0))
    assert [p.size for p in parts] == [4, 3, 3]
    perm = np.random.default_rng(0).permutation(10)
    assert np.array_equal(np.concatenate(parts), perm)  # contiguous chunks of one permutation
    sizes = [p.size for p in iid(balanced(), 7, np.random.default_rng(1))]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1000


def test_label_shards_reference_case_two_classes_each() -> None:
    # N=5, ratio 0.2, 10 balanced classes: 10 single-class shards, 2 per client.
    labels = balanced(100, 10)
    for seed in range(5):
        parts = label_shards(labels, 5, 0.2, np.random.default_rng(seed), 10)
        check_partition(parts, 1000, 5)
        for p in parts:
            assert p.size == 200
            assert np.unique(labels[p]).size == 2
            assert sorted(np.bincount(labels[p], minlength=10)[np.unique(labels[p])]) == [100, 100]


def test_label_shards_remainder_assigned() -> None:
    labels = balanced(101, 10)  # 1010 samples, 20 clients x 2 shards = 40 shards of 25 or 26
    parts = label_shards(labels, 20, 0.2, np.random.default_rng(0), 10)
    check_partition(parts, 1010, 20)
    assert sorted({p.size for p in parts}) == [50, 51, 52]


def test_label_shards_classes_per_client_rounding() -> None:
    # 10 clients, 10 classes x 30: with cpc shards per client every shard lies inside one
    # class, so a client has at most cpc classes, and exactly cpc for some client.
    labels = balanced(30, 10)
    for ratio, cpc in [(0.3, 3), (0.05, 1), (0.5, 5)]:  # 0.3*10 is 3.0000000000000004 -> 3; 0.05 -> max(1, 0)
        most = 0
        for seed in range(3):
            parts = label_shards(labels, 10, ratio, np.random.default_rng(seed), 10)
            check_partition(parts, 300, 10)
            most = max(most, max(np.unique(labels[p]).size for p in parts))
        assert most == cpc


def test_label_shards_ratio_one_is_iid() -> None:
    labels = balanced()
    a = label_shards(labels, 4, 1.0, np.random.default_rng(3))
    b = iid(labels, 4, np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = partition(labels, 4, "noniid", rng=np.random.default_rng(3), noniid_ratio=1.0)
    assert all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_skew() -> None:
    labels = balanced(200, 10)

    def mean_classes(alpha: float) -> float:
        parts = dirichlet(labels, 10, alpha, np.random.default_rng(0), 10)
        check_partition(parts, 2000, 10)
        # classes holding >= 5% of the client's data
        return float(np.mean([(np.bincount(labels[p], minlength=10) / p.size >= 0.05).sum() for p in parts]))

    small, large = mean_classes(0.05), mean_classes(100.0)
    assert small < 3.0
    assert large == 10.0


def test_dirichlet_min_size_and_failure() -> None:
    labels = balanced(5, 2)  # 10 samples
    parts = dirichlet(labels, 3, 10.0, np.random.default_rng(0), 2, min_size=2)
    assert min(p.size for p in parts) >= 2
    with pytest.raises(DataError, match="raise data.alpha"):
        dirichlet(labels, 10, 0.001, np.random.default_rng(0), 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_clients=0), "fed.num_clients"),
        (dict(num_clients=1001), "fed.num_clients"),
        (dict(num_clients=2.5), "fed.num_clients"),
        (dict(method="shards"), "data.partition.*iid, noniid, dirichlet"),
        (dict(method="dirichlet", alpha=0.0), "data.alpha"),
        (dict(method="dirichlet", alpha=-1.0), "data.alpha"),
        (dict(method="noniid", noniid_ratio=0.0), "data.noniid_ratio"),
        (dict(method="noniid", noniid_ratio=1.5), "data.noniid_ratio"),
        (dict(method="noniid", num_classes=5), "data.num_classes"),
        (dict(method="noniid", num_clients=600, noniid_ratio=0.2), "shards"),
    ],
)
def test_errors(kwargs: dict, match: str) -> None:
    args = dict(num_clients=5, method="iid") | kwargs
    with pytest.raises(DataError, match=match):
        partition(balanced(), args.pop("num_clients"), args.pop("method"), rng=np.random.default_rng(0), **args)


def test_bad_labels_and_rng() -> None:
    with pytest.raises(DataError, match="integer"):
        iid(np.array([0.5, 1.0]), 1, np.random.default_rng(0))
    with pytest.raises(DataError, match="non-empty"):
        iid(np.array([], dtype=np.int64), 1, np.random.default_rng(0))
    with pytest.raises(DataError, match="Generator"):
        partition(balanced(), 2, "iid", rng=0)  # type: ignore[arg-type]
    assert issubclass(DataError, ValueError)
