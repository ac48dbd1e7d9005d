"""Deterministic per-client batch source.

Draw ``d`` of client ``c`` is a pure function of ``(seed, c, d)``:

- pass ``p = d // batches_per_pass`` and batch ``j = d % batches_per_pass``;
- the pass order is ``np.random.default_rng([seed, c, p]).permutation(len(indices))``
  applied to ``indices``; batch ``j`` is slice ``[j*B, (j+1)*B)`` of it (``drop_last=False``:
  the last batch of a pass holds the remainder);
- the augmentation seed is ``SeedSequence([seed, c, d, 1]).generate_state(2)`` read as
  one 64-bit integer (the trailing 1 keeps it apart from the permutation stream).

So every pass visits every index exactly once (proper epochs, not the reference's
with-replacement sampling quirk, algorithm.md §9 item 5), and resuming only needs the
draw counter.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .images import DataError, ImageData
from .views import TwoViews

_AUG_STREAM = 1  # domain tag for augmentation seeds


class ClientStream:
    """Batches of two augmented views for one client; see the module docstring."""

    def __init__(
        self,
        data: ImageData,
        indices: np.ndarray,
        batch_size: int,
        *,
        seed: int,
        client_id: int,
        views: TwoViews,
    ) -> None:
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise DataError(
                f"client {client_id}: indices must be a non-empty 1-D integer array, got {idx.dtype} {idx.shape}"
            )
        if idx.min() < 0 or idx.max() >= len(data):
            raise DataError(f"client {client_id}: indices must lie in [0, {len(data)}), got [{idx.min()}, {idx.max()}]")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise DataError(f"train.batch_size must be an integer >= 1, got {batch_size!r}")
        if seed < 0 or client_id < 0:
            raise DataError(f"seed and client_id must be >= 0, got seed={seed}, client_id={client_id}")
        self.data = data
        self.indices = idx.astype(np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.client_id = int(client_id)
        self.views = views
        self.batches_per_pass: int = math.ceil(self.indices.size / self.batch_size)
        self.draws: int = 0
        self._order: tuple[int, np.ndarray] | None = None  # cache: (pass, permuted indices)

    def __len__(self) -> int:
        """Number of samples held by this client."""
        return int(self.indices.size)

    def batch_indices(self, d: int) -> np.ndarray:
        """Dataset indices of draw ``d`` (no augmentation, no state change)."""
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise DataError(f"draw index must be an integer >= 0, got {d!r}")
        p, j = divmod(int(d), self.batches_per_pass)
        if self._order is None or self._order[0] != p:
            perm = np.random.default_rng([self.seed, self.client_id, p]).permutation(self.indices.size)
            self._order = (p, self.indices[perm])
        return self._order[1][j * self.batch_size : (j + 1) * self.batch_size]

    def aug_seed(self, d: int) -> int:
        """Augmentation seed of draw ``d``: 64 bits derived from (seed, client_id, d)."""
        lo, hi = np.random.SeedSequence([self.seed, self.client_id, int(d), _AUG_STREAM]).generate_state(2)
        return int(lo) | (int(hi) << 32)

    def batch(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of draw ``d`` (does not change ``draws``)."""
        return self.views(self.images(d), self.aug_seed(d))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch(draws)``, then advance ``draws``."""
        out = self.batch(self.draws)
        self.draws += 1
        return out

    def images(self, d: int) -> torch.Tensor:
        """The uint8 images of draw ``d``, before augmentation."""
        return self.data.images[torch.from_numpy(self.batch_indices(d))]

    def state_dict(self) -> dict[str, int]:
        """Everything needed to resume: the draw counter plus identity fields for checking."""
        return {
            "draws": self.draws,
            "seed": self.seed,
            "client_id": self.client_id,
            "num_indices": int(self.indices.size),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, s: dict[str, int]) -> None:
        """Restore ``draws``; DataError if the state belongs to a differently configured stream."""
        if "draws" not in s or int(s["draws"]) < 0:
            raise DataError(f"client stream state needs a non-negative 'draws' entry, got {s!r}")
        for key in ("seed", "client_id", "num_indices", "batch_size"):
            if key in s and int(s[key]) != self.state_dict()[key]:
                raise DataError(
                    f"client stream state was saved with {key}={s[key]}, this stream has "
                    f"{key}={self.state_dict()[key]}; resume with the same data, partition and batch size"
                )
        self.draws = int(s["draws"])


def batches(streams: Sequence[object], draws: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[s.batch(d) for s, d in zip(streams, draws)]``, the same tensors, with the augmentation
    of all :class:`ClientStream` s that share one :class:`TwoViews` and image size run as one
    batched computation (:meth:`TwoViews.augment_many`): many clients with small batches pay
    for one large augmentation instead of many small ones. Other stream objects are asked
    for ``batch(d)`` one by one. Does not change any stream's ``draws``."""
    if len(streams) != len(draws):
        raise DataError(f"batches: {len(streams)} streams but {len(draws)} draw indices")
    out: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(streams)  # type: ignore[list-item]
    groups: dict[tuple[int, tuple[int, ...]], list[tuple[int, ClientStream]]] = {}
    for k, s in enumerate(streams):
        if isinstance(s, ClientStream):
            groups.setdefault((id(s.views), tuple(s.data.images.shape[-2:])), []).append((k, s))
        else:
            out[k] = s.batch(draws[k])  # type: ignore[attr-defined]
    for group in groups.values():
        imgs = [s.images(draws[k]) for k, s in group]
        views = group[0][1].views.augment_many(imgs, [s.aug_seed(draws[k]) for k, s in group])
        for (k, _), x, v in zip(group, imgs, views):
            out[k] = (v[: x.shape[0]], v[x.shape[0] :])
    return out
