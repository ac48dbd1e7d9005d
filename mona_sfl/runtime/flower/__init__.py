"""Flower runtime: clients on Flower SuperNodes (simulation engine or real deployment).

* ``codec``: tensors / state dicts / nested states <-> ArrayRecord + ConfigRecord (no pickle);
* ``node``: one node's clients, rebuilt from ``context.state`` per message;
* ``client_app`` / ``server_app``: the Flower app (``flwr run`` loads their ``app``);
* ``runtime``: :class:`FlowerRuntime`, the sharded runtime over a Grid;
* ``launch``: :func:`train_with_flower` (simulation engine, Ray backend);
* ``deploy``: SuperLink + N SuperNodes as local processes, then ``flwr run``.

Attributes are imported lazily: a deployed ``flwr-clientapp`` process imports this package
for every message, and must not pay for torch when the message does not need it.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "FlowerRuntime": "mona_sfl.runtime.flower.runtime",
    "NodeFailure": "mona_sfl.runtime.flower.runtime",
    "train_with_flower": "mona_sfl.runtime.flower.launch",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
