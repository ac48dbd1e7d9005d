"""MoCo v2 augmentation on batches of uint8 tensors, with per-sample random parameters.

:class:`TwoViews` reproduces the reference's ``mocov2`` pipeline (algorithm.md §3) for each
image independently, but runs every step as one batched tensor op:

1. ``RandomResizedCrop(size, scale=crop_scale, ratio=(3/4, 4/3))``: torchvision's sampling
   rule (10 tries, then the centre-crop fallback), integer boxes, bilinear resampling
   (``align_corners=False``; antialiased when a crop is larger than ``size``), done for the
   whole batch as two batched matrix products with per-image interpolation matrices; equal
   to torchvision's ``resized_crop(..., antialias=True)`` up to float rounding.
2. ``ColorJitter(0.4, 0.4, 0.4, 0.1)`` with p=0.8: factors ~ U[0.6, 1.4] for brightness,
   contrast and saturation, hue shift ~ U[-0.1, 0.1]; the four ops run in a random order
   per image, as torchvision's ``ColorJitter`` does; each op clamps to [0, 1]. Hue is an
   exact HSV round trip.
3. ``RandomGrayscale`` p=0.2 (ITU-R 601 luma weights 0.2989/0.587/0.114, like torchvision).
4. Gaussian blur with p=0.5, sigma ~ U[0.1, 2.0], **13-tap** separable kernel with reflect
   padding. Why 13: the reference blurs with PIL's ``GaussianBlur(radius=sigma)``, which is
   not truncated to a small window; 13 taps cover +-3 sigma at the largest sigma (2.0),
   so the kernel keeps >99.7% of the Gaussian's mass at every sigma. A kernel sized at
   10% of the image (3 taps at 32 px, the ImageNet rule of thumb) would turn sigma > 1
   into a near box filter.
5. ``RandomHorizontalFlip`` p=0.5.
6. ``[0, 1]`` float, then ``Normalize(mean, std)``.

Processing is in float32 throughout (the reference rounds to uint8 between PIL ops; the
difference is below one grey level per op). All randomness comes from a local
``torch.Generator`` seeded with ``seed``, so a call is a pure function of (images, seed)
and never touches the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .images import DataError

_GRAY = (0.2989, 0.587, 0.114)
_BLUR_TAPS = 13  # see module docstring
_BLUR_SIGMA = (0.1, 2.0)
_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
_P_JITTER, _P_GRAY, _P_BLUR, _P_FLIP = 0.8, 0.2, 0.5, 0.5
_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise DataError(
            f"expected uint8 images of shape (B, 3, H, W), got {getattr(images, 'dtype', type(images))} "
            f"{tuple(getattr(images, 'shape', ()))}; pass ImageData.images (decoded uint8 RGB)"
        )


def _stats(values: Sequence[float], what: str) -> torch.Tensor:
    t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    if t.numel() != 3 or (what == "std" and bool((t <= 0).any())):
        raise DataError(f"normalisation {what} must be 3 {'positive ' if what == 'std' else ''}numbers, got {values}")
    return t.view(1, 3, 1, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B,3,H,W) -> float32 ``(x/255 - mean) / std``; no augmentation (evaluation)."""
    _check_images(images)
    return (images.to(torch.float32) / 255.0 - _stats(mean, "mean")) / _stats(std, "std")


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(m,3,H,W) -> (m,1,H,W) luma."""
    return _GRAY[0] * x[:, 0:1] + _GRAY[1] * x[:, 1:2] + _GRAY[2] * x[:, 2:3]


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, shape (m,)) via an exact HSV round trip."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v, _ = x.max(dim=1, keepdim=True)
    mn, _ = x.min(dim=1, keepdim=True)
    c = v - mn
    s = torch.where(v > 0, c / v.clamp(min=1e-12), torch.zeros_like(v))
    cz = c.clamp(min=1e-12)
    h = torch.where(
        v == r, (g - b) / cz, torch.where(v == g, 2.0 + (b - r) / cz, 4.0 + (r - g) / cz)
    )  # in sextants, [-1, 5)
    h = torch.where(c > 0, h, torch.zeros_like(h)) + 6.0 * shift.view(-1, 1, 1, 1)
    # HSV -> RGB: channel n in (5, 3, 1): v - v*s*clamp(min(k, 4-k), 0, 1), k = (n + h) mod 6
    n = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = torch.remainder(n + h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


@dataclass
class ViewParams:
    """Per-view random parameters (one row per output view); see :meth:`TwoViews.sample_params`."""

    top: torch.Tensor  # int64 crop box, in source pixels
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    jitter_on: torch.Tensor  # bool: colour jitter applied
    brightness: torch.Tensor  # factors in [0.6, 1.4]
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # shift in [-0.1, 0.1] of a turn
    order: torch.Tensor  # (m, 4) op order: 0 brightness, 1 contrast, 2 saturation, 3 hue
    gray_on: torch.Tensor  # bool
    blur_on: torch.Tensor  # bool
    sigma: torch.Tensor  # blur sigma in [0.1, 2.0]
    flip_on: torch.Tensor  # bool: horizontal flip


class _Draws(NamedTuple):
    """The raw uniform random numbers of ``m`` views, one row per view (see :func:`_draw`)."""

    crop_u: torch.Tensor  # (m, tries, 4) float64
    jitter_u: torch.Tensor
    u: torch.Tensor  # (m, 4) jitter factors
    order_u: torch.Tensor  # (m, 4) argsorted into the op order
    gray_u: torch.Tensor
    blur_u: torch.Tensor
    sigma_u: torch.Tensor
    flip_u: torch.Tensor


def _draw(m: int, seed: int) -> _Draws:
    """Every random number of ``m`` views, drawn up front in a fixed order from ``seed`` alone,
    whatever is switched on, so a view's randomness never depends on the configuration."""
    g = torch.Generator().manual_seed(int(seed) % (1 << 64))
    crop_u = torch.rand(m, _CROP_TRIES, 4, generator=g, dtype=torch.float64)
    return _Draws(crop_u, *(torch.rand(m, *shape, generator=g) for shape in ((), (4,), (4,), (), (), (), ())))


class TwoViews:
    """Two independent MoCo v2 views of a uint8 batch; see the module docstring for the recipe."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        size: int = 32,
        blur: bool = True,
        crop_scale: tuple[float, float] = (0.08, 1.0),
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise DataError(f"view size must be a positive integer, got {size!r}")
        lo, hi = (float(v) for v in crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise DataError(f"crop scale must satisfy 0 < min <= max <= 1, got {crop_scale}; e.g. (0.08, 1.0)")
        self.mean, self.std = _stats(mean, "mean"), _stats(std, "std")
        self.size, self.blur, self.crop_scale = size, bool(blur), (lo, hi)

    def __repr__(self) -> str:
        return (
            f"TwoViews(size={self.size}, crop_scale={self.crop_scale}, blur={self.blur}, "
            f"mean={tuple(self.mean.flatten().tolist())}, std={tuple(self.std.flatten().tolist())})"
        )

    def __call__(self, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (b,3,H,W) -> two float32 (b,3,size,size) views, a pure function of ``seed``."""
        _check_images(images)
        b = images.shape[0]
        out = self.augment(images, seed, copies=2)
        return out[:b], out[b:]

    def augment(self, images: torch.Tensor, seed: int, copies: int = 1) -> torch.Tensor:
        """``copies`` independent views of each image, stacked copy-major: (copies*b, 3, size, size)."""
        return self.augment_many([images], [seed], copies)[0]

    def sample_params(self, m: int, hgt: int, wid: int, seed: int) -> ViewParams:
        """Random parameters of ``m`` views of ``hgt x wid`` images, a pure function of ``seed``."""
        return self._derive(_draw(m, seed), hgt, wid)

    def augment_many(self, images: Sequence[torch.Tensor], seeds: Sequence[int], copies: int = 2) -> list[torch.Tensor]:
        """``[augment(x, s, copies) for x, s in zip(images, seeds)]`` as one batched computation.

        Each batch draws its random numbers from its own seed exactly as :meth:`augment` does;
        only the arithmetic runs once over all rows. Every step is row-wise, so each batch's
        views are the same as from its own :meth:`augment` call (``tests/test_data.py`` checks
        they are bitwise equal). All batches must have the same image size.
        """
        if len(images) != len(seeds):
            raise DataError(f"augment_many: {len(images)} image batches but {len(seeds)} seeds")
        if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
            raise DataError(f"copies must be an integer >= 1, got {copies!r}")
        if not images:
            return []
        for x in images:
            _check_images(x)
        hgt, wid = images[0].shape[-2:]
        if any(x.shape[-2:] != (hgt, wid) for x in images):
            raise DataError(f"augment_many: every batch must have images of one size, got {sorted({tuple(x.shape[-2:]) for x in images})}")
        rows = [copies * x.shape[0] for x in images]
        draws = [_draw(m, s) for m, s in zip(rows, seeds)]
        params = self._derive(_Draws(*(torch.cat(t) for t in zip(*draws))), hgt, wid)
        src = torch.cat([x.to(torch.float32).div_(255.0).repeat(copies, 1, 1, 1) for x in images])
        return list(self.apply(src, params).split(rows))

    def _derive(self, d: _Draws, hgt: int, wid: int) -> ViewParams:
        """The parameters of the views whose random numbers are ``d`` (row-wise arithmetic only)."""
        top, left, h, w = (t.long() for t in self._crop_params(d.crop_u, hgt, wid))
        return ViewParams(
            top=top, left=left, height=h, width=w,
            jitter_on=d.jitter_u < _P_JITTER,
            brightness=1.0 + _JITTER[0] * (2.0 * d.u[:, 0] - 1.0),
            contrast=1.0 + _JITTER[1] * (2.0 * d.u[:, 1] - 1.0),
            saturation=1.0 + _JITTER[2] * (2.0 * d.u[:, 2] - 1.0),
            hue=_JITTER[3] * (2.0 * d.u[:, 3] - 1.0),
            order=d.order_u.argsort(dim=1),
            gray_on=d.gray_u < _P_GRAY,
            blur_on=(d.blur_u < _P_BLUR) & torch.tensor(self.blur),
            sigma=_BLUR_SIGMA[0] + (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]) * d.sigma_u,
            flip_on=d.flip_u < _P_FLIP,
        )  # fmt: skip

    def apply(self, src: torch.Tensor, p: ViewParams) -> torch.Tensor:
        """Augment float images in [0, 1] (m,3,H,W), one row per parameter row, then normalise."""
        hgt, wid = src.shape[-2:]
        ry = _resize_weights(p.top, p.height, hgt, self.size)  # (m, size, H)
        rx = _resize_weights(p.left, p.width, wid, self.size)  # (m, size, W)
        x = ry.unsqueeze(1) @ src @ rx.unsqueeze(1).transpose(-1, -2)  # crop + resize, (m, 3, size, size)
        x = _color_jitter(x, p)
        if bool(p.gray_on.any()):
            x[p.gray_on] = _gray(x[p.gray_on]).expand(-1, 3, -1, -1)
        if bool(p.blur_on.any()):
            x[p.blur_on] = _gaussian_blur(x[p.blur_on], p.sigma[p.blur_on])
        x = torch.where(p.flip_on.view(-1, 1, 1, 1), x.flip(-1), x)
        return x.sub_(self.mean).div_(self.std)

    def _crop_params(self, u: torch.Tensor, hgt: int, wid: int) -> tuple[torch.Tensor, ...]:
        """torchvision ``RandomResizedCrop.get_params``, vectorised: (top, left, height, width) per row."""
        area = float(hgt * wid)
        lo, hi = self.crop_scale
        target = area * (lo + (hi - lo) * u[..., 0])
        log_r = math.log(_RATIO[0]) + (math.log(_RATIO[1]) - math.log(_RATIO[0])) * u[..., 1]
        aspect = torch.exp(log_r)
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= wid) & (h > 0) & (h <= hgt)
        i = torch.floor(u[..., 2] * (hgt - h + 1))
        j = torch.floor(u[..., 3] * (wid - w + 1))
        first = torch.where(ok.any(dim=1), ok.to(torch.int8).argmax(dim=1), -1)
        # Fallback (no try fitted): centre crop with the ratio clamped into range.
        in_ratio = wid / hgt
        if in_ratio < _RATIO[0]:
            fw, fh = wid, int(round(wid / _RATIO[0]))
        elif in_ratio > _RATIO[1]:
            fh, fw = hgt, int(round(hgt * _RATIO[1]))
        else:
            fw, fh = wid, hgt
        pick = first.clamp(min=0).view(-1, 1)
        sel = [t.gather(1, pick).squeeze(1) for t in (i, j, h, w)]
        fb = torch.tensor([(hgt - fh) // 2, (wid - fw) // 2, fh, fw], dtype=torch.float64)
        return tuple(torch.where(first >= 0, s, fb[k]) for k, s in enumerate(sel))


def _color_jitter(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """ColorJitter on the rows where ``p.jitter_on``, ops in each row's order ``p.order``.

    At each of the 4 positions, brightness/contrast/saturation run on the whole batch with
    factor 1 (an exact identity) for rows whose op there is another one; hue runs only on
    the rows that need it. Each op clamps to [0, 1], as torchvision's do.
    """
    one = torch.ones(())
    for pos in range(4):
        op = torch.where(p.jitter_on, p.order[:, pos], -1)
        if bool((op == 0).any()):
            x = x.mul_(torch.where(op == 0, p.brightness, one).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
        if bool((op == 1).any()):
            f = torch.where(op == 1, p.contrast, one).view(-1, 1, 1, 1)
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)  # before the in-place scale
            x = x.mul_(f).add_((1.0 - f) * mean).clamp_(0.0, 1.0)
        if bool((op == 2).any()):
            f = torch.where(op == 2, p.saturation, one).view(-1, 1, 1, 1)
            gray = _gray(x)  # before the in-place scale
            x = x.mul_(f).add_((1.0 - f) * gray).clamp_(0.0, 1.0)
        rows = (op == 3).nonzero().flatten()
        if rows.numel():
            x[rows] = _adjust_hue(x[rows], p.hue[rows]).clamp_(0.0, 1.0)
    return x


def _resize_weights(start: torch.Tensor, length: torch.Tensor, full: int, size: int) -> torch.Tensor:
    """Per-row 1-D crop-and-resize matrices (m, size, full).

    Output pixel k of row r reads the crop ``[start, start+length)`` with the triangle
    (bilinear) filter of PyTorch/PIL antialiased resizing: centre ``(k+0.5)*scale``,
    support ``max(scale, 1)``, weights normalised over the crop. For upscaling this is
    plain bilinear (``align_corners=False``, edge-clamped), for downscaling it is the
    antialiased filter, i.e. torchvision ``resize(..., antialias=True)`` of the crop.
    """
    start, length = start.to(torch.float64), length.to(torch.float64)
    scale = (length / size).view(-1, 1, 1)  # (m,1,1)
    support = scale.clamp(min=1.0)
    centre = (torch.arange(size, dtype=torch.float64).view(1, -1, 1) + 0.5) * scale  # crop coords
    p = torch.arange(full, dtype=torch.float64).view(1, 1, -1) - start.view(-1, 1, 1)  # crop coords
    wgt = (1.0 - ((p + 0.5 - centre) / support).abs()).clamp(min=0.0)
    wgt = wgt * ((p >= 0) & (p < length.view(-1, 1, 1)))
    return (wgt / wgt.sum(dim=-1, keepdim=True)).to(torch.float32)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image separable Gaussian blur (13 taps, reflect padding) of float (m,3,H,W)."""
    m, c, hgt, wid = x.shape
    radius = min(_BLUR_TAPS // 2, hgt - 1, wid - 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1) ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (m*c, taps)
    y = F.pad(x.reshape(1, m * c, hgt, wid), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(m * c, 1, -1, 1), groups=m * c)
    y = F.conv2d(y, k.view(m * c, 1, 1, -1), groups=m * c)
    return y.view(m, c, hgt, wid)
