"""The client-runtime interface and the registry of runtimes.

A runtime hosts the clients and moves bytes between them and the server; it holds no
algorithm of its own (that is ``mona_sfl.core``). The engine drives every runtime through
the same calls, in the same order, so their results can be compared exactly.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from mona_sfl.core.client import Activations, StateDict

if TYPE_CHECKING:
    from mona_sfl.config import Config


class ClientRuntime(ABC):
    """Where the clients live. All ids are global client ids."""

    name: str = "abstract"

    def __init__(self) -> None:
        # Bytes really sent, counted from the payloads each runtime serialises (0 in-process).
        self.bytes = {"up": 0, "down": 0, "sync": 0}
        self.lost: set[int] = set()  # clients dropped after a fault, for the rest of the epoch

    @abstractmethod
    def begin_epoch(self, epoch: int, ids: list[int]) -> None: ...

    @abstractmethod
    def forward(self, ids: list[int]) -> dict[int, Activations]: ...

    @abstractmethod
    def backward(self, grads: dict[int, torch.Tensor]) -> None: ...

    def backward_forward(self, grads: dict[int, torch.Tensor], ids: list[int]) -> dict[int, Activations]:
        """Step t's backward and step t+1's forward; runtimes may fuse them into one round trip."""
        self.backward(grads)
        return self.forward(ids)

    @abstractmethod
    def fronts(self, ids: list[int]) -> dict[int, tuple[StateDict, StateDict]]: ...

    @abstractmethod
    def load_global(self, online: StateDict, momentum: StateDict | None) -> None: ...

    @abstractmethod
    def end_epoch(self) -> None: ...

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def close(self) -> None:
        """Release processes and resources; safe to call twice."""


RUNTIMES: dict[str, tuple[str, str, str]] = {
    # name: (module, class, pip hint)
    "local": ("mona_sfl.runtime.local", "LocalRuntime", ""),
    "ray": ("mona_sfl.runtime.ray_runtime", "RayRuntime", "pip install 'ray==2.55.1'"),
    "flower": ("mona_sfl.runtime.flower", "FlowerRuntime", "pip install 'flwr[simulation]>=1.42,<1.43'"),
}


def make_runtime(cfg: "Config", **kwargs: object) -> ClientRuntime:
    """Instantiate the runtime named by ``cfg.runtime`` (optional ones imported lazily)."""
    if cfg.runtime not in RUNTIMES:
        raise ValueError(f"runtime='{cfg.runtime}' is unknown: choose one of {', '.join(RUNTIMES)}")
    module, cls, hint = RUNTIMES[cfg.runtime]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("ray", "flwr"):
            raise RuntimeError(f"runtime='{cfg.runtime}' needs the '{e.name}' package: {hint}") from None
        raise
    return getattr(mod, cls)(cfg, **kwargs)
