"""Client side of split MoCo: one client's online front, momentum (EMA) front and optimizer.

A :class:`ClientWorker` is a client while it takes part in an epoch: ``forward`` (EMA update,
online forward with its graph kept, momentum forward) and ``backward`` (the server's
gradient through the online front, then the SGD step). Many clients live in a
:class:`mona_sfl.core.host.ClientHost`. This module imports neither ray nor flwr.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mona_sfl.core.moco import ema_update
from mona_sfl.core.precision import autocast
from mona_sfl.core.schedule import client_epoch_lr, client_step_lr

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
    batching: str = "off"  # off: one client after another | on: one batched pass (mona_sfl.core.batched)
    precision: str = "fp32"  # fp32 | bf16: the fronts' forwards under bfloat16 autocast (mona_sfl.core.precision)


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
        self._set_lr(client_epoch_lr(self.hp.schedule, self.hp.lr, epoch, self.hp.epochs))

    def _set_lr(self, lr: float | None) -> None:
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Activations:
        """EMA update, then online forward (graph kept) and momentum forward (no graph)."""
        q_in, k_in = make_inputs(x1, x2, self.hp.symmetric)
        # The reference updates the momentum front after the online forward and before the key
        # forward; the online forward changes no parameter, so doing it first is the same.
        ema_update(self.momentum, self.online, self.hp.m)
        self.momentum_synced = False
        with autocast(self.hp.precision, q_in.device):
            out = self.online(q_in).to(q_in.dtype)  # the input's dtype at the cut (a no-op in fp32)
            with torch.no_grad():
                a_k = self.momentum(k_in).to(k_in.dtype)
        self._out = out
        if next(self.online.buffers(), None) is not None:
            # BatchNorm: the forward moved the running statistics, so the online front differs
            # from the global one even before its optimizer step
            self.online_synced = False
        return Activations(self.client_id, out.detach(), a_k)

    @property
    def has_graph(self) -> bool:
        """Whether the last forward's graph is still held (not for a rebuilt, stateless client)."""
        return self._out is not None

    def backward(self, grad: torch.Tensor, recompute: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Backpropagate the server's gradient through the online front and take an SGD step.

        ``recompute`` (the same two views as the forward) rebuilds the graph when it was not
        kept, e.g. in a stateless Flower ClientApp. The recomputed pass applies no EMA and
        leaves BatchNorm running statistics as the forward left them: the forward already
        counted this batch once.
        """
        out = self._out
        saved: dict[str, torch.Tensor] | None = None
        if out is None:
            if recompute is None:
                raise RuntimeError(f"client {self.client_id}: backward without a forward (pass the views to recompute)")
            q_in, _ = make_inputs(recompute[0], recompute[1], self.hp.symmetric)
            saved = {n: b.detach().clone() for n, b in self.online.named_buffers()}
            with autocast(self.hp.precision, q_in.device):
                out = self.online(q_in).to(q_in.dtype)
        if grad.shape != out.shape:
            raise ValueError(f"client {self.client_id}: gradient shape {tuple(grad.shape)} != activation shape {tuple(out.shape)}")
        # reference quirk (client_schedule = "reference"): CosineAnnealingLR(T_max=epochs) stepped once per client step
        self._set_lr(client_step_lr(self.hp.schedule, self.hp.lr, self.steps, self.hp.epochs))
        self.optimizer.zero_grad(set_to_none=True)
        out.backward(grad.to(out.device, out.dtype))
        if saved:  # restored after the backward, which reads the buffers the recompute saved
            with torch.no_grad():
                for n, b in self.online.named_buffers():
                    b.copy_(saved[n])
        self.optimizer.step()
        self.steps += 1
        self.online_synced = False
        self._out = None

    def drop_graph(self) -> None:
        self._out = None
