"""The run's evaluation: the encoder (synced client front + server net), the kNN monitor, the linear probe.

:class:`Monitor` is built once per run from the config and the data. It holds its own copy of
the client front (loaded with the synced global front at each evaluation) and reads the
server's online net; it changes neither. The kNN bank and the probe's training set are a
seeded subset of the training images (``data.bank_size``), the test set a fixed
class-stratified draw (``data.test_size``); nothing is selected on the test set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mona_sfl.eval.knn import extract_features, knn_accuracy, stratified_subset
from mona_sfl.eval.linear import linear_probe

if TYPE_CHECKING:
    from mona_sfl.config import Config
    from mona_sfl.data.images import ImageData
    from mona_sfl.models.split import ServerNet


def eval_sets(cfg: "Config", train: "ImageData", test: "ImageData") -> tuple["ImageData", "ImageData"]:
    """The kNN bank (a seeded subset of the training images) and the evaluation test set."""
    bank = train
    if cfg.data.bank_size and cfg.data.bank_size < len(bank):
        g = torch.Generator().manual_seed(cfg.data_seed + 7)
        bank = bank.subset(torch.randperm(len(bank), generator=g)[: cfg.data.bank_size].sort().values.numpy())
    if cfg.data.test_size and cfg.data.test_size < len(test):
        test = test.subset(stratified_subset(test.labels, cfg.data.test_size))
    return bank, test


class Monitor:
    """kNN accuracy and linear probe of the encoder ``front -> server net`` (see the module docstring)."""

    def __init__(self, cfg: "Config", train: "ImageData", test: "ImageData", front: nn.Module, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.front = front.to(device)
        self.bank, self.test = eval_sets(cfg, train, test)
        self.num_classes = len(train.classes)

    def _encoder(self, server: "ServerNet", kind: str, front: nn.Module | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        front = self.front if front is None else front

        def encode(x: torch.Tensor) -> torch.Tensor:
            a = front(x)
            return F.normalize(server(a), dim=1) if kind == "projector" else server.features(a)

        return encode

    @torch.no_grad()
    def features(self, front_state: dict[str, torch.Tensor], server: "ServerNet", kind: str) -> tuple[torch.Tensor, ...]:
        """(bank features, bank labels, test features, test labels) of the encoder; ``kind`` is
        ``projector`` (L2-normalised projector output) or ``backbone`` (pooled features)."""
        self.front.load_state_dict(front_state)
        return self.module_features(self.front, server, kind)

    @torch.no_grad()
    def module_features(self, front: nn.Module, server: "ServerNet", kind: str, test: "ImageData | None" = None) -> tuple[torch.Tensor, ...]:
        """:meth:`features` of the encoder ``front -> server`` for any front module (e.g. a
        front followed by an intervention); ``test`` replaces the evaluation test set."""
        was = server.training
        front.eval()
        server.eval()
        try:
            enc = self._encoder(server, kind, front)
            bs, bank, test = self.cfg.eval.batch_size, self.bank, self.test if test is None else test
            fb = extract_features(enc, bank.images, mean=bank.mean, std=bank.std, batch_size=bs, device=self.device)
            ft = extract_features(enc, test.images, mean=bank.mean, std=bank.std, batch_size=bs, device=self.device)
        finally:
            server.train(was)
        return fb, bank.labels, ft, test.labels

    def knn_module(self, front: nn.Module, server: "ServerNet", test: "ImageData | None" = None) -> float:
        """kNN accuracy of ``front -> server`` (``test``: another test set, e.g. one client's classes)."""
        e = self.cfg.eval
        fb, lb, ft, lt = self.module_features(front, server, e.knn_features, test)
        return knn_accuracy(fb, lb, ft, lt, self.num_classes, k=e.knn_k, t=e.knn_t)

    def knn(self, front_state: dict[str, torch.Tensor], server: "ServerNet") -> float:
        e = self.cfg.eval
        fb, lb, ft, lt = self.features(front_state, server, e.knn_features)
        return knn_accuracy(fb, lb, ft, lt, self.num_classes, k=e.knn_k, t=e.knn_t)

    def linear(self, front_state: dict[str, torch.Tensor], server: "ServerNet") -> float:
        e = self.cfg.eval
        fb, lb, ft, lt = self.features(front_state, server, "backbone")
        res = linear_probe(fb, lb, ft, lt, self.num_classes, epochs=e.linear_epochs, lr=e.linear_lr, seed=self.cfg.seed, device=self.device)
        return res.top1


__all__ = ["Monitor", "eval_sets"]
