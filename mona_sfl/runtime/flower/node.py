"""The clients of one Flower SuperNode, rebuilt from ``context.state`` for every message.

A ClientApp may run each message in a different process (a fresh ``flwr-clientapp`` per
message in deployment, any Ray actor in simulation), so nothing survives between messages
except ``context.state``. :class:`NodeClients` therefore:

* rebuilds the node's :class:`~mona_sfl.core.client.ClientGroup` from the config (data,
  partition and initial weights are deterministic; data and partition are cached per
  process, read-only),
* loads the group's compact state (fronts where they differ from the global ones,
  optimizer momentum, step counters, stream positions) from ``context.state``,
* runs the step: step t's backward first, recomputing the online forward from the same two
  views (draw d is regenerated from the stream position saved at step t's forward), then
  step t+1's forward,
* writes the state back.

This module knows records and the core; it does not know Messages (see ``client_app``).
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import RecordDict

from mona_sfl import build
from mona_sfl.config import Config, to_flat
from mona_sfl.core.client import Activations, ClientGroup, StateDict
from mona_sfl.data.datasets import ImageData
from mona_sfl.runtime.flower.codec import records_to_tree, tree_to_records

STATE_ARRAYS = "mona.arrays"  # context.state keys of this node's state
STATE_TREE = "mona.tree"

# Per-process cache of the read-only inputs every message needs: (train data, partition).
_DATA: dict[str, tuple[ImageData, list[np.ndarray]]] = {}


def config_key(cfg: Config) -> str:
    return json.dumps(to_flat(cfg), sort_keys=True)


def node_client_ids(num_clients: int, partition_id: int, num_nodes: int) -> list[int]:
    """The clients a node hosts: those whose id % num_nodes == the node's partition id."""
    return [c for c in range(num_clients) if c % num_nodes == partition_id]


def client_device(cfg: Config) -> torch.device:
    """The device a ClientApp computes on: CUDA when asked or automatic and visible."""
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _data(cfg: Config) -> tuple[ImageData, list[np.ndarray]]:
    key = config_key(cfg)
    if key not in _DATA:
        _DATA.clear()  # one run per process at a time; do not grow
        train = build.load_data(cfg, "train")
        parts = build.client_partition(cfg, train.labels, len(train.classes))
        _DATA[key] = (train, parts)
    return _DATA[key]


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in module.named_buffers()}


def _restore_buffers(module: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, b in module.named_buffers():
            b.copy_(saved[n])


class NodeClients:
    """One node's clients for the duration of one message."""

    def __init__(self, cfg: Config, partition_id: int, num_nodes: int, state: RecordDict | None = None) -> None:
        if not 0 <= partition_id < num_nodes:
            raise ValueError(f"partition-id {partition_id} is outside 0..{num_nodes - 1}")
        self.cfg = cfg
        self.partition_id = partition_id
        self.num_nodes = num_nodes
        self.ids = node_client_ids(cfg.fed.num_clients, partition_id, num_nodes)
        self.device = client_device(cfg)
        train, parts = _data(cfg)
        self.group: ClientGroup = build.build_client_group(cfg, self.ids, train=train, parts=parts, device=self.device)
        # draw index of each client's last forward: ClientStream.batch(d) regenerates its views
        self.pending: dict[int, int] = {}
        if state is not None and STATE_ARRAYS in state.array_records and STATE_TREE in state.config_records:
            tree = records_to_tree(state.array_records[STATE_ARRAYS], state.config_records[STATE_TREE])
            if tree["partition"] != [partition_id, num_nodes]:
                raise RuntimeError(
                    f"this node's state was written for partition {tree['partition']}, not {[partition_id, num_nodes]}"
                )
            self.group.load_state_dict(tree["group"])
            self.pending = {int(k): int(v) for k, v in tree["pending"].items()}

    # ------------------------------------------------------------------ state
    def save(self, state: RecordDict) -> None:
        tree = {
            "partition": [self.partition_id, self.num_nodes],
            "group": self.group.state_dict(),
            "pending": {str(k): v for k, v in self.pending.items()},
        }
        arrays, config = tree_to_records(tree)
        state[STATE_ARRAYS] = arrays
        state[STATE_TREE] = config

    def align(self, epoch: int, live: list[int]) -> None:
        """Follow the server's epoch boundaries: ``live`` are this node's clients sampled in ``epoch``."""
        live = [c for c in live if c in self.group.streams]
        if self.group.epoch != epoch or sorted(self.group.live) != sorted(live):
            self.group.begin_epoch(epoch, live)
            self.pending.clear()

    # ------------------------------------------------------------------ one step
    def _views(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of the client's last forward, regenerated from the stream."""
        if cid not in self.pending:
            raise RuntimeError(f"client {cid}: gradient for a step whose forward this node has no record of")
        x1, x2 = self.group.streams[cid].batch(self.pending[cid])  # type: ignore[attr-defined]
        return x1.to(self.device), x2.to(self.device)

    def step(self, grads: dict[int, torch.Tensor], forward: list[int]) -> dict[int, Activations]:
        """Backward of step t for ``grads`` (graph recomputed), then forward of step t+1 for ``forward``."""
        for cid, g in grads.items():
            w = self.group.live[cid]
            views = self._views(cid)
            saved = _buffers(w.online)  # BatchNorm: the recompute must not count its statistics twice
            w.backward(g.to(self.device), recompute=views)
            _restore_buffers(w.online, saved)
            del self.pending[cid]
        out: dict[int, Activations] = {}
        for cid in forward:
            self.pending[cid] = int(self.group.streams[cid].draws)  # type: ignore[attr-defined]
            out.update(self.group.forward([cid]))
            w = self.group.live[cid]
            if next(w.online.buffers(), None) is not None:
                # The forward moved BatchNorm running statistics: the online front now differs from the
                # global one even before its optimizer step, and must be kept in context.state.
                w.online_synced = False
        return out

    # ------------------------------------------------------------------ sync and checkpoint
    def fronts(self, ids: list[int]) -> dict[int, tuple[StateDict, StateDict]]:
        return self.group.fronts([c for c in ids if c in self.group.live])

    def load_global(self, online: StateDict, momentum: StateDict | None) -> None:
        self.group.load_global(online, momentum)

    def state_dict(self) -> dict:
        return self.group.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.group.load_state_dict(state)
        self.pending.clear()


__all__ = ["NodeClients", "node_client_ids", "client_device", "config_key", "STATE_ARRAYS", "STATE_TREE"]
