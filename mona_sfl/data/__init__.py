"""Data: in-memory datasets, the synthetic shapes set, MoCo v2 views, partitions, client streams.

- :func:`load_dataset` -> :class:`ImageData` (uint8 images decoded once, labels, stats);
- :func:`make_synthetic`: the built-in shape dataset (class = shape, colour etc. = nuisance);
- :class:`TwoViews`: batched, seeded MoCo v2 augmentation; :func:`normalize` for evaluation;
- :func:`partition`: IID / label-shard non-IID / Dirichlet client splits;
- :class:`ClientStream`: a client's deterministic, resumable batch source.
"""

from .datasets import DATASETS, DataError, ImageData, load_dataset
from .partition import PARTITIONS, dirichlet, iid, label_shards, partition
from .stream import ClientStream
from .synthetic import SHAPES, make_synthetic
from .views import TwoViews, normalize

__all__ = [
    "DATASETS",
    "DataError",
    "ImageData",
    "load_dataset",
    "PARTITIONS",
    "partition",
    "iid",
    "label_shards",
    "dirichlet",
    "ClientStream",
    "SHAPES",
    "make_synthetic",
    "TwoViews",
    "normalize",
]
