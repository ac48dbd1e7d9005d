"""``FlowerRuntime``: the client hosts are Flower SuperNodes, reached through a Grid.

This module is the Flower transport of the sharded runtime (:mod:`mona_sfl.runtime.sharded`,
which owns the host map, lost clients, state and the byte ledger). Each request becomes one
message per node (see ``client_app`` for the message types):

* ``step`` -> ``train.step`` (the gradients of step t and the request for step t+1's
  activations: one round trip per step);
* ``fronts`` -> ``query.fronts``; ``load`` -> ``train.sync``;
* ``state`` / ``load_state`` -> ``query.state`` / ``train.load``;
* ``begin_epoch`` / ``end_epoch`` send nothing: every message carries the epoch and the
  node's live clients, and the node follows (``ClientHost.follow``).

The node with ``partition-id`` p is host p. Node ids are random, so the transport asks every
node for its partition id first (``query.meta``).

At most one message per node is in flight: the transport waits for all replies (or
``flower.step_timeout_s``) before it sends the next. A node that answers with an error or not
in time fails (the sharded runtime drops its clients for the rest of the epoch); at the next
epoch it gets its clients' state back with ``train.load`` once it has answered its late
message. ``wire`` counts the bytes of the ArrayRecords really sent (npy headers included),
beside the runtime's protocol ledger.
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
from mona_sfl.core.sync import GlobalFronts
from mona_sfl.runtime.flower.codec import (
    decode_activations,
    record_bytes,
    record_to_state_dict,
    records_to_tree,
    state_dict_to_record,
    tensor_to_array,
    tree_to_records,
)
from mona_sfl.runtime.sharded import HostUnavailable, ShardedRuntime, Transport

log = logging.getLogger("mona_sfl.flower")

#: The message type of each host request (begin_epoch / end_epoch travel inside the next message).
MESSAGE_TYPES = {"step": "train.step", "fronts": "query.fronts", "load": "train.sync", "state": "query.state", "load_state": "train.load"}


class NodeFailure(RuntimeError):
    """A node could not serve a request the run cannot do without."""


class FlowerTransport(Transport):
    """Requests as Flower messages over a Grid; one SuperNode per host."""

    kind = "node"

    def __init__(self, cfg: Config, grid: Grid, *, poll_s: float | None = None, connect_timeout_s: float | None = None) -> None:
        self.cfg = cfg
        self.grid = grid
        # Replies are polled with exponential back-off from 1 ms up to poll_s: 10 ms on the
        # in-memory Grid of the simulation engine, 100 ms over HTTP (each poll is a request).
        in_memory = type(grid).__name__ == "InMemoryGrid"
        self.poll_s = poll_s if poll_s is not None else (0.01 if in_memory else 0.1)
        self.timeout_s = cfg.flower.step_timeout_s
        self.num_nodes = cfg.num_nodes
        self.epoch = 0
        self.live: dict[int, list[int]] = {}  # partition -> its clients sampled in the current epoch
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self.node_pid: dict[int, int] = {}  # partition id -> process id of its last reply (diagnostics)
        self.node_pids: dict[int, set[int]] = {}  # partition id -> every process id that replied (ClientApp processes)
        self._busy: dict[int, str] = {}  # node id -> id of a message it never answered in time
        self._seq = 0
        self.exchanges = 0  # round trips made
        self.wait_s = 0.0  # wall time spent waiting for replies
        self.step_starts: list[float] = []  # perf_counter when each train.step exchange began (steps per second)
        self.step_wait: list[float] = []  # per train.step exchange: seconds from the push to the last reply
        self.step_compute: list[float] = []  # per train.step exchange: the slowest node's own compute (its "compute_s")
        self._compute: dict[int, float] = {}  # partition -> compute_s of its reply in the current exchange
        self.wire = {"up": 0, "down": 0, "sync": 0}  # ArrayRecord bytes really sent, npy headers included
        front, _ = build.build_models(cfg)
        self._front_keys = list(front.state_dict())
        self.spec = build.activation_spec(cfg)  # what a client's reply may hold (checked before decoding)
        self._discover(connect_timeout_s if connect_timeout_s is not None else max(self.timeout_s, 60.0))

    def describe(self, host: int) -> str:
        return f"node {self.node_of.get(host, -1)} (partition {host})"

    def start(self, hosts: list[list[int]]) -> None:
        if len(hosts) != self.num_nodes:
            raise NodeFailure(f"flower: {len(hosts)} client hosts for {self.num_nodes} SuperNodes")
        self.hosts = hosts

    # ------------------------------------------------------------------ plumbing
    def _cfg_record(self, part: int, **extra: Any) -> ConfigRecord:
        rec: dict[str, Any] = {"nodes": self.num_nodes, "epoch": self.epoch}
        for k, v in {"live": self.live.get(part, []), **extra}.items():
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
                        self.node_pids.setdefault(part, set()).add(self.node_pid[part])
                    if meta is not None and "compute_s" in meta:
                        self._compute[part] = float(meta["compute_s"])  # type: ignore[arg-type]
            if not pending:
                break
            if time.monotonic() > deadline:
                for mid, part in pending.items():
                    failures[part] = f"no reply within {timeout_s or self.timeout_s:g} s"
                    self._busy[self.node_of[part]] = mid
                break
            time.sleep(sleep)
            sleep = min(sleep * 1.5, self.poll_s)
        waited = time.perf_counter() - t0
        self.wait_s += waited
        self.exchanges += 1
        if msgs[0].metadata.message_type == MESSAGE_TYPES["step"]:
            self.step_wait.append(waited)
            self.step_compute.append(max(self._compute.values(), default=0.0))
        self._compute = {}
        return replies, failures

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

    # ------------------------------------------------------------------ requests
    def _content(self, op: str, part: int, args: Any) -> RecordDict:
        if op == "step":
            grads, fwd = args
            content = RecordDict({"cfg": self._cfg_record(part, fwd=list(fwd))})
            if grads:
                rec = ArrayRecord()
                for cid, t in grads.items():
                    rec[str(cid)] = tensor_to_array(t)
                self.wire["down"] += record_bytes(rec)
                content["grad"] = rec
            return content
        if op == "fronts":
            return RecordDict({"cfg": self._cfg_record(part, ids=list(args))})
        if op == "load":  # the records of the merged fronts, built once per sync (``call``)
            content = RecordDict({"cfg": self._cfg_record(part), "online": self._online_rec})
            if self._momentum_rec is not None:
                content["momentum"] = self._momentum_rec
            return content
        if op == "state":
            return RecordDict({"cfg": self._cfg_record(part)})
        if op == "load_state":
            arrays, tree = tree_to_records(args)
            return RecordDict({"cfg": self._cfg_record(part), "state": arrays, "state.tree": tree})
        raise ValueError(f"flower transport: no message for request {op!r}")

    def _result(self, op: str, part: int, args: Any, content: RecordDict) -> Any:
        if op == "step":
            act = content.array_records.get("act", ArrayRecord())
            self.wire["up"] += record_bytes(act)
            got, bad = decode_activations(act, list(args[1]), self.spec)
            for cid, why in bad.items():
                log.warning("flower: rejected the activations of client %d from %s: %s; the client is dropped for this step",
                            cid, self.describe(part), why)
            return {cid: (a.a_q, a.a_k) for cid, a in got.items()}
        if op == "fronts":
            out = {}
            for cid in args:
                if f"o.{cid}" not in content.array_records:
                    continue  # not live on that node
                o, m = content.array_records[f"o.{cid}"], content.array_records[f"m.{cid}"]
                self.wire["sync"] += record_bytes(o) + record_bytes(m)
                out[cid] = (self._ordered(record_to_state_dict(o)), self._ordered(record_to_state_dict(m)))
            return out
        if op == "state":
            return records_to_tree(content.array_records["state"], content.config_records["state.tree"])
        return None

    def _ordered(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: sd[k] for k in self._front_keys}

    def call(self, op: str, args: dict[int, Any], what: str) -> tuple[dict[int, Any], dict[int, str]]:
        if op == "begin_epoch":
            for part, (epoch, ids) in args.items():
                self.epoch = int(epoch)
                self.live[part] = list(ids)
            return {part: None for part in args}, {}
        if op == "end_epoch":
            self.live = {}
            return {part: None for part in args}, {}
        if op == "load_state":  # a resume: the nodes follow the epoch and live clients of the state
            for part, st in args.items():
                self.epoch = int(st["epoch"])
                self.live[part] = [int(c) for c in st["live"]]
        if op == "load":
            fronts: GlobalFronts = next(iter(args.values()))
            self._online_rec = state_dict_to_record(fronts.online)
            self._momentum_rec = state_dict_to_record(fronts.momentum) if fronts.momentum is not None else None
            per_node = record_bytes(self._online_rec) + (record_bytes(self._momentum_rec) if self._momentum_rec is not None else 0)
            self.wire["sync"] += per_node * len(args)
        mtype = MESSAGE_TYPES[op]
        if op == "step":
            self.step_starts.append(time.perf_counter())
        requests = {part: (mtype, self._content(op, part, a)) for part, a in args.items()}
        replies, failures = self._exchange(requests)
        results = {part: self._result(op, part, args[part], content) for part, content in replies.items()}
        return results, {part: f"failed in {mtype}: {why}" for part, why in failures.items()}

    def revive(self, host: int, state: dict[str, Any]) -> str:
        """Send the node its clients' state back (``train.load``) once it is free again."""
        if not self._free(self.node_of[host]):
            raise HostUnavailable("it has still not answered an earlier message")
        _, failures = self._exchange({host: ("train.load", self._content("load_state", host, state))})
        if failures:
            raise HostUnavailable(failures[host])
        return f" (state sent back with train.load, pid {self.node_pid.get(host, -1)})"

    # ------------------------------------------------------------------ diagnostics
    def probe(self, nbytes: int, *, seed: int = 0) -> dict[str, Any]:
        """Round-trip ``nbytes`` random bytes (one Array) through every node; checks they come back intact."""
        payload = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
        rec = ArrayRecord()
        rec["payload"] = Array(payload)
        sent = record_bytes(rec)
        requests = {p: ("query.echo", RecordDict({"cfg": self._cfg_record(p), "payload": rec})) for p in range(self.num_nodes)}
        t0 = time.perf_counter()
        replies, failures = self._exchange(requests)
        seconds = time.perf_counter() - t0
        ok = {p: bool(np.array_equal(c.array_records["echo"]["payload"].numpy(), payload)) for p, c in replies.items()}
        return {"bytes_each_way": sent, "nodes": self.num_nodes, "seconds": seconds, "intact": ok, "failures": failures}




class FlowerRuntime(ShardedRuntime):
    """The sharded runtime over Flower SuperNodes (inside a ServerApp: ``grid`` is its Grid)."""

    name = "flower"

    def __init__(self, cfg: Config, grid: Grid | None = None, *, poll_s: float | None = None,
                 connect_timeout_s: float | None = None, **_unused: object) -> None:
        if grid is None:
            raise RuntimeError(
                "runtime='flower' runs inside a Flower ServerApp: start it with `mona-sfl train --set runtime=flower` "
                "(simulation), `flwr run .` or `mona-sfl deploy-local`, not by constructing FlowerRuntime(cfg) alone"
            )
        transport = FlowerTransport(cfg, grid, poll_s=poll_s, connect_timeout_s=connect_timeout_s)
        super().__init__(cfg, transport, transport.num_nodes)

    @property
    def node_of(self) -> dict[int, int]:
        return self.transport.node_of  # type: ignore[attr-defined]

    @property
    def num_nodes(self) -> int:
        return self.num_hosts

    @property
    def exchanges(self) -> int:
        return self.transport.exchanges  # type: ignore[attr-defined]

    @property
    def wait_s(self) -> float:
        return self.transport.wait_s  # type: ignore[attr-defined]

    @property
    def wire(self) -> dict[str, int]:
        return self.transport.wire  # type: ignore[attr-defined]

    def clientapp_pids(self) -> dict[int, list[int]]:
        """Per partition, the process ids of the ClientApps that replied (one per node when they stay up)."""
        return {p: sorted(v) for p, v in sorted(self.transport.node_pids.items())}  # type: ignore[attr-defined]

    def step_timing(self) -> dict[str, list[float]]:
        """Per ``train.step`` exchange: ``wait`` (push to last reply) and ``compute`` (the slowest node's own work)."""
        t = self.transport
        return {"wait": list(t.step_wait), "compute": list(t.step_compute)}  # type: ignore[attr-defined]

    def step_gaps(self) -> list[float]:
        """Seconds between consecutive ``train.step`` exchanges: one training step each (without syncs in between)."""
        t = self.transport.step_starts  # type: ignore[attr-defined]
        return [b - a for a, b in zip(t, t[1:])]

    def probe(self, nbytes: int, *, seed: int = 0) -> dict[str, Any]:
        return self.transport.probe(nbytes, seed=seed)  # type: ignore[attr-defined]


__all__ = ["FlowerRuntime", "FlowerTransport", "MESSAGE_TYPES", "NodeFailure"]
