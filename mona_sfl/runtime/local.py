"""In-process runtime: the reference semantics. Clients are plain objects; nothing is copied."""

from __future__ import annotations

import torch

from mona_sfl.build import build_client_group
from mona_sfl.config import Config
from mona_sfl.core.client import Activations, StateDict
from mona_sfl.runtime.base import ClientRuntime


class LocalRuntime(ClientRuntime):
    name = "local"

    def __init__(self, cfg: Config, **kwargs: object) -> None:
        super().__init__()
        self.group = build_client_group(cfg, list(range(cfg.fed.num_clients)), **kwargs)  # type: ignore[arg-type]

    def begin_epoch(self, epoch: int, ids: list[int]) -> None:
        self.group.begin_epoch(epoch, ids)

    def forward(self, ids: list[int]) -> dict[int, Activations]:
        return self.group.forward(ids)

    def backward(self, grads: dict[int, torch.Tensor]) -> None:
        self.group.backward(grads)

    def fronts(self, ids: list[int]) -> dict[int, tuple[StateDict, StateDict]]:
        return self.group.fronts(ids)

    def load_global(self, online: StateDict, momentum: StateDict | None) -> None:
        self.group.load_global(online, momentum)

    def end_epoch(self) -> None:
        self.group.end_epoch()

    def state_dict(self) -> dict:
        return self.group.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.group.load_state_dict(state)
