"""The in-memory image set every data source returns, and the data error type.

This module imports numpy and torch only; it is what :mod:`datasets`, :mod:`synthetic`,
:mod:`stream` and :mod:`partition` share (none of them imports another for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mona_sfl.errors import DataError


@dataclass
class ImageData:
    """A labelled image set held in memory.

    ``images`` is ``uint8 (N, 3, H, W)``, ``labels`` is ``int64 (N,)``, ``classes[k]`` names
    label ``k``, and ``mean``/``std`` are the per-channel constants for ``Normalize``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        im, lb = self.images, self.labels
        if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.dim() != 4 or im.shape[1] != 3:
            raise DataError(
                f"ImageData.images must be a uint8 tensor of shape (N, 3, H, W), got "
                f"{getattr(im, 'dtype', type(im))} {tuple(getattr(im, 'shape', ()))}; decode images to uint8 RGB first"
            )
        if not isinstance(lb, torch.Tensor) or lb.dtype != torch.int64 or lb.dim() != 1 or len(lb) != len(im):
            raise DataError(
                f"ImageData.labels must be an int64 tensor of shape ({len(im)},), got "
                f"{getattr(lb, 'dtype', type(lb))} {tuple(getattr(lb, 'shape', ()))}"
            )
        if len(lb) and (int(lb.min()) < 0 or int(lb.max()) >= len(self.classes)):
            raise DataError(
                f"ImageData labels must lie in [0, {len(self.classes)}) (one per class name), "
                f"got range [{int(lb.min())}, {int(lb.max())}]"
            )
        self.mean = tuple(float(x) for x in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(x) for x in self.std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DataError(f"ImageData needs 3 means and 3 positive stds, got mean={self.mean} std={self.std}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of class names (labels are in ``[0, num_classes)``)."""
        return len(self.classes)

    def subset(self, idx: Any) -> "ImageData":
        """The images and labels at ``idx`` (indices, a boolean mask, or a slice); shares stats."""
        if isinstance(idx, slice):
            sel: Any = idx
        else:
            sel = torch.as_tensor(np.asarray(idx))
            if sel.dtype != torch.bool:
                sel = sel.long()
        return ImageData(self.images[sel], self.labels[sel], list(self.classes), self.mean, self.std)


__all__ = ["DataError", "ImageData"]
