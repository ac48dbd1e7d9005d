"""CIFAR backbones as a flat sequence of ``NUM_UNITS`` = 9 units, ready to be cut.

Every backbone returned by :func:`build_backbone` is an ``nn.Sequential`` of exactly nine
units. Cut ``c`` (1..9) gives the client ``units[:c]`` and the server ``units[c:]``; the
server then adds global average pooling and the projector (see :mod:`mona_sfl.models.split`).

Both networks are assembled from torchvision's own model definitions, not hand-written
blocks, with the reference's normalisation (GroupNorm, 4 channels per group) and
weight-standardised convolutions (:class:`WSConv2d`) as the defaults.

**ResNet-18 (CIFAR variant)** -- built from ``torchvision.models.resnet.BasicBlock``,
``conv3x3`` and ``conv1x1``:

* unit 1: stem ``conv3x3(3 -> 64, stride 1, no bias) + norm + ReLU`` (no max-pool);
* units 2..9: the eight BasicBlocks with 64, 64, 128 (stride 2), 128, 256 (stride 2), 256,
  512 (stride 2), 512 output channels; a block that changes stride or channels gets the
  shortcut ``conv1x1 + norm``.

At width 1.0 with GroupNorm this is parameter-for-parameter the reference ResNet-18
(11,168,832 parameters, no buffers); the per-cut client parameter counts equal the
reference table in ``docs/algorithm.md`` section 2.1.

**MobileNetV2 (CIFAR variant)** -- built with ``torchvision.models.mobilenetv2.MobileNetV2``
(``width_mult``, ``norm_layer`` and a custom ``inverted_residual_setting``):

* unit 1: stem ``conv3x3(3 -> 32, stride 1) + norm + ReLU6`` (torchvision's stem with its
  stride changed from 2 to 1);
* units 2..8: the seven stages (t, c, n, s) = (1,16,1,1), (6,24,2,1), (6,32,3,2),
  (6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1), each an ``nn.Sequential`` of
  torchvision ``InvertedResidual`` blocks (stage 2 uses stride 1, the CIFAR setting);
* unit 9: the final ``conv1x1 -> 1280 + norm + ReLU6`` (torchvision's last layer).

For a 32x32 input the activation shapes after units 1..9 are (32,32,32), (16,32,32),
(24,32,32), (32,16,16), (64,8,8), (96,8,8), (160,4,4), (320,4,4), (1280,4,4), the same as
the reference. The blocks themselves differ from the reference's ``Block_gn``, so parameter
counts do not match the reference table (full backbone 2,223,872 here vs 2,284,112):

* ReLU6 everywhere (the reference uses ReLU);
* ReLU6 after the stem and after the final 1x1 conv (the reference has no activation
  after either);
* residuals only where stride is 1 and input and output channels are equal, always the
  identity; the reference adds a ``conv1x1 + BatchNorm2d`` shortcut in the four stride-1
  blocks that change the width (32->16, 16->24, 64->96, 160->320), so there is no
  BatchNorm hidden in the GroupNorm model here;
* torchvision's channel rounding (``_make_divisible``, multiples of 8) for ``width != 1``;
  unlike torchvision, the last channel is scaled by the width also when ``width < 1``
  (torchvision keeps 1280 there), so a narrow network stays narrow;
* convolutions are re-initialised with PyTorch's default init (see below) instead of
  torchvision's Kaiming-normal fan-out init.

**Initialisation.** Every convolution carries PyTorch's default ``nn.Conv2d`` init
(Kaiming-uniform with ``a = sqrt(5)``, as the reference's ``WSConv2d`` layers do); for
MobileNetV2 this is restored with ``reset_parameters()`` after torchvision's constructor.
GroupNorm/BatchNorm weights are 1 and biases 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor, nn
from torchvision.models._utils import _make_divisible
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, conv1x1, conv3x3
from torchvision.ops.misc import Conv2dNormActivation

from mona_sfl.models import ARCHS, BACKBONES, NORMS, NUM_UNITS

# ResNet-18: (output channels at width 1.0, stride) of the 8 BasicBlocks (units 2..9).
_RESNET18_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
)
# MobileNetV2 CIFAR stages (t, c, n, s): stage 2 has stride 1 instead of ImageNet's 2.
_MOBILENETV2_SETTING: list[list[int]] = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
_WS_EPS = 1e-5


class WSConv2d(nn.Conv2d):
    """Weight-standardised ``nn.Conv2d`` (Qiao et al., 2019), as in the reference code.

    Each output channel's weight ``w[o]`` (all ``in/groups * kh * kw`` entries) is replaced
    in the forward pass by ``(w[o] - mean(w[o])) / (std(w[o]) + 1e-5)``, where ``std`` is
    the **unbiased** standard deviation (``torch.std`` default, divisor n - 1). The stored
    parameter is unchanged; the bias (if any) is not standardised.

    Shape: input (N, C_in, H, W) -> output (N, C_out, H', W'), exactly as ``nn.Conv2d``.
    """

    def standardized_weight(self) -> Tensor:
        """Return the standardised weight, shape (C_out, C_in/groups, kh, kw)."""
        w = self.weight
        flat = w.flatten(1)  # (C_out, C_in/groups * kh * kw)
        dev = flat - flat.mean(dim=1, keepdim=True)
        # the unbiased std in two passes: the same value as Tensor.std to rounding, and on the
        # CPU 8x faster forward and 2.5x faster forward + backward for short rows (Tensor.std's
        # per-element Welford update dominated the batched pass of many clients)
        std = (dev * dev).sum(dim=1, keepdim=True).div(flat.shape[1] - 1).sqrt()
        return (dev / (std + _WS_EPS)).view_as(w)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Conv2d's argument name
        return self._conv_forward(input, self.standardized_weight(), self.bias)


def group_norm_groups(num_channels: int) -> int:
    """Number of GroupNorm groups for ``num_channels``: ``C // 4`` (4 channels per group).

    If ``C // 4`` does not divide ``C``, the largest divisor of ``C`` that is at most
    ``C // 4`` is used (at least 1).
    """
    g = max(num_channels // 4, 1)
    while num_channels % g:
        g -= 1
    return g


def _norm_factory(norm: str) -> Callable[[int], nn.Module]:
    """Return ``C -> norm layer`` for ``norm`` in :data:`NORMS`."""
    if norm == "group":
        return lambda c: nn.GroupNorm(group_norm_groups(c), c)
    return nn.BatchNorm2d


def check_backbone_args(arch: str, *, width: float = 1.0, norm: str = "group") -> None:
    """Raise ``ValueError`` (listing the legal values) for a bad ``arch``, ``norm`` or ``width``."""
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"unknown model.arch={arch!r}: legal values are {', '.join(ARCHS)}")
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"unknown model.norm={norm!r}: legal values are {', '.join(NORMS)}")
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float))
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ValueError(
            f"model.width={width!r} is not legal: width must be a finite number > 0 "
            "(1.0 = the reference network, e.g. 0.25 for fast CPU runs)"
        )


def resnet_channels(base: int, width: float) -> int:
    """ResNet channel count: ``base * width`` rounded (half up) to a multiple of 4, at least 4."""
    return max(4, 4 * math.floor(base * width / 4 + 0.5))


def resnet18_units(width: float, norm_layer: Callable[[int], nn.Module]) -> tuple[list[nn.Module], list[int]]:
    """The 9 ResNet-18 units and the channel count after each."""
    c0 = resnet_channels(64, width)
    units: list[nn.Module] = [nn.Sequential(conv3x3(3, c0), norm_layer(c0), nn.ReLU(inplace=True))]
    channels = [c0]
    inplanes = c0
    for base, stride in _RESNET18_BLOCKS:
        planes = resnet_channels(base, width)
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(conv1x1(inplanes, planes, stride), norm_layer(planes))
        units.append(BasicBlock(inplanes, planes, stride, downsample, norm_layer=norm_layer))
        channels.append(planes)
        inplanes = planes
    return units, channels


def mobilenetv2_units(width: float, norm_layer: Callable[[int], nn.Module]) -> tuple[list[nn.Module], list[int]]:
    """The 9 MobileNetV2 units (stem, 7 stages, last conv) and the channel count after each."""
    net = MobileNetV2(
        num_classes=1,  # the classifier is discarded; keep it tiny
        width_mult=width,
        inverted_residual_setting=[list(s) for s in _MOBILENETV2_SETTING],
        round_nearest=8,
        norm_layer=norm_layer,
    )
    feats = list(net.features)
    stem = feats[0]
    stem[0].stride = (1, 1)  # CIFAR: no downsampling in the stem (padding stays 1)
    units: list[nn.Module] = [stem]
    channels = [stem[0].out_channels]
    i = 1
    for _t, _c, n, _s in _MOBILENETV2_SETTING:
        stage = nn.Sequential(*feats[i : i + n])
        units.append(stage)
        channels.append(feats[i + n - 1].out_channels)
        i += n
    last = feats[i]
    if width < 1.0:
        # Deviation from torchvision, which keeps 1280 channels for width < 1.
        last = Conv2dNormActivation(
            channels[-1],
            _make_divisible(1280 * width, 8),
            kernel_size=1,
            norm_layer=norm_layer,
            activation_layer=nn.ReLU6,
        )
    units.append(last)
    channels.append(last[0].out_channels)
    # torchvision initialises convs with Kaiming-normal (fan_out); restore PyTorch's default.
    for m in nn.Sequential(*units).modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return units, channels


def build_backbone(
    arch: str, *, width: float = 1.0, norm: str = "group", weight_std: bool = True
) -> nn.Sequential:
    """Build ``arch`` as an ``nn.Sequential`` of exactly :data:`NUM_UNITS` units.

    Args:
        arch: one of :data:`ARCHS`.
        width: channel multiplier (> 0). ResNet: ``64/128/256/512 * width`` rounded to a
            multiple of 4 (at least 4). MobileNetV2: torchvision's ``width_mult`` rounding
            (multiples of 8), last channel ``1280 * width`` for ``width < 1``.
        norm: ``"group"`` (GroupNorm, 4 channels per group; reference) or ``"batch"``.
        weight_std: turn every ``nn.Conv2d`` into a :class:`WSConv2d` (same parameters).

    Returns:
        The backbone. Input (N, 3, H, W) -> output (N, out_channels, H/8, W/8) for both
        archs (ceil division). Extra attributes: ``out_channels`` (int, channels after unit
        9) and ``unit_channels`` (tuple of 9 ints, channels after each unit).

    Raises:
        ValueError: for an unknown ``arch`` or ``norm`` or a non-positive ``width``.
    """
    check_backbone_args(arch, width=width, norm=norm)
    norm_layer = _norm_factory(norm)
    units, channels = BACKBONES.get(arch)(float(width), norm_layer)
    if len(units) != NUM_UNITS:  # pragma: no cover - structural invariant
        raise RuntimeError(f"{arch} has {len(units)} units, expected {NUM_UNITS}")
    backbone = nn.Sequential(*units)
    if weight_std:
        for m in backbone.modules():
            if type(m) is nn.Conv2d:
                m.__class__ = WSConv2d  # same parameters, standardised in forward
    backbone.out_channels = channels[-1]
    backbone.unit_channels = tuple(channels)
    return backbone


__all__ = [
    "WSConv2d",
    "build_backbone",
    "check_backbone_args",
    "group_norm_groups",
    "mobilenetv2_units",
    "resnet18_units",
    "resnet_channels",
]
