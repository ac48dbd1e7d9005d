"""The sharded client runtime: the clients spread over hosts, each a :class:`ClientHost`.

Every runtime is this class over a :class:`Transport`. The runtime owns everything that is
the same whatever carries the bytes:

* **the host map**: client ``c`` lives on host ``c % num_hosts`` for the whole run;
* **scatter and gather**: one request per host that holds clients of a call, all at once;
* **lost clients**: a host that fails a call (an error, a crash, no answer in time) is
  dropped, and its clients with it, for the rest of the epoch (``lost``); at the next epoch
  it is brought back (:meth:`Transport.revive`) with its clients' state from the last
  snapshot (the last checkpoint, or the start), with the syncs since then replayed onto it.
  Progress those clients made after the snapshot is lost;
* **state**: the per-host states merged into one (what a single in-process host would
  save: the checkpoint does not depend on the runtime), split again on resume;
* **the byte ledger**, with one meaning in every runtime: the payload bytes (numel x
  itemsize) the protocol moves, counted per participating client: ``up`` the activations
  ``a_q`` and ``a_k`` the server received, ``down`` the gradients sent, ``sync`` the fronts
  uploaded for a sync (online and momentum: the engine needs the momentum fronts for the
  divergence metrics under MocoSFL too), the merged fronts downloaded by every participating
  client, and the catch-up downloads of sampled clients that missed syncs
  (:class:`~mona_sfl.core.schedule.SyncLedger`). :mod:`mona_sfl.comms` computes the same
  figures analytically. A transport may count its own wire bytes beside it.

The engine's calls read as the algorithm: ``forward``, (server step), ``backward``, sync.
The backward is deferred and travels with the next request to the same hosts, so a step
costs one round trip (the gradients of step t and the request for step t+1's activations)
however the engine phrases it.

This module computes no loss and imports neither ray nor flwr.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from typing import Any

import torch

from mona_sfl import build
from mona_sfl.config import Config
from mona_sfl.core.client import Activations
from mona_sfl.core.host import ClientHost
from mona_sfl.core.schedule import SyncLedger
from mona_sfl.core.sync import GlobalFronts, StateDict, state_bytes
from mona_sfl.runtime import AllClientsLost

log = logging.getLogger("mona_sfl.runtime")

#: The requests a host serves (see :func:`serve`).
OPS = ("begin_epoch", "step", "fronts", "load", "end_epoch", "state", "load_state")


def serve(host: ClientHost, op: str, args: Any) -> Any:
    """Run one request on a host: what a Ray actor and a Flower ClientApp do with a message."""
    if op == "step":
        grads, forward = args
        return {c: (a.a_q, a.a_k) for c, a in host.step(grads, forward).items()}
    if op == "fronts":
        return host.fronts(args)
    if op == "load":
        host.load(args)
        return None
    if op == "begin_epoch":
        host.begin_epoch(*args)
        return None
    if op == "end_epoch":
        host.end_epoch()
        return None
    if op == "state":
        return host.state_dict()
    if op == "load_state":
        host.load_state_dict(args)
        return None
    raise ValueError(f"unknown host request {op!r}: expected one of {', '.join(OPS)}")


def split_state(state: dict[str, Any], clients: list[int]) -> dict[str, Any]:
    """The part of a merged client state that concerns ``clients``."""
    mine = {str(c) for c in clients}
    return {
        "epoch": state["epoch"],
        "live": [c for c in state["live"] if str(c) in mine],
        "global_online": state["global_online"],
        "global_momentum": state["global_momentum"],
        "records": {k: v for k, v in state["records"].items() if str(k) in mine},
        "streams": {k: v for k, v in state["streams"].items() if str(k) in mine},
        "pending": {k: v for k, v in state.get("pending", {}).items() if str(k) in mine},
    }


class Transport(ABC):
    """How a request reaches a host and comes back: in-process, a Ray actor, a Flower node.

    ``call`` sends one request to each host named in ``args`` (all at once) and returns the
    results by host and, for the hosts that failed, why (an error, no answer within the
    transport's timeout). A failed host gets no further request until :meth:`revive`.
    """

    kind = "host"  # what the log calls a host

    def describe(self, host: int) -> str:
        return f"{self.kind} {host}"

    @abstractmethod
    def start(self, hosts: list[list[int]]) -> None:
        """Create or find one host per entry of ``hosts`` (the clients it holds), ready for requests."""

    @abstractmethod
    def call(self, op: str, args: dict[int, Any], what: str) -> tuple[dict[int, Any], dict[int, str]]:
        """Request ``op`` with ``args[host]`` on every host in ``args``; (results, failure reasons) by host."""

    def discard(self, host: int) -> None:
        """A host failed: stop it if that is possible (best effort)."""

    @abstractmethod
    def revive(self, host: int, state: dict[str, Any]) -> str:
        """Bring a failed host back holding ``state``; returns where it runs (for the log). Raises
        ``HostUnavailable`` when it cannot come back yet."""

    def close(self) -> None:
        """Release processes and resources; safe to call twice."""


class HostUnavailable(RuntimeError):
    """A failed host cannot be brought back now (it stays dropped)."""


class _StoredStream:
    """Stands in for a client's data stream in a shadow host: it only keeps the stream's state."""

    def __init__(self) -> None:
        self.state: Any = None

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def _nbytes(t: torch.Tensor) -> int:
    return int(t.numel()) * t.element_size()


class ShardedRuntime:
    """The engine's clients, spread over ``transport``'s hosts (see the module docstring)."""

    name = "sharded"

    def __init__(self, cfg: Config, transport: Transport, num_hosts: int) -> None:
        self.cfg = cfg
        self.transport = transport
        n = max(1, min(int(num_hosts), cfg.fed.num_clients))
        self.hosts: list[list[int]] = [[c for c in range(cfg.fed.num_clients) if c % n == i] for i in range(n)]
        self.host_of: dict[int, int] = {c: i for i, ids in enumerate(self.hosts) for c in ids}
        self.bytes = {"up": 0, "down": 0, "sync": 0}
        self.lost: set[int] = set()  # clients dropped after a fault, for the rest of the epoch
        self.dead: set[int] = set()  # hosts that failed, until revived
        self.ledger = SyncLedger(cfg.fed.num_clients)
        self._pending: dict[int, torch.Tensor] = {}  # the engine's backward, sent with the next request
        self._epoch = 0
        self._pool: list[int] = []
        self._in_epoch = False
        self._global: GlobalFronts | None = None  # the last sync's fronts (replayed onto revived hosts)
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_syncs = 0
        self._template: torch.nn.Module | None = None
        self._closed = False
        try:
            self.transport.start(self.hosts)
            parts, failures = self.transport.call("state", {i: None for i in range(n)}, "start")
            if failures:
                raise RuntimeError(f"client hosts failed to start: {failures}")
            self._set_snapshot(self._merge(parts))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ hosts
    @property
    def num_hosts(self) -> int:
        return len(self.hosts)

    def _by_host(self, ids: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for c in ids:
            h = self.host_of[c]
            if c not in self.lost and h not in self.dead:
                out.setdefault(h, []).append(c)
        return out

    def _fail(self, host: int, reason: str) -> None:
        if host in self.dead:
            return
        self.dead.add(host)
        self.transport.discard(host)
        ids = self.hosts[host]
        in_pool = [c for c in self._pool if c in set(ids)] if self._in_epoch else []
        self.lost.update(ids)
        log.warning(
            "%s %s: its clients %s are lost for the rest of epoch %d; it is restored at the next epoch from the last snapshot",
            self.transport.describe(host), reason, in_pool or ids, self._epoch,
        )

    def _call(self, op: str, args: dict[int, Any], what: str) -> dict[int, Any]:
        """One request per host; failed hosts are dropped (``_fail``), the others' results returned."""
        args = {h: a for h, a in args.items() if h not in self.dead}
        if not args:
            return {}
        results, failures = self.transport.call(op, args, what)
        for h, reason in sorted(failures.items()):
            self._fail(h, reason)
        return results

    def _revive(self) -> None:
        for h in sorted(self.dead):
            try:
                where = self.transport.revive(h, self._shadow_state(h))
            except HostUnavailable as e:
                log.warning("%s stays dropped: %s", self.transport.describe(h), e)
                continue
            self.dead.discard(h)
            log.warning("%s recreated%s; clients %s restored from the last snapshot", self.transport.describe(h), where, self.hosts[h])

    # ------------------------------------------------------------------ the engine's calls
    def begin_epoch(self, epoch: int, pool: list[int]) -> None:
        self.flush()
        self.lost.clear()
        self._revive()
        self._epoch, self._pool, self._in_epoch = epoch, list(pool), True
        if self._global is not None:  # clients that missed syncs fetch the latest fronts now
            self.bytes["sync"] += len(self.ledger.stale(pool)) * self._global.nbytes()
        self.ledger.mark(pool)
        mine = self._by_host(pool)
        self._call("begin_epoch", {h: (epoch, mine.get(h, [])) for h in range(self.num_hosts)}, "begin_epoch")

    def forward(self, ids: list[int]) -> dict[int, Activations]:
        """Step t+1's activations of ``ids`` (with step t's deferred backward in the same request)."""
        return self._step(ids)

    def backward(self, grads: dict[int, torch.Tensor]) -> None:
        """The server's gradients of this step; they travel with the next request."""
        self._pending.update(grads)

    def flush(self) -> None:
        """Send the deferred backward now (the engine does before timing a sync)."""
        if self._pending:
            self._step([])

    def _step(self, ids: list[int]) -> dict[int, Activations]:
        grads, self._pending = self._pending, {}
        g_by: dict[int, dict[int, torch.Tensor]] = {}
        for c, g in grads.items():
            h = self.host_of[c]
            if c not in self.lost and h not in self.dead:
                g_by.setdefault(h, {})[c] = g
        f_by = self._by_host(ids)
        what = "backward_forward" if grads and ids else ("backward" if grads else "forward")
        args = {h: (g_by.get(h, {}), f_by.get(h, [])) for h in sorted(set(g_by) | set(f_by))}
        for h, (g, _) in args.items():
            self.bytes["down"] += sum(_nbytes(t) for t in g.values())
        res = self._call("step", args, what)
        out: dict[int, Activations] = {}
        for r in res.values():
            for c, (q, k) in r.items():
                self.bytes["up"] += _nbytes(q) + _nbytes(k)
                out[c] = Activations(c, q, k)
        return {c: out[c] for c in ids if c in out}

    def fronts(self, ids: list[int]) -> dict[int, tuple[StateDict, StateDict]]:
        """(online, momentum) fronts of the live clients among ``ids``, for a sync."""
        self.flush()
        by = self._by_host(ids)
        res = self._call("fronts", by, "fronts")
        got: dict[int, tuple[StateDict, StateDict]] = {}
        for r in res.values():
            for c, (o, m) in r.items():
                self.bytes["sync"] += state_bytes(o) + state_bytes(m)
                got[c] = (o, m)
        if ids and not got:
            raise AllClientsLost(f"every client was lost while gathering fronts for a sync in epoch {self._epoch}")
        return {c: got[c] for c in ids if c in got}

    def load(self, fronts: GlobalFronts) -> None:
        """Hand a sync's fronts to every client."""
        self.flush()
        self._global = fronts
        self._call("load", {h: fronts for h in range(self.num_hosts)}, "load")
        took_part = [c for c in self._pool if c not in self.lost] if self._in_epoch else []
        self.ledger.synced(took_part)
        self.bytes["sync"] += len(took_part) * fronts.nbytes()

    def end_epoch(self) -> None:
        self.flush()
        self._call("end_epoch", {h: None for h in range(self.num_hosts)}, "end_epoch")
        self._in_epoch = False

    # ------------------------------------------------------------------ state
    def _set_snapshot(self, state: dict[str, Any]) -> None:
        self._snapshot = state
        self._snapshot_syncs = self.ledger.syncs

    def _shadow_state(self, host: int) -> dict[str, Any]:
        """A failed host's state: its part of the last snapshot, plus the syncs since."""
        if self._template is None:
            self._template, _ = build.build_models(self.cfg)
        assert self._snapshot is not None  # set at start
        shadow = ClientHost(copy.deepcopy(self._template), build.client_hparams(self.cfg), {c: _StoredStream() for c in self.hosts[host]})
        shadow.load_state_dict(split_state(self._snapshot, self.hosts[host]))
        if self.ledger.syncs > self._snapshot_syncs and self._global is not None:
            shadow.load(self._global)
        state = shadow.state_dict()
        if self._in_epoch:  # they were sampled: resume continues the epoch with them
            state["live"] = [c for c in self._pool if c in set(self.hosts[host])]
        return state

    def _merge(self, parts: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """One ClientHost-format state for all clients (what a single in-process host would save)."""
        records: dict[str, Any] = {}
        streams: dict[str, Any] = {}
        pending: dict[str, Any] = {}
        for p in parts.values():
            records.update(p["records"])
            streams.update(p["streams"])
            pending.update(p.get("pending", {}))
        first = parts[min(parts)]
        return {
            "epoch": self._epoch,
            "live": list(self._pool) if self._in_epoch else [],
            "global_online": first["global_online"],
            "global_momentum": first["global_momentum"],
            "aligned": first.get("aligned", False),
            "records": {k: records[k] for k in sorted(records, key=int)},
            "streams": {k: streams[k] for k in sorted(streams, key=int)},
            "pending": {k: pending[k] for k in sorted(pending, key=int)},
            "ledger": self.ledger.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Every client's state, merged over the hosts (a failed host's from the snapshot)."""
        self.flush()
        res = self._call("state", {h: None for h in range(self.num_hosts)}, "state_dict")
        parts: dict[int, dict[str, Any]] = {}
        for h in range(self.num_hosts):
            if h in res:
                parts[h] = res[h]
            else:
                log.warning(
                    "%s did not report its state: the checkpoint keeps its clients' state from the previous checkpoint "
                    "(with the syncs since replayed)", self.transport.describe(h),
                )
                parts[h] = self._shadow_state(h)
        state = self._merge(parts)
        self._set_snapshot(state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = {}
        self.ledger.load_state_dict(state.get("ledger", {}))
        self._global = ClientHost.last_sync(state)
        self._epoch = int(state["epoch"])
        self._pool = [int(c) for c in state["live"]]
        self._in_epoch = bool(self._pool)
        self._set_snapshot(state)
        self._call("load_state", {h: split_state(state, ids) for h, ids in enumerate(self.hosts)}, "load_state_dict")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.transport.close()


__all__ = ["HostUnavailable", "OPS", "ShardedRuntime", "Transport", "serve", "split_state"]
