"""Server side of split MoCo: deep layers + projector, their momentum copy, the key queue.

``Server.step`` takes the activations of the sampled clients, computes the InfoNCE loss,
updates the server and returns each client's gradient, routed by client id (clients may
hold different batch sizes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mona_sfl.core.client import Activations, cosine_lr
from mona_sfl.core.moco import KeyQueue, ema_update, infonce


@dataclass
class StepResult:
    loss: float
    grads: dict[int, torch.Tensor]  # client id -> d(loss)/d(a_q), shape of that client's a_q
    rows: int  # query rows the server processed


class Server:
    """The server's online and momentum deep nets, queue and SGD optimizer.

    ``symmetric`` selects how the two views are used:
      * ``client``: the clients doubled their batch ([x1; x2] queries, [x2; x1] keys); one
        InfoNCE over all rows (reference default).
      * ``original``: MocoSFL's two-term loss L(Q -> online, K -> momentum) + L(K -> online,
        Q -> momentum); the second term sends no gradient to the clients (reference
        ``--symmetric_original``).
      * ``none``: one InfoNCE, no doubling.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        K: int,
        dim: int,
        T: float,
        m: float,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        epochs: int = 200,
        symmetric: str = "client",
        device: torch.device | str = "cpu",
        queue_seed: int = 0,
    ) -> None:
        self.device = torch.device(device)
        self.online = net.to(self.device)
        self.momentum = copy.deepcopy(self.online)
        for p in self.momentum.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(queue_seed)
        self.queue = KeyQueue(dim, K, generator=g).to(self.device)
        self.T = T
        self.m = m
        self.lr = lr
        self.epochs = epochs
        self.symmetric = symmetric
        self.optimizer = torch.optim.SGD(self.online.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Cosine LR over epochs, stepped once per epoch (reference)."""
        self.epoch = epoch
        lr = cosine_lr(self.lr, epoch, self.epochs)
        for grp in self.optimizer.param_groups:
            grp["lr"] = lr

    def step(self, acts: list[Activations]) -> StepResult:
        """One server step over the activations of the participating clients, in list order."""
        if not acts:
            raise ValueError("server step needs at least one client's activations")
        sizes = [a.a_q.shape[0] for a in acts]
        Q = torch.cat([a.a_q.to(self.device) for a in acts]).requires_grad_(True)  # (n, C, H, W)
        Kp = torch.cat([a.a_k.to(self.device) for a in acts])  # (n, C, H, W)

        ema_update(self.momentum, self.online, self.m)  # server EMA first (reference)
        queue = self.queue.queue.clone()  # negatives as they were before this step's enqueue
        q = F.normalize(self.online(Q), dim=1)  # (n, dim)
        with torch.no_grad():
            k = F.normalize(self.momentum(Kp), dim=1)  # (n, dim)
        loss = infonce(q, k, queue, self.T)
        keys = k
        if self.symmetric == "original":
            q2 = F.normalize(self.online(Kp), dim=1)
            with torch.no_grad():
                k2 = F.normalize(self.momentum(Q.detach()), dim=1)
            loss = loss + infonce(q2, k2, queue, self.T)
            keys = torch.cat([k, k2])
        self.queue.enqueue(keys)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

        grad = Q.grad
        if grad is None:  # cannot happen: Q requires grad and feeds the loss
            raise RuntimeError("server step produced no activation gradient")
        grads = {a.client_id: g for a, g in zip(acts, grad.split(sizes))}
        return StepResult(loss=float(loss.detach()), grads=grads, rows=int(sum(sizes)))

    def state_dict(self) -> dict:
        return {
            "online": self.online.state_dict(),
            "momentum": self.momentum.state_dict(),
            "queue": self.queue.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: dict) -> None:
        self.online.load_state_dict(state["online"])
        self.momentum.load_state_dict(state["momentum"])
        self.queue.load_state_dict(state["queue"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.set_epoch(int(state["epoch"]))
