"""Data: in-memory datasets, the synthetic shapes set, MoCo v2 views, partitions, client streams.

- :func:`load_dataset` -> :class:`ImageData` (uint8 images decoded once, labels, stats);
- :func:`make_synthetic`: the built-in shape dataset (class = shape, colour etc. = nuisance);
- :class:`TwoViews`: batched, seeded MoCo v2 augmentation; :func:`normalize` for evaluation;
- :func:`partition`: IID / label-shard non-IID / Dirichlet client splits;
- :class:`ClientStream`: a client's deterministic, resumable batch source.

This package face holds the vocabulary (:data:`DATASETS`, :data:`PARTITIONS`,
:data:`TRAIN_SIZES`) and imports nothing heavy; the modules load on first use of a name.
"""

from __future__ import annotations

from mona_sfl.errors import DataError
from mona_sfl.registry import Registry, lazy_exports

#: ``data.name``: name -> loader ``f(name, split, *, root, download, seed, synthetic_size, num_classes, image_size)``.
DATASETS = Registry(
    "data.name",
    {
        "synthetic": "mona_sfl.data.datasets:load_synthetic",
        "cifar10": "mona_sfl.data.datasets:load_torchvision",
        "cifar100": "mona_sfl.data.datasets:load_torchvision",
        "svhn": "mona_sfl.data.datasets:load_torchvision",
        "stl10": "mona_sfl.data.datasets:load_torchvision",
        "imagefolder": "mona_sfl.data.datasets:load_imagefolder",
    },
)
#: Fewest synthetic training images (``data.synthetic_size``): the test split has a fifth of them.
MIN_SYNTHETIC_SIZE = 10
#: Training-set sizes of the sources whose size is fixed (before ``data.proportion``);
#: ``synthetic`` is ``data.synthetic_size``, ``imagefolder`` is known only from its files.
TRAIN_SIZES: dict[str, int] = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257, "stl10": 5000}
#: ``data.partition``: name -> partition function (see ``partition``).
PARTITIONS = Registry(
    "data.partition",
    {"iid": "mona_sfl.data.partition:iid", "noniid": "mona_sfl.data.partition:label_shards", "dirichlet": "mona_sfl.data.partition:dirichlet"},
)

_LAZY = {
    "ImageData": "images",
    "load_dataset": "datasets",
    "partition": "partition",
    "iid": "partition",
    "label_shards": "partition",
    "dirichlet": "partition",
    "ClientStream": "stream",
    "SHAPES": "synthetic",
    "make_synthetic": "synthetic",
    "TwoViews": "views",
    "normalize": "views",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["DATASETS", "DataError", "MIN_SYNTHETIC_SIZE", "PARTITIONS", "TRAIN_SIZES", *_LAZY]
