"""``FlowerRuntime``: the engine's clients live on Flower SuperNodes, reached through a Grid.

The ServerApp runs the ordinary :class:`mona_sfl.engine.Trainer` with this runtime; every
runtime call becomes one exchange of messages with the nodes (see ``client_app`` for the
message types):

* ``forward`` / ``backward`` / ``backward_forward`` -> one ``train.step`` per node hosting a
  client of the call (the fused form carries step t's gradient and asks for step t+1's
  activations: one round trip per step);
* ``fronts`` -> ``query.fronts``; ``load_global`` -> ``train.sync`` to every node;
* ``state_dict`` / ``load_state_dict`` -> ``query.state`` / ``train.load``.

Client ``c`` lives on the node whose ``partition-id`` is ``c % num_nodes``. Node ids are
random, so the runtime asks every node for its partition id first (``query.meta``).

At most one message per node is in flight: the runtime waits for all replies (or
``flower.step_timeout_s``) before it sends the next. A node that answers with an error or
not in time loses its clients for the rest of the epoch (``self.lost``); training goes on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from mona_sfl import build
from mona_sfl.config import Config
from mona_sfl.core.client import Activations, StateDict
from mona_sfl.runtime.base import ClientRuntime
from mona_sfl.runtime.flower.codec import (
    decode_activations,
    record_bytes,
    record_to_state_dict,
    records_to_tree,
    state_dict_to_record,
    tensor_to_array,
    tree_to_records,
)
from mona_sfl.runtime.flower.node import node_client_ids

log = logging.getLogger("mona_sfl.flower")


class NodeFailure(RuntimeError):
    """A node could not serve a request the run cannot do without (checkpoint state)."""


class FlowerRuntime(ClientRuntime):
    """Clients on Flower SuperNodes; the engine's calls become Grid message exchanges."""

    name = "flower"

    def __init__(
        self,
        cfg: Config,
        grid: Grid | None = None,
        *,
        poll_s: float | None = None,
        connect_timeout_s: float | None = None,
        **_unused: object,
    ) -> None:
        super().__init__()
        if grid is None:
            raise RuntimeError(
                "runtime='flower' runs inside a Flower ServerApp: start it with `mona-sfl train --set runtime=flower` "
                "(simulation), `flwr run .` or simulations/deploy_local.sh, not by constructing FlowerRuntime(cfg) alone"
            )
        self.cfg = cfg
        self.grid = grid
        # Replies are polled with exponential back-off from 1 ms up to poll_s: 10 ms on the
        # in-memory Grid of the simulation engine, 100 ms over HTTP (each poll is a request).
        in_memory = type(grid).__name__ == "InMemoryGrid"
        self.poll_s = poll_s if poll_s is not None else (0.01 if in_memory else 0.1)
        self.timeout_s = cfg.flower.step_timeout_s
        self.num_nodes = cfg.flower.num_supernodes or cfg.fed.num_clients
        self.epoch = 0
        self.live: list[int] = []  # the clients sampled for the current epoch (empty between epochs)
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.node_pid: dict[int, int] = {}  # partition id -> process id of its last reply (diagnostics)
        self._busy: dict[int, str] = {}  # node id -> id of a message it never answered in time
        self._seq = 0
        self._last_state: dict[int, dict] = {}  # partition -> its last reported state (checkpoint fallback)
        self.exchanges = 0  # round trips made (one per runtime call)
        self.wait_s = 0.0  # wall time spent waiting for replies
        front, _ = build.build_models(cfg)
        self._front_keys = list(front.state_dict())
        self.spec = build.activation_spec(cfg)  # what a client's reply may hold (checked before decoding)
        self._discover(connect_timeout_s if connect_timeout_s is not None else max(self.timeout_s, 60.0))

    # ------------------------------------------------------------------ plumbing
    def _partition_of(self, cid: int) -> int:
        return cid % self.num_nodes

    def _clients_of(self, part: int) -> list[int]:
        return node_client_ids(self.cfg.fed.num_clients, part, self.num_nodes)

    def _cfg_record(self, **extra: Any) -> ConfigRecord:
        rec: dict[str, Any] = {"nodes": self.num_nodes, "epoch": self.epoch}
        for k, v in {"live": self.live, **extra}.items():
            if isinstance(v, list):
                if v:  # an empty list does not survive protobuf typing: leave the key out
                    rec[k] = [int(x) for x in v]
            else:
                rec[k] = v
        return ConfigRecord(rec)

    def _push(self, msgs: list[Message]) -> list[str]:
        """Push all messages in one request; the ones refused (the HTTP Grid returns [] on a 413,
        ``None`` for a malformed message) are pushed again one by one."""
        res = list(self.grid.push_messages(msgs))
        if not res:
            res = [None] * len(msgs)
        if len(res) != len(msgs):
            raise NodeFailure(f"the Grid acknowledged {len(res)} of {len(msgs)} pushed messages")
        ids: list[str] = []
        for m, mid in zip(msgs, res):
            if not mid:
                again = list(self.grid.push_messages([m]))
                if not again or not again[0]:
                    raise NodeFailure(f"could not push a {m.metadata.message_type} message to node {m.metadata.dst_node_id}")
                mid = again[0]
            ids.append(str(mid))
        return ids

    def _free(self, node_id: int) -> bool:
        """True when the node has no unanswered message (checks a late reply of an old one)."""
        mid = self._busy.get(node_id)
        if mid is None:
            return True
        if list(self.grid.pull_messages([mid])):
            del self._busy[node_id]
            return True
        return False

    def _exchange(
        self, requests: dict[int, tuple[str, RecordDict]], *, timeout_s: float | None = None
    ) -> tuple[dict[int, RecordDict], dict[int, str]]:
        """Send one message per partition, wait for the replies; (replies, failures) by partition."""
        self._seq += 1
        failures: dict[int, str] = {}
        msgs: list[Message] = []
        parts: list[int] = []
        ttl = max(float(timeout_s or self.timeout_s), 1.0) + 10.0
        for part, (mtype, content) in requests.items():
            nid = self.node_of[part]
            if not self._free(nid):
                failures[part] = "still busy with an earlier message it did not answer in time"
                continue
            msgs.append(Message(content, dst_node_id=nid, message_type=mtype, ttl=ttl, group_id=f"{self._seq}"))
            parts.append(part)
        replies: dict[int, RecordDict] = {}
        if not msgs:
            return replies, failures
        t0 = time.perf_counter()
        pending = dict(zip(self._push(msgs), parts))
        deadline = time.monotonic() + float(timeout_s or self.timeout_s)
        sleep = 0.001
        while pending:
            for r in self.grid.pull_messages(list(pending)):
                part = pending.pop(r.metadata.reply_to_message_id, None)
                if part is None:
                    continue
                if r.has_error():
                    failures[part] = f"error {r.error.code}: {r.error.reason}"
                else:
                    replies[part] = r.content
                    meta = r.content.config_records.get("meta")
                    if meta is not None and "pid" in meta:
                        self.node_pid[part] = int(meta["pid"])  # type: ignore[arg-type]
            if not pending:
                break
            if time.monotonic() > deadline:
                for mid, part in pending.items():
                    failures[part] = f"no reply within {timeout_s or self.timeout_s:g} s"
                    self._busy[self.node_of[part]] = mid
                break
            time.sleep(sleep)
            sleep = min(sleep * 1.5, self.poll_s)
        self.wait_s += time.perf_counter() - t0
        self.exchanges += 1
        return replies, failures

    def _lose(self, failures: dict[int, str], what: str, clients: dict[int, list[int]]) -> None:
        for part, reason in failures.items():
            cids = clients.get(part, [])
            self.lost.update(cids)
            log.warning("flower: node %d (partition %d) failed in %s: %s; clients %s lost for the rest of epoch %d",
                        self.node_of.get(part, -1), part, what, reason, cids, self.epoch)

    def _discover(self, timeout_s: float) -> None:
        """Map partition ids to node ids: ``query.meta`` to every node that connects.

        A node whose reply is an error (e.g. a SuperNode started without ``partition-id``) is
        asked again every 5 s until ``timeout_s``. When all nodes report the same
        ``num-partitions`` and it differs from the config (``flwr run`` with another federation
        size), the nodes win, with a warning.
        """
        deadline = time.monotonic() + timeout_s
        asked: set[int] = set()
        retry_at: dict[int, float] = {}
        errors: dict[int, str] = {}
        pending: dict[str, int] = {}
        found: dict[int, int] = {}
        reported: set[int] = set()
        while True:
            now = time.monotonic()
            new = [n for n in self.grid.get_node_ids() if n not in asked and retry_at.get(n, 0.0) <= now]
            if new:
                cfg = ConfigRecord({"nodes": self.num_nodes})
                msgs = [Message(RecordDict({"cfg": cfg}), dst_node_id=n, message_type="query.meta", ttl=timeout_s + 10.0, group_id="meta")
                        for n in new]
                asked.update(new)
                pending.update(zip(self._push(msgs), new))
            if pending:
                for r in self.grid.pull_messages(list(pending)):
                    nid = pending.pop(r.metadata.reply_to_message_id, None)
                    if nid is None:
                        continue
                    if r.has_error():
                        if errors.get(nid) != r.error.reason:
                            log.warning("flower: node %d did not answer query.meta (asking again every 5 s): %s", nid, r.error.reason)
                        errors[nid] = r.error.reason
                        asked.discard(nid)
                        retry_at[nid] = time.monotonic() + 5.0
                        continue
                    errors.pop(nid, None)
                    meta = r.content.config_records["meta"]
                    part, nparts = int(meta["partition-id"]), int(meta["num-partitions"])  # type: ignore[arg-type]
                    if nparts > 0:
                        reported.add(nparts)
                    if part in found:
                        log.warning("flower: nodes %d and %d both report partition-id %d; using %d", found[part], nid, part, found[part])
                    else:
                        found[part] = nid
            if len(reported) == 1 and next(iter(reported)) != self.num_nodes:
                nparts = next(iter(reported))
                log.warning("flower: the SuperNodes report num-partitions=%d but the config asks for %d nodes; using %d",
                            nparts, self.num_nodes, nparts)
                self.num_nodes = nparts
            if all(p in found for p in range(self.num_nodes)):
                break
            if time.monotonic() > deadline:
                missing = [p for p in range(self.num_nodes) if p not in found]
                why = f"; errors: {errors}" if errors else ""
                raise NodeFailure(
                    f"flower: no SuperNode with partition-id {missing} answered within {timeout_s:g} s "
                    f"({len(found)} of {self.num_nodes} found{why}): start {self.num_nodes} SuperNodes with "
                    f"--node-config 'partition-id=I num-partitions={self.num_nodes}' (I = 0..{self.num_nodes - 1})"
                )
            time.sleep(0.01 if pending else 0.1)
        extra = sorted(p for p in found if p >= self.num_nodes)
        if extra:
            log.warning("flower: ignoring nodes with partition-id %s >= %d", extra, self.num_nodes)
        self.node_of = {p: found[p] for p in range(self.num_nodes)}

    # ------------------------------------------------------------------ ClientRuntime
    def begin_epoch(self, epoch: int, ids: list[int]) -> None:
        self.lost.clear()
        self.epoch = epoch
        self.live = list(ids)

    def end_epoch(self) -> None:
        self.live = []

    def forward(self, ids: list[int]) -> dict[int, Activations]:
        return self._step({}, ids)

    def backward(self, grads: dict[int, torch.Tensor]) -> None:
        self._step(grads, [])

    def backward_forward(self, grads: dict[int, torch.Tensor], ids: list[int]) -> dict[int, Activations]:
        return self._step(grads, ids)

    def _step(self, grads: dict[int, torch.Tensor], ids: list[int]) -> dict[int, Activations]:
        work: dict[int, tuple[dict[int, torch.Tensor], list[int]]] = {}
        for cid, g in grads.items():
            if cid not in self.lost:
                work.setdefault(self._partition_of(cid), ({}, []))[0][cid] = g
        for cid in ids:
            if cid not in self.lost:
                work.setdefault(self._partition_of(cid), ({}, []))[1].append(cid)
        requests: dict[int, tuple[str, RecordDict]] = {}
        for part, (g, fwd) in work.items():
            content = RecordDict({"cfg": self._cfg_record(fwd=fwd)})
            if g:
                rec = ArrayRecord()
                for cid, t in g.items():
                    rec[str(cid)] = tensor_to_array(t)
                self.bytes["down"] += record_bytes(rec)
                content["grad"] = rec
            requests[part] = ("train.step", content)
        replies, failures = self._exchange(requests)
        self._lose(failures, "train.step", {p: sorted({*w[0], *w[1]}) for p, w in work.items()})
        out: dict[int, Activations] = {}
        for part, content in replies.items():
            act = content.array_records.get("act", ArrayRecord())
            self.bytes["up"] += record_bytes(act)
            got, bad = decode_activations(act, work[part][1], self.spec)
            out.update(got)
            for cid, why in bad.items():
                log.warning("flower: rejected the activations of client %d from node %d (partition %d): %s; "
                            "the client is dropped for this step", cid, self.node_of.get(part, -1), part, why)
        return {cid: out[cid] for cid in ids if cid in out}

    def _ordered(self, sd: StateDict) -> StateDict:
        return {k: sd[k] for k in self._front_keys}

    def fronts(self, ids: list[int]) -> dict[int, tuple[StateDict, StateDict]]:
        by_part: dict[int, list[int]] = {}
        for cid in ids:
            if cid not in self.lost:
                by_part.setdefault(self._partition_of(cid), []).append(cid)
        requests = {p: ("query.fronts", RecordDict({"cfg": self._cfg_record(ids=c)})) for p, c in by_part.items()}
        replies, failures = self._exchange(requests)
        self._lose(failures, "query.fronts", by_part)
        out: dict[int, tuple[StateDict, StateDict]] = {}
        for part, content in replies.items():
            recs = content.array_records
            for cid in by_part[part]:
                o, m = recs[f"o.{cid}"], recs[f"m.{cid}"]
                self.bytes["sync"] += record_bytes(o) + record_bytes(m)
                out[cid] = (self._ordered(record_to_state_dict(o)), self._ordered(record_to_state_dict(m)))
        return {cid: out[cid] for cid in ids if cid in out}

    def load_global(self, online: StateDict, momentum: StateDict | None) -> None:
        online_rec = state_dict_to_record(online)
        momentum_rec = state_dict_to_record(momentum) if momentum is not None else None
        requests: dict[int, tuple[str, RecordDict]] = {}
        for part in range(self.num_nodes):
            if not self._clients_of(part):
                continue
            content = RecordDict({"cfg": self._cfg_record(), "online": online_rec})
            size = record_bytes(online_rec)
            if momentum_rec is not None:
                content["momentum"] = momentum_rec
                size += record_bytes(momentum_rec)
            self.bytes["sync"] += size
            requests[part] = ("train.sync", content)
        replies, failures = self._exchange(requests)
        live = set(self.live)
        self._lose(failures, "train.sync", {p: [c for c in self._clients_of(p) if c in live] for p in failures})

    def state_dict(self) -> dict:
        """All clients' state in :meth:`ClientGroup.state_dict`'s format (merged over the nodes)."""
        parts = [p for p in range(self.num_nodes) if self._clients_of(p)]
        requests = {p: ("query.state", RecordDict({"cfg": self._cfg_record()})) for p in parts}
        replies, failures = self._exchange(requests)
        merged: dict[str, Any] = {"epoch": self.epoch, "live": list(self.live), "records": {}, "streams": {}}
        for part in parts:
            if part in replies:
                content = replies[part]
                st = records_to_tree(content.array_records["state"], content.config_records["state.tree"])
                self._last_state[part] = st
            elif part in self._last_state:
                log.warning("flower: node of partition %d did not report its state (%s); the checkpoint keeps its "
                            "clients' state from the previous checkpoint", part, failures[part])
                st = self._last_state[part]
            else:
                raise NodeFailure(f"flower: cannot checkpoint, the node of partition {part} never reported its state: {failures[part]}")
            if "global_online" not in merged:
                merged["global_online"] = st["global_online"]
                merged["global_momentum"] = st["global_momentum"]
            merged["records"].update(st["records"])
            merged["streams"].update(st["streams"])
        merged["records"] = dict(sorted(merged["records"].items(), key=lambda kv: int(kv[0])))
        merged["streams"] = dict(sorted(merged["streams"].items(), key=lambda kv: int(kv[0])))
        return merged

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.live = [int(c) for c in state["live"]]
        requests: dict[int, tuple[str, RecordDict]] = {}
        for part in range(self.num_nodes):
            mine = {str(c) for c in self._clients_of(part)}
            if not mine:
                continue
            sub = {
                "epoch": state["epoch"],
                "live": [c for c in state["live"] if str(c) in mine],
                "global_online": state["global_online"],
                "global_momentum": state["global_momentum"],
                "records": {k: v for k, v in state["records"].items() if str(k) in mine},
                "streams": {k: v for k, v in state["streams"].items() if str(k) in mine},
            }
            arrays, tree = tree_to_records(sub)
            requests[part] = ("train.load", RecordDict({"cfg": self._cfg_record(), "state": arrays, "state.tree": tree}))
        _, failures = self._exchange(requests)
        if failures:
            raise NodeFailure(f"flower: nodes failed to load the checkpoint: {failures}")


    # ------------------------------------------------------------------ diagnostics
    def probe(self, nbytes: int, *, seed: int = 0) -> dict[str, Any]:
        """Round-trip ``nbytes`` random bytes (one Array) through every node; checks they come back intact."""
        payload = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
        rec = ArrayRecord()
        rec["payload"] = Array(payload)
        sent = record_bytes(rec)
        requests = {p: ("query.echo", RecordDict({"cfg": self._cfg_record(), "payload": rec})) for p in range(self.num_nodes)}
        t0 = time.perf_counter()
        replies, failures = self._exchange(requests)
        seconds = time.perf_counter() - t0
        ok = {p: bool(np.array_equal(c.array_records["echo"]["payload"].numpy(), payload)) for p, c in replies.items()}
        return {"bytes_each_way": sent, "nodes": self.num_nodes, "seconds": seconds, "intact": ok, "failures": failures}


__all__ = ["FlowerRuntime", "NodeFailure"]
