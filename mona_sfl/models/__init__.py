"""Backbones (ResNet-18, MobileNetV2; CIFAR variants) and their client/server split."""

from mona_sfl.models.backbones import (
    ARCHS,
    NORMS,
    NUM_UNITS,
    WSConv2d,
    build_backbone,
    check_backbone_args,
    group_norm_groups,
    resnet_channels,
)
from mona_sfl.models.split import (
    NUM_CUTS,
    CutInfo,
    Projector,
    ServerNet,
    build_split,
    check_cut,
    cut_info,
)

__all__ = [
    "ARCHS",
    "NORMS",
    "NUM_CUTS",
    "NUM_UNITS",
    "CutInfo",
    "Projector",
    "ServerNet",
    "WSConv2d",
    "build_backbone",
    "build_split",
    "check_backbone_args",
    "check_cut",
    "cut_info",
    "group_norm_groups",
    "resnet_channels",
]
