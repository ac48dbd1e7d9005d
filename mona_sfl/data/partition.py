"""Split sample indices among federated clients (pure numpy, seeded by the caller's RNG).

Every function returns one ``int64`` index array per client. The arrays are disjoint,
together cover every sample exactly once, and none is empty. Order inside an array is
the order of drawing (callers shuffle per pass anyway).

- ``iid``: a random permutation cut into ``num_clients`` contiguous chunks whose sizes
  differ by at most one (the reference drops the ``n % N`` leftover; here it is kept).
- ``noniid`` (:func:`label_shards`): McMahan et al.'s shard method as in the reference
  (algorithm.md §3).
- ``dirichlet``: per-class Dirichlet(alpha) client proportions.
"""

from __future__ import annotations

import numpy as np

from mona_sfl.data import PARTITIONS

from .images import DataError

_DIRICHLET_TRIES = 100


def _check_labels(labels: np.ndarray) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size == 0:
        raise DataError(f"partition needs a non-empty 1-D label array, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        raise DataError(f"partition needs integer class labels, got dtype {lab.dtype}")
    if lab.min() < 0:
        raise DataError(f"partition needs labels >= 0, got {int(lab.min())}")
    return lab.astype(np.int64, copy=False)


def _check_clients(num_clients: int, n: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise DataError(f"fed.num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > n:
        raise DataError(
            f"fed.num_clients={num_clients} exceeds the {n} training samples (every client needs at least one); "
            f"lower fed.num_clients or use more data"
        )
    return int(num_clients)


def _num_classes(lab: np.ndarray, num_classes: int | None) -> int:
    top = int(lab.max()) + 1
    if num_classes is None:
        return top
    if num_classes < top:
        raise DataError(f"data.num_classes={num_classes} but labels go up to {top - 1}; set it to at least {top}")
    return int(num_classes)


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random permutation cut into near-equal contiguous chunks (sizes differ by <= 1)."""
    lab = _check_labels(labels)
    n_clients = _check_clients(num_clients, lab.size)
    perm = rng.permutation(lab.size).astype(np.int64)
    return [chunk.copy() for chunk in np.array_split(perm, n_clients)]


def label_shards(
    labels: np.ndarray,
    num_clients: int,
    noniid_ratio: float,
    rng: np.random.Generator,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """The reference's non-IID split: each client draws ``cpc`` label-sorted shards.

    ``cpc = int(noniid_ratio * num_classes)`` (at least 1; a 1e-9 guard keeps e.g.
    ``0.3 * 10`` at 3). Indices are shuffled, stably sorted by label, and the sorted order
    is cut into ``cpc * num_clients`` contiguous shards with ``np.array_split``: sizes are
    ``n // shards`` and the first ``n % shards`` shards get one extra sample, so every
    sample is assigned (the reference cuts ``n // shards``-sized shards and drops the
    rest; where ``n`` divides evenly the two are identical). Client ``i`` gets shards
    ``perm[i*cpc:(i+1)*cpc]`` of a random shard permutation, i.e. ``cpc`` draws without
    replacement. ``noniid_ratio == 1.0`` means IID, as in the reference: :func:`iid`.
    """
    lab = _check_labels(labels)
    n_clients = _check_clients(num_clients, lab.size)
    ratio = float(noniid_ratio)
    if not 0.0 < ratio <= 1.0:
        raise DataError(f"data.noniid_ratio must be in (0, 1] (1.0 = IID), got {noniid_ratio!r}")
    if ratio == 1.0:
        return iid(lab, n_clients, rng)
    n_cls = _num_classes(lab, num_classes)
    cpc = max(1, int(ratio * n_cls + 1e-9))
    n_shards = cpc * n_clients
    if n_shards > lab.size:
        raise DataError(
            f"label shards: {n_clients} clients x {cpc} shards each = {n_shards} shards, more than the "
            f"{lab.size} samples; lower fed.num_clients or data.noniid_ratio"
        )
    shuffled = rng.permutation(lab.size)
    order = shuffled[np.argsort(lab[shuffled], kind="stable")].astype(np.int64)
    shards = np.array_split(order, n_shards)
    pick = rng.permutation(n_shards)
    return [np.concatenate([shards[s] for s in pick[i * cpc : (i + 1) * cpc]]) for i in range(n_clients)]


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    num_classes: int | None = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) split; redrawn until every client has ``min_size`` samples.

    For each class present, its shuffled indices are cut at the cumulative proportions
    ``p ~ Dirichlet(alpha * ones(num_clients))``. Small ``alpha`` gives few classes per
    client, large ``alpha`` approaches IID. Up to 100 full redraws, then a DataError.
    """
    lab = _check_labels(labels)
    n_clients = _check_clients(num_clients, lab.size)
    a = float(alpha)
    if not a > 0.0 or not np.isfinite(a):
        raise DataError(f"data.alpha (Dirichlet concentration) must be a finite number > 0, got {alpha!r}")
    _num_classes(lab, num_classes)  # validates num_classes against the labels
    if min_size < 1 or min_size * n_clients > lab.size:
        raise DataError(
            f"dirichlet min_size={min_size} x fed.num_clients={n_clients} must be between 1 and the {lab.size} samples"
        )
    by_class = [np.flatnonzero(lab == c) for c in np.unique(lab)]
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(n_clients, a))
            cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for i, piece in enumerate(np.split(idx, cuts)):
                parts[i].append(piece)
        out = [np.concatenate(pp).astype(np.int64) for pp in parts]
        if min(o.size for o in out) >= min_size:
            return out
    raise DataError(
        f"dirichlet split: after {_DIRICHLET_TRIES} draws some client still had fewer than {min_size} samples "
        f"(alpha={a}, {n_clients} clients, {lab.size} samples); raise data.alpha or lower fed.num_clients"
    )


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    *,
    rng: np.random.Generator,
    noniid_ratio: float = 0.2,
    alpha: float = 0.5,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Dispatch to :func:`iid`, :func:`label_shards` ('noniid') or :func:`dirichlet`."""
    if method not in PARTITIONS:
        raise DataError(f"unknown partition method {method!r}; set data.partition to one of {', '.join(PARTITIONS)}")
    if not isinstance(rng, np.random.Generator):
        raise DataError(f"partition needs a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    if method == "iid":
        return iid(labels, num_clients, rng)
    if method == "noniid":
        return label_shards(labels, num_clients, noniid_ratio, rng, num_classes)
    return dirichlet(labels, num_clients, alpha, rng, num_classes)
