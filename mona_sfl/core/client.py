"""Client side of split MoCo: the live worker of one client and a compact store of many.

A :class:`ClientWorker` holds one client's online front, momentum (EMA) front and SGD
optimizer while the client takes part in an epoch. A :class:`ClientGroup` owns any number
of clients: their data streams and, for clients that are not active, only the state that
differs from the last synchronised global fronts. After a sync, clients are identical, so
1,000 idle clients cost nothing but their optimizer state (where they ever stepped) and,
under MocoSFL, their personal momentum fronts.

Runtimes (in-process, Ray actors, Flower ClientApps) call these same methods; this module
imports neither ray nor flwr.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mona_sfl.core.moco import ema_update

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientHParams:
    """Everything a client needs to know about the optimisation."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    m: float = 0.99  # EMA coefficient of the momentum front
    symmetric: str = "client"  # client | original | none
    schedule: str = "epoch"  # epoch | reference
    epochs: int = 200  # cosine period (T_max)


def cosine_lr(base: float, t: float, t_max: int) -> float:
    """CosineAnnealingLR's closed form: base * (1 + cos(pi * t / t_max)) / 2."""
    return base * (1.0 + math.cos(math.pi * t / t_max)) / 2.0


@dataclass
class Activations:
    """What one client sends up for one step.

    Shape:
        a_q: (b_c, C, H, W) online-front output (queries); b_c = 2b with client-side doubling.
        a_k: (b_c, C, H, W) momentum-front output (keys), no graph.
    """

    client_id: int
    a_q: torch.Tensor
    a_k: torch.Tensor


def make_inputs(x1: torch.Tensor, x2: torch.Tensor, symmetric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key inputs from two views: [x1; x2] / [x2; x1] with client-side doubling."""
    if symmetric == "client":
        return torch.cat([x1, x2]), torch.cat([x2, x1])
    return x1, x2


class ClientWorker:
    """One client's live state: online front, momentum front, optimizer, step counter."""

    def __init__(self, client_id: int, online: nn.Module, momentum: nn.Module, hp: ClientHParams) -> None:
        self.client_id = client_id
        self.online = online
        self.momentum = momentum
        for p in self.momentum.parameters():
            p.requires_grad_(False)
        self.hp = hp
        self.optimizer = torch.optim.SGD(self.online.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        self.steps = 0  # optimizer steps taken by this client (drives the reference LR schedule)
        self.online_synced = True  # online front equals the group's global online front
        self.momentum_synced = True  # momentum front equals the group's global momentum front
        self._out: torch.Tensor | None = None  # a_q with its graph, kept until backward

    def set_epoch_lr(self, epoch: int) -> None:
        if self.hp.schedule == "epoch":
            lr = cosine_lr(self.hp.lr, epoch, self.hp.epochs)
            for g in self.optimizer.param_groups:
                g["lr"] = lr

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Activations:
        """EMA update, then online forward (graph kept) and momentum forward (no graph)."""
        q_in, k_in = make_inputs(x1, x2, self.hp.symmetric)
        # The reference updates the momentum front after the online forward and before the key
        # forward; the online forward changes no parameter, so doing it first is the same.
        ema_update(self.momentum, self.online, self.hp.m)
        self.momentum_synced = False
        out = self.online(q_in)
        with torch.no_grad():
            a_k = self.momentum(k_in)
        self._out = out
        return Activations(self.client_id, out.detach(), a_k)

    def backward(self, grad: torch.Tensor, recompute: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Backpropagate the server's gradient through the online front and take an SGD step.

        ``recompute`` (the same two views as the forward) rebuilds the graph when it was not
        kept, e.g. in a stateless Flower ClientApp; the EMA is not applied again.
        """
        out = self._out
        if out is None:
            if recompute is None:
                raise RuntimeError(f"client {self.client_id}: backward without a forward (pass the views to recompute)")
            q_in, _ = make_inputs(recompute[0], recompute[1], self.hp.symmetric)
            out = self.online(q_in)
        if grad.shape != out.shape:
            raise ValueError(f"client {self.client_id}: gradient shape {tuple(grad.shape)} != activation shape {tuple(out.shape)}")
        if self.hp.schedule == "reference":
            # reference quirk: CosineAnnealingLR(T_max=epochs) stepped once per client step
            for g in self.optimizer.param_groups:
                g["lr"] = cosine_lr(self.hp.lr, self.steps, self.hp.epochs)
        self.optimizer.zero_grad(set_to_none=True)
        out.backward(grad.to(out.device, out.dtype))
        self.optimizer.step()
        self.steps += 1
        self.online_synced = False
        self._out = None

    def drop_graph(self) -> None:
        self._out = None


@dataclass
class ClientRecord:
    """Compact state of an inactive client: only what differs from the group's globals."""

    online: StateDict | None = None  # None: equals the global online front
    momentum: StateDict | None = None  # None: equals the global momentum front
    optimizer: dict | None = None  # None: never stepped
    steps: int = 0


def _clone_sd(sd: StateDict) -> StateDict:
    return {k: v.detach().clone() for k, v in sd.items()}


@dataclass
class ClientGroup:
    """Any number of clients sharing one template front.

    ``streams[cid]`` yields (x1, x2) view batches; ``global_online`` / ``global_momentum``
    are the fronts every client had after the last sync (the initial weights before any).
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

    def __post_init__(self) -> None:
        self.template = self.template.to(self.device)
        self.global_online = _clone_sd(self.template.state_dict())
        self.global_momentum = _clone_sd(self.template.state_dict())
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def client_ids(self) -> list[int]:
        return sorted(self.streams)

    # ---------------------------------------------------------------- activation
    def _materialise(self, cid: int) -> ClientWorker:
        rec = self.records.get(cid, ClientRecord())
        online = copy.deepcopy(self.template)
        momentum = copy.deepcopy(self.template)
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
                raise KeyError(f"client {cid} is not in this group")
            self.live[cid] = self._materialise(cid)

    def end_epoch(self) -> None:
        for cid, w in self.live.items():
            rec = self._compact(w)
            if rec.online is None and rec.momentum is None and rec.optimizer is None and rec.steps == 0:
                self.records.pop(cid, None)
            else:
                self.records[cid] = rec
        self.live.clear()
        self._views.clear()

    # ---------------------------------------------------------------- one step
    def forward(self, ids: list[int]) -> dict[int, Activations]:
        out: dict[int, Activations] = {}
        for cid in ids:
            x1, x2 = self.streams[cid].next()  # type: ignore[attr-defined]
            x1 = x1.to(self.device, non_blocking=True)
            x2 = x2.to(self.device, non_blocking=True)
            out[cid] = self.live[cid].forward(x1, x2)
        return out

    def backward(self, grads: dict[int, torch.Tensor]) -> None:
        for cid, g in grads.items():
            self.live[cid].backward(g)

    def drop(self, cid: int) -> None:
        """Forget a lost client's pending graph (the client stays in the group)."""
        if cid in self.live:
            self.live[cid].drop_graph()

    # ---------------------------------------------------------------- sync
    def fronts(self, ids: list[int]) -> dict[int, tuple[StateDict, StateDict]]:
        """(online, momentum) state dicts of live clients, for FedAvg (references, not copies)."""
        return {cid: (self.live[cid].online.state_dict(), self.live[cid].momentum.state_dict()) for cid in ids}

    def load_global(self, online: StateDict, momentum: StateDict | None) -> None:
        """Load the averaged online front (and, MonAcoSFL, momentum front) into every client."""
        self.global_online = _clone_sd(online)
        for w in self.live.values():
            w.online.load_state_dict(online)
            w.online_synced = True
        for rec in self.records.values():
            rec.online = None
        if momentum is not None:
            self.global_momentum = _clone_sd(momentum)
            for w in self.live.values():
                w.momentum.load_state_dict(momentum)
                w.momentum_synced = True
            for rec in self.records.values():
                rec.momentum = None
        for cid in [c for c, r in self.records.items() if r.momentum is None and r.optimizer is None and r.steps == 0]:
            del self.records[cid]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """All client state (live clients compacted, not deactivated) plus stream positions."""
        recs = {cid: self._compact(w) for cid, w in self.live.items()}
        all_recs = {**self.records, **recs}
        return {
            "epoch": self.epoch,
            "live": list(self.live),
            "global_online": self.global_online,
            "global_momentum": self.global_momentum,
            "records": {
                str(cid): {"online": r.online, "momentum": r.momentum, "optimizer": r.optimizer, "steps": r.steps}
                for cid, r in all_recs.items()
            },
            "streams": {str(cid): s.state_dict() for cid, s in self.streams.items()},  # type: ignore[attr-defined]
        }

    def load_state_dict(self, state: dict) -> None:
        self.live.clear()
        self.global_online = _clone_sd(state["global_online"])
        self.global_momentum = _clone_sd(state["global_momentum"])
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

    def memory_bytes(self) -> int:
        """Bytes held in tensors by this group (globals, records, live workers)."""
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
        return total


def sample_clients(seed: int, epoch: int, num_clients: int, k: int) -> list[int]:
    """The clients of one epoch: a pure function of (seed, epoch), so nothing to checkpoint."""
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, 0x5A3, epoch])
    return [int(i) for i in rng.choice(num_clients, size=k, replace=False)]
