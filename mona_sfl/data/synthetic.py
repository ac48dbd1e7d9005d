"""Built-in synthetic image dataset: classes defined by shape, everything else is nuisance.

Each image is one foreground pattern composited over a textured background. The **class**
is the pattern's geometry (``SHAPES``: disc, ring, square, triangle, cross, horizontal /
vertical / diagonal stripes, checkerboard, two dots, then six more). The stripe, checker
and dot-grid classes are patches (the pattern clipped to a disc), not full-image fills.
Everything else is drawn at random per image and carries no label information:

- foreground and background colours: an ordered pair of distinct colours from a small
  palette (``PALETTE``) whose luma differs by at least ``MIN_LUMA_GAP`` (so the shape
  survives grayscale augmentation), each moved by a small per-image offset;
- position, size, rotation (a full turn; a +-12 degree jitter for the oriented stripe
  classes; diagonal stripes lean either way, so a horizontal flip keeps the class),
  line thickness, stripe/checker period and phase;
- a smooth low-frequency colour texture on the background and per-pixel uniform noise.

Colour and position dominate raw pixels, so kNN on pixels or on a random conv net's pooled
features is far from what a supervised net reaches, while features that are invariant to
MoCo v2's colour jitter and crops separate the classes. ``bench/synthetic_check.py``
measures this (10 classes: raw-pixel kNN 36%, random BatchNorm nets 39-44%, a small
supervised CNN 95% after 2 minutes on one core). The GroupNorm + weight-standardised
ResNet-18 at width 1/8 of the main job starts at 13% kNN (projector features) and its
short MoCo run reaches 23%.

Why a palette and not any RGB pair: contrastive learning discriminates *instances*, and
takes the cheapest cue that survives the augmentations. With a unique colour pair per image
(the first version of this generator), the colour pair (and its histogram, which colour
jitter only shifts) identified an image almost on its own, so a short MoCo run learned
colour features and kNN on shape classes stayed near chance (about 15% after 150 steps of
the default config). With a few dozen colour pairs shared by all classes, colour no longer
tells instances apart and the encoder has to use geometry (shape, orientation, thickness,
period), which is what the classes are made of: kNN rises within the first few dozen
steps (measured with the default config; see the README's main-job figures).

Rendering is vectorised: per class, one signed-distance field over a coordinate grid for
all images of that class, turned into an anti-aliased mask. Every random number comes from
one ``numpy.random.Generator`` seeded with ``seed``, drawn in a fixed order, so the same
seed gives bit-identical images.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .images import DataError, ImageData

#: Class names, in label order. ``make_synthetic(num_classes=k)`` uses the first ``k``.
SHAPES: tuple[str, ...] = (
    "disc",
    "ring",
    "square",
    "triangle",
    "cross",
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "two_dots",
    "square_outline",
    "triangle_outline",
    "dot_grid",
    "bullseye",
    "half_disc",
    "bar",
)

#: Minimum |luma(fg) - luma(bg)| (Rec. 601 weights, values in [0, 1]).
MIN_LUMA_GAP = 0.3

#: Normalisation constants of this generator: per-channel mean/std of pixel values in
#: [0, 1], measured on 20,000 images at 32 px (seed 0; 10 or 16 classes agree to 0.001).
SYNTHETIC_MEAN: tuple[float, float, float] = (0.558, 0.502, 0.435)
SYNTHETIC_STD: tuple[float, float, float] = (0.383, 0.355, 0.368)

_LUMA = np.array([0.299, 0.587, 0.114])

#: Foreground/background colours (RGB in [0, 1]): black, white, red, green, blue, yellow,
#: grey, violet. 34 ordered pairs pass the luma-gap rule (``colour_pairs()``).
PALETTE = np.array(
    [
        [0.0, 0.0, 0.0],
        [1.0, 1.0, 1.0],
        [0.85, 0.15, 0.15],
        [0.15, 0.7, 0.2],
        [0.2, 0.3, 0.9],
        [0.95, 0.85, 0.2],
        [0.5, 0.5, 0.5],
        [0.7, 0.3, 0.8],
    ]
)
_COLOUR_JITTER = 0.04  # per-channel uniform offset of each drawn colour

# Parameter ranges, in normalised image units (the image spans [-1, 1], one pixel = 2/size).
_CENTER = 0.35  # centre offset ~ U(-_CENTER, _CENTER) per axis
_RADIUS = (0.32, 0.6)  # object "radius"
_THICK = (0.12, 0.24)  # line thickness
_PERIOD = (0.3, 0.55)  # stripe / checker / grid period
_STRIPE_JITTER = math.radians(12.0)  # orientation jitter of the stripe classes
# Texture classes are patches, not full-image fills: the pattern is clipped to a disc of
# radius _PATCH * r around the centre. Full-image textures made them trivially separable
# by any random conv net (orientation energy over the whole image): random-ResNet kNN
# went from ~42% with full-image textures to ~20% with patches (bench/synthetic_check.py).
_PATCH = 1.6
_CHUNK = 4096  # images composited at a time (the noise stream does not depend on it)
_TEXTURES = ("horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "dot_grid")


class _P:
    """Per-image parameters for one class group, as (m, 1, 1) float32 tensors."""

    def __init__(self, raw: dict[str, np.ndarray], sel: np.ndarray) -> None:
        for k, v in raw.items():
            setattr(self, k, torch.from_numpy(v[sel].astype(np.float32)).view(-1, 1, 1))

    cx: torch.Tensor
    cy: torch.Tensor
    r: torch.Tensor
    theta: torch.Tensor
    t: torch.Tensor
    period: torch.Tensor
    phase1: torch.Tensor
    phase2: torch.Tensor
    jitter: torch.Tensor
    sign: torch.Tensor


def _rotate(x: torch.Tensor, y: torch.Tensor, p: _P, centred: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Object coordinates: translate to the centre (optional) and rotate by -theta."""
    dx, dy = (x - p.cx, y - p.cy) if centred else (x, y)
    c, s = torch.cos(p.theta), torch.sin(p.theta)
    return c * dx + s * dy, -s * dx + c * dy


def _box(u: torch.Tensor, v: torch.Tensor, hu: torch.Tensor | float, hv: torch.Tensor | float) -> torch.Tensor:
    """Exact signed distance to an axis-aligned box with half-sizes (hu, hv)."""
    qu, qv = u.abs() - hu, v.abs() - hv
    outside = torch.sqrt(qu.clamp(min=0) ** 2 + qv.clamp(min=0) ** 2)
    return outside + torch.maximum(qu, qv).clamp(max=0)


def _triangle(u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance to an equilateral triangle with circumradius r."""
    halfplanes = []
    for k in range(3):
        a = math.pi / 2 + k * 2 * math.pi / 3
        halfplanes.append(-(math.cos(a) * u + math.sin(a) * v) - r / 2)  # inradius r/2
    return torch.maximum(torch.maximum(halfplanes[0], halfplanes[1]), halfplanes[2])


def _periodic(w: torch.Tensor, period: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """Distance (in units of w) from the nearest line w = (k - phase) * period, k integer."""
    f = torch.remainder(w / period + phase, 1.0) - 0.5  # in [-0.5, 0.5)
    return f.abs() * period  # 0 at the cell centre line, period/2 at the border


def _stripes(x: torch.Tensor, y: torch.Tensor, p: _P, angle: torch.Tensor) -> torch.Tensor:
    """Parallel bars along direction ``angle`` (radians), unclipped; the caller clips to the patch."""
    w = -torch.sin(angle) * x + torch.cos(angle) * y  # coordinate across the bars
    width = torch.minimum(p.t * 1.3, p.period * 0.6)
    return _periodic(w, p.period, p.phase1) - width / 2


def _sdf_disc(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    return torch.sqrt((x - p.cx) ** 2 + (y - p.cy) ** 2) - p.r


def _sdf_ring(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    return (torch.sqrt((x - p.cx) ** 2 + (y - p.cy) ** 2) - p.r * 0.8).abs() - p.t / 2


def _sdf_square(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    u, v = _rotate(x, y, p)
    return _box(u, v, p.r * 0.8, p.r * 0.8)


def _sdf_triangle(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    u, v = _rotate(x, y, p)
    return _triangle(u, v, p.r * 1.15)


def _sdf_cross(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    u, v = _rotate(x, y, p)
    w = p.t * 0.6 + 0.03
    return torch.minimum(_box(u, v, p.r, w), _box(u, v, w, p.r))


def _sdf_hstripes(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    return _stripes(x, y, p, p.jitter)


def _sdf_vstripes(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    return _stripes(x, y, p, p.jitter + math.pi / 2)


def _sdf_dstripes(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    return _stripes(x, y, p, p.jitter + p.sign * math.pi / 4)


def _sdf_checker(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    u, v = _rotate(x, y, p, centred=False)
    a = torch.remainder(u / p.period + p.phase1, 1.0) - 0.5
    b = torch.remainder(v / p.period + p.phase2, 1.0) - 0.5
    # inside the "fg" squares where a and b share a sign; distance to the nearest cell edge
    edge = torch.minimum(a.abs(), 0.5 - a.abs())
    edge = torch.minimum(edge, torch.minimum(b.abs(), 0.5 - b.abs())) * p.period
    return torch.where(a * b > 0, -edge, edge)


def _sdf_two_dots(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    d = p.r * 0.6
    ox, oy = d * torch.cos(p.theta), d * torch.sin(p.theta)
    rd = p.r * 0.35 + 0.04
    d1 = torch.sqrt((x - p.cx - ox) ** 2 + (y - p.cy - oy) ** 2)
    d2 = torch.sqrt((x - p.cx + ox) ** 2 + (y - p.cy + oy) ** 2)
    return torch.minimum(d1, d2) - rd


def _sdf_square_outline(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    return _sdf_square(x, y, p).abs() - p.t / 2


def _sdf_triangle_outline(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    return _sdf_triangle(x, y, p).abs() - p.t / 2


def _sdf_dot_grid(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    u, v = _rotate(x, y, p, centred=False)
    a, b = _periodic(u, p.period, p.phase1), _periodic(v, p.period, p.phase2)
    return torch.sqrt(a**2 + b**2) - p.period * 0.28


def _sdf_bullseye(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    rho = torch.sqrt((x - p.cx) ** 2 + (y - p.cy) ** 2)
    return torch.minimum(rho - p.r * 0.3, (rho - p.r * 0.85).abs() - p.t / 2)


def _sdf_half_disc(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    u, v = _rotate(x, y, p)
    return torch.maximum(torch.sqrt(u**2 + (v + p.r * 0.4) ** 2) - p.r, -(v + p.r * 0.4))


def _sdf_bar(x: torch.Tensor, y: torch.Tensor, p: _P) -> torch.Tensor:
    u, v = _rotate(x, y, p)
    return _box(u, v, p.r * 1.1, p.t * 0.8 + 0.04)


_SDF: dict[str, Callable[[torch.Tensor, torch.Tensor, _P], torch.Tensor]] = {
    "disc": _sdf_disc,
    "ring": _sdf_ring,
    "square": _sdf_square,
    "triangle": _sdf_triangle,
    "cross": _sdf_cross,
    "horizontal_stripes": _sdf_hstripes,
    "vertical_stripes": _sdf_vstripes,
    "diagonal_stripes": _sdf_dstripes,
    "checkerboard": _sdf_checker,
    "two_dots": _sdf_two_dots,
    "square_outline": _sdf_square_outline,
    "triangle_outline": _sdf_triangle_outline,
    "dot_grid": _sdf_dot_grid,
    "bullseye": _sdf_bullseye,
    "half_disc": _sdf_half_disc,
    "bar": _sdf_bar,
}


def colour_pairs() -> np.ndarray:
    """(P, 2) palette indices of every ordered (fg, bg) pair with a luma gap >= MIN_LUMA_GAP."""
    luma = PALETTE @ _LUMA
    return np.array(
        [(i, j) for i in range(len(PALETTE)) for j in range(len(PALETTE)) if abs(luma[i] - luma[j]) >= MIN_LUMA_GAP]
    )


def _colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(fg, bg) RGB in [0, 1]: a uniformly drawn palette pair plus a per-channel offset."""
    table = colour_pairs()
    pairs = table[rng.integers(0, len(table), n)]
    fg = np.clip(PALETTE[pairs[:, 0]] + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, (n, 3)), 0.0, 1.0)
    bg = np.clip(PALETTE[pairs[:, 1]] + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, (n, 3)), 0.0, 1.0)
    return fg, bg


def _col(a: np.ndarray) -> torch.Tensor:
    """(n,) or (n, 3) numpy values -> float32 tensor broadcastable to (n, 3, H, W)."""
    t = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return t.view(-1, 1, 1, 1) if t.dim() == 1 else t.view(-1, 3, 1, 1)


def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D bilinear upsampling (align_corners=False, edge-clamped)."""
    pos = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(0, n_in - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n_in - 1)
    w = pos - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - w
    m[torch.arange(n_out), hi] += w
    return m.float()


def make_synthetic(n: int, *, seed: int, num_classes: int = 10, image_size: int = 32) -> ImageData:
    """Generate ``n`` labelled RGB images deterministically from ``seed``.

    Labels are balanced (``n // num_classes`` per class, the first ``n % num_classes``
    classes get one more) and shuffled. Class ``c`` is the shape ``SHAPES[c]``.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"synthetic dataset size must be a positive integer, got {n!r}; set data.synthetic_size >= 1")
    if not 2 <= num_classes <= len(SHAPES):
        raise DataError(
            f"synthetic dataset supports 2..{len(SHAPES)} classes, got num_classes={num_classes}; "
            f"set data.num_classes in that range"
        )
    if image_size < 8:
        raise DataError(f"synthetic image_size must be >= 8 pixels, got {image_size}; set data.image_size >= 8")
    n, s = int(n), int(image_size)
    rng = np.random.default_rng(seed)

    labels = rng.permutation(np.arange(n) % num_classes)
    # All per-image parameters, drawn in a fixed order (the order fixes the output).
    raw = {
        "cx": rng.uniform(-_CENTER, _CENTER, n),
        "cy": rng.uniform(-_CENTER, _CENTER, n),
        "r": rng.uniform(*_RADIUS, n),
        "theta": rng.uniform(0.0, 2 * math.pi, n),
        "t": rng.uniform(*_THICK, n),
        "period": rng.uniform(*_PERIOD, n),
        "phase1": rng.random(n),
        "phase2": rng.random(n),
        "jitter": rng.uniform(-_STRIPE_JITTER, _STRIPE_JITTER, n),
        "sign": rng.choice([-1.0, 1.0], n),
    }
    fg, bg = _colours(rng, n)
    tex_amp = rng.uniform(0.0, 0.12, n)
    tex = rng.standard_normal((n, 3, 4, 4), dtype=np.float32)
    noise_amp = rng.uniform(0.0, 0.07, n)  # uniform noise in [-amp, amp] (std amp/sqrt(3))

    # Pixel-centre coordinates in [-1, 1]; y grows downwards.
    g = (torch.arange(s, dtype=torch.float32) + 0.5) * (2.0 / s) - 1.0
    ys, xs = torch.meshgrid(g, g, indexing="ij")
    px = 2.0 / s
    mask = torch.empty(n, 1, s, s)
    for c in range(num_classes):
        sel = np.flatnonzero(labels == c)
        if sel.size == 0:
            continue
        prm = _P(raw, sel)
        sdf = _SDF[SHAPES[c]](xs, ys, prm)
        if SHAPES[c] in _TEXTURES:
            sdf = torch.maximum(sdf, torch.sqrt((xs - prm.cx) ** 2 + (ys - prm.cy) ** 2) - prm.r * _PATCH)
        mask[torch.from_numpy(sel), 0] = (0.5 - sdf / px).clamp(0.0, 1.0)  # 1-pixel anti-aliased edge

    # Background: flat colour + smooth texture (4x4 Gaussian field, bilinearly upsampled as
    # two small matrix products); composite the foreground; add pixel noise (drawn last, in
    # image order). Done in chunks so the float buffers stay small.
    up = _bilinear_matrix(4, s)
    images = torch.empty(n, 3, s, s, dtype=torch.uint8)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        img = torch.einsum("ij,ncjk,lk->ncil", up, torch.from_numpy(tex[lo:hi]), up)
        img.mul_(_col(tex_amp[lo:hi])).add_(_col(bg[lo:hi]))
        img.add_((_col(fg[lo:hi]) - img).mul_(mask[lo:hi]))
        noise = torch.from_numpy(rng.random((hi - lo, 3, s, s), dtype=np.float32))
        img.add_(noise.sub_(0.5).mul_(_col(2.0 * noise_amp[lo:hi])))
        images[lo:hi] = img.clamp_(0.0, 1.0).mul_(255.0).round_()
    return ImageData(
        images=images,
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(SHAPES[:num_classes]),
        mean=SYNTHETIC_MEAN,
        std=SYNTHETIC_STD,
    )
