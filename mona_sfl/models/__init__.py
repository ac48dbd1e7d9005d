"""Backbones (ResNet-18, MobileNetV2; CIFAR variants) and their client/server split.

This package face holds the vocabulary (:data:`BACKBONES`, :data:`NORMS`, :data:`NUM_CUTS`)
and imports nothing heavy: the config validates against it without importing torch. The
model code (``backbones``, ``split``) is imported on first use of one of its names.
"""

from __future__ import annotations

from mona_sfl.registry import Choices, Registry, lazy_exports

NUM_UNITS = 9  # every backbone is a sequence of exactly 9 units; cut c gives the client units[:c]
NUM_CUTS = NUM_UNITS  # legal cuts are 1..NUM_CUTS

#: ``model.arch``: name -> the function building that backbone's 9 units (see ``backbones``).
BACKBONES = Registry(
    "model.arch",
    {"resnet18": "mona_sfl.models.backbones:resnet18_units", "mobilenetv2": "mona_sfl.models.backbones:mobilenetv2_units"},
)
ARCHS = BACKBONES
#: ``model.norm``: GroupNorm (4 channels per group, the reference) or BatchNorm.
NORMS = Choices("model.norm", ("group", "batch"))

_LAZY = {
    "WSConv2d": "backbones",
    "build_backbone": "backbones",
    "check_backbone_args": "backbones",
    "group_norm_groups": "backbones",
    "resnet_channels": "backbones",
    "CutInfo": "split",
    "Projector": "split",
    "ServerNet": "split",
    "build_split": "split",
    "check_cut": "split",
    "cut_info": "split",
}


__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = ["ARCHS", "BACKBONES", "NORMS", "NUM_CUTS", "NUM_UNITS", *_LAZY]
