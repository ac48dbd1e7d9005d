"""Split a backbone at a cut layer into a client front and a server net (backbone tail + projector).

Cut ``c`` in 1..:data:`NUM_CUTS` puts backbone units ``[:c]`` on the client and units
``[c:]`` on the server (``c = 9``: the whole backbone is on the client and the server holds
only pooling and the projector). :func:`cut_info` gives the per-cut sizes (activation shape,
parameter counts) without allocating real weights.
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mona_sfl.models import ARCHS, NUM_CUTS
from mona_sfl.models.backbones import build_backbone, check_backbone_args


def check_cut(arch: str, cut: int) -> None:
    """Raise ``ValueError`` unless ``arch`` is known and ``cut`` is an int in 1..:data:`NUM_CUTS`."""
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"unknown model.arch={arch!r}: legal values are {', '.join(ARCHS)}")
    legal = (
        f"legal cut layers are 1..{NUM_CUTS} "
        f"(1 = stem only, {NUM_CUTS} = whole backbone on the client)"
    )
    if isinstance(cut, bool) or not isinstance(cut, numbers.Integral):
        raise ValueError(
            f"model.cut={cut!r} ({type(cut).__name__}) is not an integer: {legal}"
        )
    if not 1 <= int(cut) <= NUM_CUTS:
        raise ValueError(f"model.cut={int(cut)} is out of range for {arch}: {legal}")


def _check_dims(**dims: int) -> None:
    for name, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"Projector {name} must be a positive int, got {v!r}")


class Projector(nn.Sequential):
    """MoCo v2 projection MLP: ``Linear(in_dim, hidden_dim) -> ReLU -> Linear(hidden_dim, out_dim)``.

    No BatchNorm, as in the reference. Weights are Xavier-uniform, biases zero (the
    reference's ``init_weights`` for ``nn.Linear``). With the defaults and ``in_dim = 512``
    it has 1,574,912 parameters.

    Shape: (N, in_dim) -> (N, out_dim).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 1024, out_dim: int = 1024) -> None:
        _check_dims(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
        super().__init__(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)


class ServerNet(nn.Module):
    """Server side of the split: backbone tail ``body``, global average pool, ``projector``.

    Attributes:
        body: ``nn.Sequential`` of the server's backbone units (empty for cut 9); its
            children keep their backbone indices as names (``body.<cut>``, ...).
        pool: ``AdaptiveAvgPool2d(1)`` + ``Flatten``.
        projector: :class:`Projector`.
        feature_dim: pooled feature dim D (= ``projector.in_dim``).
        out_dim: projector output dim.
    """

    def __init__(self, body: nn.Sequential, projector: Projector) -> None:
        super().__init__()
        self.body = body
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.projector = projector
        self.feature_dim = projector.in_dim
        self.out_dim = projector.out_dim

    def features(self, a: Tensor) -> Tensor:
        """Pooled backbone features: activation (N, C, H, W) -> (N, D)."""
        return self.pool(self.body(a))

    def forward(self, a: Tensor) -> Tensor:
        """Projector output (not normalised): activation (N, C, H, W) -> (N, out_dim)."""
        return self.projector(self.features(a))


def build_split(
    arch: str,
    cut: int,
    *,
    width: float = 1.0,
    norm: str = "group",
    weight_std: bool = True,
    proj_hidden: int = 1024,
    proj_dim: int = 1024,
) -> tuple[nn.Sequential, ServerNet]:
    """Build the backbone and projector and split them at ``cut``.

    The backbone is built first, then the projector, so the weights depend only on the
    torch seed the caller set. The client front is ``nn.Sequential(units[:cut])`` with
    child names ``"0".."cut-1"`` and an ``out_channels`` attribute (channels of the
    activation it sends).

    Shapes: client (N, 3, H, W) -> activation (N, C, H', W'); server activation -> (N, proj_dim).
    """
    check_cut(arch, cut)
    cut = int(cut)
    backbone = build_backbone(arch, width=width, norm=norm, weight_std=weight_std)
    projector = Projector(backbone.out_channels, proj_hidden, proj_dim)
    front = backbone[:cut]
    front.out_channels = backbone.unit_channels[cut - 1]
    server = ServerNet(backbone[cut:], projector)
    return front, server


@dataclass(frozen=True)
class CutInfo:
    """Sizes of one split (per sample, for an ``input_size`` x ``input_size`` RGB input)."""

    arch: str
    cut: int
    input_size: int
    width: float
    activation_shape: tuple[int, int, int]  # (C, H, W) the client sends per sample
    activation_numel: int  # C * H * W
    client_params: int  # parameters of the client front
    client_state_numel: int  # float entries of the client state_dict (params + e.g. BN stats)
    server_backbone_params: int  # parameters of the server's backbone units
    projector_params: int
    feature_dim: int  # pooled backbone feature dim D


def cut_info(
    arch: str,
    cut: int,
    *,
    input_size: int = 32,
    width: float = 1.0,
    norm: str = "group",
    weight_std: bool = True,
    proj_hidden: int = 1024,
    proj_dim: int = 1024,
) -> CutInfo:
    """Describe the split at ``cut`` without real weights.

    The backbone is built on the ``meta`` device (no memory, no use of the global RNG) and
    a (1, 3, input_size, input_size) shape pass gives the activation shape. Results are
    cached per configuration, so calling it every step is free.
    """
    check_cut(arch, cut)
    if isinstance(input_size, bool) or not isinstance(input_size, numbers.Integral) or input_size < 1:
        raise ValueError(f"input_size must be a positive int, got {input_size!r}")
    # Validate everything before the cache sees the arguments (they must be hashable).
    check_backbone_args(arch, width=width, norm=norm)
    _check_dims(hidden_dim=proj_hidden, out_dim=proj_dim)
    return _cut_info(
        arch, int(cut), int(input_size), float(width), norm, bool(weight_std),
        int(proj_hidden), int(proj_dim),
    )


@functools.lru_cache(maxsize=64)
def _unit_stats(
    arch: str, width: float, norm: str, weight_std: bool, input_size: int
) -> tuple[tuple[tuple[int, int, int], ...], tuple[int, ...], tuple[int, ...], int]:
    """Per-unit (C, H, W) after the unit, parameter count, float state numel; and D.

    One meta-device build and one (1, 3, S, S) shape pass serve all nine cuts.
    """
    with torch.device("meta"):
        backbone = build_backbone(arch, width=width, norm=norm, weight_std=weight_std)
    backbone.eval()  # BatchNorm: no batch statistics needed for a 1-sample shape pass
    shapes: list[tuple[int, int, int]] = []
    # Shape pass outside the device context, which would slow every op down.
    with torch.no_grad():
        x = torch.empty(1, 3, input_size, input_size, device="meta")
        for unit in backbone:
            x = unit(x)
            c, h, w = (int(d) for d in x.shape[1:])
            shapes.append((c, h, w))
    params = tuple(sum(p.numel() for p in unit.parameters()) for unit in backbone)
    states = tuple(
        sum(t.numel() for t in unit.state_dict().values() if torch.is_floating_point(t))
        for unit in backbone
    )
    return tuple(shapes), params, states, backbone.out_channels


@functools.lru_cache(maxsize=256)
def _cut_info(
    arch: str, cut: int, input_size: int, width: float, norm: str, weight_std: bool,
    proj_hidden: int, proj_dim: int,
) -> CutInfo:
    shapes, params, states, feature_dim = _unit_stats(arch, width, norm, weight_std, input_size)
    with torch.device("meta"):
        projector = Projector(feature_dim, proj_hidden, proj_dim)
    c, h, w = shapes[cut - 1]
    return CutInfo(
        arch=arch,
        cut=cut,
        input_size=input_size,
        width=width,
        activation_shape=(c, h, w),
        activation_numel=c * h * w,
        client_params=sum(params[:cut]),
        client_state_numel=sum(states[:cut]),
        server_backbone_params=sum(params[cut:]),
        projector_params=sum(p.numel() for p in projector.parameters()),
        feature_dim=feature_dim,
    )


__all__ = ["NUM_CUTS", "CutInfo", "Projector", "ServerNet", "build_split", "check_cut", "cut_info"]
