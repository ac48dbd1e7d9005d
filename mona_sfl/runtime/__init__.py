"""Where the clients run: in-process, in Ray actors, on Flower SuperNodes.

Every runtime is the one sharded client runtime (:mod:`mona_sfl.runtime.sharded`) over a
transport: how a request reaches a :class:`~mona_sfl.core.host.ClientHost` and comes back.
This package face holds the registry (:data:`RUNTIMES`) and imports nothing heavy; Ray and
Flower are imported only when their runtime is used.
"""

from __future__ import annotations

from mona_sfl.registry import Registry

#: ``runtime``: name -> the runtime class (``cls(cfg, **kwargs)``).
RUNTIMES = Registry(
    "runtime",
    {
        "local": "mona_sfl.runtime.local:LocalRuntime",
        "ray": "mona_sfl.runtime.ray_runtime:RayRuntime",
        "flower": "mona_sfl.runtime.flower.runtime:FlowerRuntime",
    },
    needs={"ray": "ray==2.55.1", "flower": "flwr[simulation]>=1.42,<1.43"},
)


class AllClientsLost(RuntimeError):
    """Every sampled client failed in a step; the last checkpoint is kept."""


__all__ = ["RUNTIMES", "AllClientsLost"]
