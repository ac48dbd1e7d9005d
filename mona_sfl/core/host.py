"""The client host: any number of clients in one place, and the one step every runtime runs.

A :class:`ClientHost` is what lives in the driver (``runtime=local``), in a Ray actor and in a
Flower SuperNode's ClientApp. It owns its clients' data streams and, for clients that are
not taking part in the current epoch, only the state that differs from the last synced
global fronts: after a sync, clients are identical, so 1,000 idle clients cost nothing but
their optimizer state (where they ever stepped) and, under MocoSFL, their personal momentum
fronts. The clients sampled for an epoch are live :class:`~mona_sfl.core.client.ClientWorker`\\ s.

One step of a host (:meth:`ClientHost.step`): the backward of step t for the clients the
server sent gradients to, then the forward of step t+1 for the clients asked for. A host
that keeps the live graphs (local, Ray) backpropagates through them; a host rebuilt from
its state for every message (Flower) recomputes the forward from the same two views, which
its stream regenerates from the draw index recorded at the forward (``pending``).

This module imports neither ray nor flwr.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from mona_sfl.core.batched import CLIENT_BATCHING, BatchedClients
from mona_sfl.core.client import Activations, ClientHParams, ClientWorker
from mona_sfl.core.precision import PRECISIONS
from mona_sfl.core.sync import GlobalFronts, StateDict
from mona_sfl.data.stream import batches


@dataclass
class ClientRecord:
    """Compact state of an inactive client: only what differs from the host's globals."""

    online: StateDict | None = None  # None: equals the global online front
    momentum: StateDict | None = None  # None: equals the global momentum front
    optimizer: dict | None = None  # None: never stepped
    steps: int = 0


def _clone_sd(sd: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in sd.items()}


@dataclass
class ClientHost:
    """Any number of clients sharing one template front.

    ``streams[cid]`` yields (x1, x2) view batches (``next()``, ``batch(d)``, ``draws``);
    ``global_online`` / ``global_momentum`` are the fronts every client had after the last
    sync (the initial weights before any).
    """

    template: nn.Module
    hp: ClientHParams
    streams: dict[int, object]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    global_online: StateDict = field(init=False)
    global_momentum: StateDict = field(init=False)
    records: dict[int, ClientRecord] = field(default_factory=dict)
    live: dict[int, ClientWorker] = field(default_factory=dict)
    epoch: int = 0
    aligned: bool = False  # the last sync handed out a merged momentum front (MonAcoSFL)
    # draw index of each live client's last forward whose backward is still due
    pending: dict[int, int] = field(default_factory=dict)
    # hp.batching = "on": the live clients' forwards and backwards as one batched pass
    batched: BatchedClients | None = field(init=False, default=None)
    # (online, momentum) modules of the clients retired at the last epoch end, reused by the
    # next epoch's clients instead of deep-copying the template (at most as many as were live)
    spare: list[tuple[nn.Module, nn.Module]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.template = self.template.to(self.device)
        CLIENT_BATCHING.check(self.hp.batching)
        PRECISIONS.check(self.hp.precision)
        if self.hp.batching == "on":
            self.batched = BatchedClients(self.template)
        self.global_online = _clone_sd(self.template.state_dict())
        self.global_momentum = _clone_sd(self.template.state_dict())

    @property
    def client_ids(self) -> list[int]:
        return sorted(self.streams)

    # ---------------------------------------------------------------- epochs
    def _materialise(self, cid: int) -> ClientWorker:
        rec = self.records.get(cid, ClientRecord())
        online, momentum = self._modules()
        online.load_state_dict(rec.online if rec.online is not None else self.global_online)
        momentum.load_state_dict(rec.momentum if rec.momentum is not None else self.global_momentum)
        w = ClientWorker(cid, online, momentum, self.hp)
        if rec.optimizer is not None:
            w.optimizer.load_state_dict(rec.optimizer)
        w.steps = rec.steps
        w.online_synced = rec.online is None
        w.momentum_synced = rec.momentum is None
        w.set_epoch_lr(self.epoch)
        return w

    def _modules(self) -> tuple[nn.Module, nn.Module]:
        """Two modules shaped as the template, in its mode and with its requires_grad flags: a
        retired client's pair (every value is then loaded) or two deep copies."""
        if not self.spare:
            return copy.deepcopy(self.template), copy.deepcopy(self.template)
        pair = self.spare.pop()
        for m in pair:
            m.train(self.template.training)
            for p, tp in zip(m.parameters(), self.template.parameters()):
                p.requires_grad_(tp.requires_grad)
        return pair

    def _retire(self) -> None:
        """Clear the live clients, keeping their modules (gradients freed) for the next ones."""
        for w in self.live.values():
            w.drop_graph()
            for p in w.online.parameters():
                p.grad = None
            self.spare.append((w.online, w.momentum))
        self.live.clear()

    def _compact(self, w: ClientWorker) -> ClientRecord:
        return ClientRecord(
            online=None if w.online_synced else _clone_sd(w.online.state_dict()),
            momentum=None if w.momentum_synced else _clone_sd(w.momentum.state_dict()),
            optimizer=copy.deepcopy(w.optimizer.state_dict()) if w.optimizer.state else None,
            steps=w.steps,
        )

    def begin_epoch(self, epoch: int, ids: list[int]) -> None:
        """Make the sampled clients live for this epoch (others stay compact)."""
        self.end_epoch()
        self.epoch = epoch
        for cid in ids:
            if cid not in self.streams:
                raise KeyError(f"client {cid} is not in this host")
            self.live[cid] = self._materialise(cid)

    def end_epoch(self) -> None:
        for cid, w in self.live.items():
            rec = self._compact(w)
            if rec.online is None and rec.momentum is None and rec.optimizer is None and rec.steps == 0:
                self.records.pop(cid, None)
            else:
                self.records[cid] = rec
        self._retire()
        self.pending.clear()
        if self.batched is not None:
            self.batched.clear()

    def follow(self, epoch: int, live: list[int]) -> None:
        """Follow the server's epoch boundaries (a host rebuilt per message hears of them late):
        ``live`` are this host's clients sampled in ``epoch``."""
        live = [c for c in live if c in self.streams]
        if self.epoch != epoch or sorted(self.live) != sorted(live):
            self.begin_epoch(epoch, live)

    # ---------------------------------------------------------------- one step
    def step(self, grads: dict[int, torch.Tensor], forward: list[int]) -> dict[int, Activations]:
        """Backward of step t for ``grads`` (client id -> dL/da_q), then the forward of step t+1
        for the clients in ``forward``; returns their activations."""
        if self.batched is not None:
            return self._batched_step(self.batched, grads, forward)
        for cid, g in grads.items():
            w = self.live[cid]
            views = None if w.has_graph else self._views(cid)
            w.backward(g.to(self.device), recompute=views)
            self.pending.pop(cid, None)
        out: dict[int, Activations] = {}
        for cid in forward:
            stream = self.streams[cid]
            self.pending[cid] = int(stream.draws)  # type: ignore[attr-defined]
            x1, x2 = stream.next()  # type: ignore[attr-defined]
            out[cid] = self.live[cid].forward(x1.to(self.device, non_blocking=True), x2.to(self.device, non_blocking=True))
        return out

    def _batched_step(self, batched: BatchedClients, grads: dict[int, torch.Tensor], forward: list[int]) -> dict[int, Activations]:
        """:meth:`step` as one batched pass (``train.client_batching = "on"``)."""
        ids = list(grads)
        lost = [cid for cid in ids if cid not in batched.graphs]
        recompute = dict(zip(lost, self._draw_views(lost, self._pending_draws(lost))))
        batched.backward([self.live[cid] for cid in ids], [grads[cid].to(self.device) for cid in ids], recompute)
        for cid in ids:
            self.pending.pop(cid, None)
        draws = [int(self.streams[cid].draws) for cid in forward]  # type: ignore[attr-defined]
        views = self._draw_views(forward, draws)
        for cid, d in zip(forward, draws):
            self.pending[cid] = d
            self.streams[cid].draws = d + 1  # type: ignore[attr-defined]
        acts = batched.forward([self.live[cid] for cid in forward], views)
        return dict(zip(forward, acts))

    def _draw_views(self, ids: list[int], draws: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Draw ``draws[k]`` of client ``ids[k]``'s stream for every k, augmented in one batched
        pass (:func:`mona_sfl.data.stream.batches`), on this host's device."""
        views = batches([self.streams[cid] for cid in ids], draws)
        return [(x1.to(self.device, non_blocking=True), x2.to(self.device, non_blocking=True)) for x1, x2 in views]

    def _views(self, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views of the client's last forward, regenerated from its stream."""
        return self._draw_views([cid], self._pending_draws([cid]))[0]

    def _pending_draws(self, ids: list[int]) -> list[int]:
        """The draw index of each client's last forward (for regenerating its views)."""
        for cid in ids:
            if cid not in self.pending:
                raise RuntimeError(f"client {cid}: gradient for a step whose forward this host has no record of")
        return [self.pending[cid] for cid in ids]

    def forward(self, ids: list[int]) -> dict[int, Activations]:
        return self.step({}, ids)

    def backward(self, grads: dict[int, torch.Tensor]) -> None:
        self.step(grads, [])

    def drop(self, cid: int) -> None:
        """Forget a lost client's pending graph (the client stays in the host)."""
        if cid in self.live:
            self.live[cid].drop_graph()
        if self.batched is not None:
            self.batched.drop(cid)
        self.pending.pop(cid, None)

    # ---------------------------------------------------------------- sync
    def fronts(self, ids: list[int]) -> dict[int, tuple[StateDict, StateDict]]:
        """(online, momentum) state dicts of this host's live clients among ``ids`` (references, not copies)."""
        return {cid: (self.live[cid].online.state_dict(), self.live[cid].momentum.state_dict()) for cid in ids if cid in self.live}

    def load(self, fronts: GlobalFronts) -> None:
        """Load what a sync hands out into every client: the merged online front, and under
        MonAcoSFL (``fronts.aligned``) the merged momentum front too."""
        self.global_online = _clone_sd(fronts.online)
        for w in self.live.values():
            w.online.load_state_dict(fronts.online)
            w.online_synced = True
        for rec in self.records.values():
            rec.online = None
        self.aligned = fronts.aligned
        if fronts.momentum is not None:
            self.global_momentum = _clone_sd(fronts.momentum)
            for w in self.live.values():
                w.momentum.load_state_dict(fronts.momentum)
                w.momentum_synced = True
            for rec in self.records.values():
                rec.momentum = None
        for cid in [c for c, r in self.records.items() if r.momentum is None and r.optimizer is None and r.steps == 0]:
            del self.records[cid]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """All client state (live clients compacted, not deactivated), stream positions, pending draws."""
        recs = {cid: self._compact(w) for cid, w in self.live.items()}
        all_recs = {**self.records, **recs}
        return {
            "epoch": self.epoch,
            "live": list(self.live),
            "global_online": self.global_online,
            "global_momentum": self.global_momentum,
            "aligned": self.aligned,
            "records": {
                str(cid): {"online": r.online, "momentum": r.momentum, "optimizer": r.optimizer, "steps": r.steps}
                for cid, r in sorted(all_recs.items())
            },
            "streams": {str(cid): s.state_dict() for cid, s in sorted(self.streams.items())},  # type: ignore[attr-defined]
            "pending": {str(cid): d for cid, d in sorted(self.pending.items())},
        }

    def load_state_dict(self, state: dict) -> None:
        self._retire()
        if self.batched is not None:
            self.batched.clear()
        self.global_online = _clone_sd(state["global_online"])
        self.global_momentum = _clone_sd(state["global_momentum"])
        self.aligned = bool(state.get("aligned", False))
        self.records = {
            int(cid): ClientRecord(online=r["online"], momentum=r["momentum"], optimizer=r["optimizer"], steps=int(r["steps"]))
            for cid, r in state["records"].items()
            if int(cid) in self.streams
        }
        for cid, s in state["streams"].items():
            if int(cid) in self.streams:
                self.streams[int(cid)].load_state_dict(s)  # type: ignore[attr-defined]
        self.epoch = int(state["epoch"])
        for cid in state["live"]:
            if int(cid) in self.streams:
                self.live[int(cid)] = self._materialise(int(cid))
        self.pending = {int(c): int(d) for c, d in state.get("pending", {}).items() if int(c) in self.live}

    @staticmethod
    def last_sync(state: dict) -> GlobalFronts:
        """What the last sync handed out, from a host state (the initial fronts before any sync)."""
        return GlobalFronts(state["global_online"], state["global_momentum"] if state.get("aligned") else None)

    def memory_bytes(self) -> int:
        """Bytes held in tensors by this host (globals, records, live workers)."""
        seen: set[int] = set()

        def size(obj: object) -> int:
            if isinstance(obj, torch.Tensor):
                key = obj.untyped_storage().data_ptr()
                if key in seen:
                    return 0
                seen.add(key)
                return obj.untyped_storage().nbytes()
            if isinstance(obj, dict):
                return sum(size(v) for v in obj.values())
            if isinstance(obj, (list, tuple)):
                return sum(size(v) for v in obj)
            return 0

        total = size(self.global_online) + size(self.global_momentum)
        for r in self.records.values():
            total += size(r.online) + size(r.momentum) + size(r.optimizer)
        for w in self.live.values():
            total += size(w.online.state_dict()) + size(w.momentum.state_dict()) + size(w.optimizer.state_dict())
        for online, momentum in self.spare:
            total += size(online.state_dict()) + size(momentum.state_dict())
        return total


__all__ = ["ClientHost", "ClientRecord"]
