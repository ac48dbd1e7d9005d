"""The client host of one Flower SuperNode, rebuilt from ``context.state`` for every message.

A ClientApp may run each message in a different process (a fresh ``flwr-clientapp`` per
message in a default deployment, any Ray actor in simulation), so nothing survives between
messages except ``context.state`` (a long-lived ClientApp process, ``clientapp_worker``, only
keeps the per-process caches below). For every message the node:

* rebuilds its :class:`~mona_sfl.core.host.ClientHost` from the config (data, partition and
  initial weights are deterministic; data and partition are cached per process, read-only);
* loads the host's compact state (fronts where they differ from the global ones, optimizer
  momentum, step counters, stream positions, the draws whose backward is due) from
  ``context.state`` and follows the server's epoch boundaries (``ClientHost.follow``);
* serves the request (:func:`mona_sfl.runtime.sharded.serve`): the host recomputes a
  forward whose graph did not survive, as core decides;
* writes the state back.

This module knows records and the core; it does not know Messages (see ``client_app``).
"""

from __future__ import annotations

import json

import numpy as np
from flwr.app import RecordDict

from mona_sfl import build
from mona_sfl.config import Config, to_flat
from mona_sfl.core.host import ClientHost
from mona_sfl.data.images import ImageData
from mona_sfl.runtime.flower.codec import records_to_tree, tree_to_records

STATE_ARRAYS = "mona.arrays"  # context.state keys of this node's state
STATE_TREE = "mona.tree"

# Per-process cache of the read-only inputs every message needs: (train data, partition).
_DATA: dict[str, tuple[ImageData, list[np.ndarray]]] = {}


def config_key(cfg: Config) -> str:
    return json.dumps(to_flat(cfg), sort_keys=True)


def node_client_ids(num_clients: int, partition_id: int, num_nodes: int) -> list[int]:
    """The clients a node hosts: those whose id % num_nodes == the node's partition id (the sharded runtime's map)."""
    return [c for c in range(num_clients) if c % num_nodes == partition_id]


def _data(cfg: Config) -> tuple[ImageData, list[np.ndarray]]:
    key = config_key(cfg)
    if key not in _DATA:
        _DATA.clear()  # one run per process at a time; do not grow
        train = build.load_data(cfg, "train")
        parts = build.client_partition(cfg, train.labels, len(train.classes))
        _DATA[key] = (train, parts)
    return _DATA[key]


def load_host(cfg: Config, partition_id: int, num_nodes: int, state: RecordDict | None = None) -> ClientHost:
    """This node's host, with the state ``context.state`` holds (none: the run's initial state)."""
    if not 0 <= partition_id < num_nodes:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_nodes - 1}")
    ids = node_client_ids(cfg.fed.num_clients, partition_id, num_nodes)
    train, parts = _data(cfg)
    host = build.build_host(cfg, ids, train=train, parts=parts, device=build.resolve_device(cfg.device, strict=False))
    if state is not None and STATE_ARRAYS in state.array_records and STATE_TREE in state.config_records:
        tree = records_to_tree(state.array_records[STATE_ARRAYS], state.config_records[STATE_TREE])
        if tree["partition"] != [partition_id, num_nodes]:
            raise RuntimeError(f"this node's state was written for partition {tree['partition']}, not {[partition_id, num_nodes]}")
        host.load_state_dict(tree["host"])
    return host


def save_host(host: ClientHost, partition_id: int, num_nodes: int, state: RecordDict) -> None:
    """Write the host's state into ``context.state``."""
    arrays, config = tree_to_records({"partition": [partition_id, num_nodes], "host": host.state_dict()})
    state[STATE_ARRAYS] = arrays
    state[STATE_TREE] = config


__all__ = ["load_host", "save_host", "node_client_ids", "config_key", "STATE_ARRAYS", "STATE_TREE"]
