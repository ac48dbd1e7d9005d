"""Server side of split MoCo: deep layers + projector, their momentum copy, the key queue.

``Server.step`` takes the activations of the sampled clients, computes the InfoNCE loss,
updates the server and returns each client's gradient, routed by client id (clients may
hold different batch sizes).

Client input is checked before it touches anything (:class:`ActivationSpec`): a client whose
activations have the wrong type, dtype or shape, too many rows (an oversized payload),
non-finite values, or a client id already seen in the step is dropped for that step, with a
warning naming the client and the reason. The step then runs exactly as if that client had
not taken part; if no client is left, :class:`ActivationsRejected` is raised before any state
changes.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mona_sfl.core.client import Activations
from mona_sfl.core.moco import KeyQueue, ema_update, infonce
from mona_sfl.core.precision import PRECISIONS, autocast
from mona_sfl.core.schedule import server_lr


log = logging.getLogger("mona_sfl.server")


class ActivationsRejected(RuntimeError):
    """Every client's activations in a step were refused; the server state is unchanged."""

    def __init__(self, rejected: dict[object, str]) -> None:
        self.rejected = dict(rejected)
        if not self.rejected:
            super().__init__("no client activations reached the server in this step")
            return
        why = "; ".join(f"client {cid}: {reason}" for cid, reason in self.rejected.items())
        super().__init__(f"no valid client activations in this step ({why})")


@dataclass(frozen=True)
class ActivationSpec:
    """What one client may send up in one step.

    ``shape`` is the per-row activation shape ``(C, H, W)`` at the cut, ``max_rows`` the most
    rows one client sends (its batch size, doubled under client-side symmetric doubling; the
    last batch of a data pass may be smaller), ``dtype`` the floating type the server computes
    in. ``None`` leaves that property unchecked. :meth:`max_bytes` bounds one tensor's payload.
    """

    shape: tuple[int, int, int] | None = None
    max_rows: int | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.shape is not None and (len(self.shape) != 3 or any(int(d) < 1 for d in self.shape)):
            raise ValueError(f"ActivationSpec.shape must be three positive ints (C, H, W), got {self.shape!r}")
        if self.max_rows is not None and int(self.max_rows) < 1:
            raise ValueError(f"ActivationSpec.max_rows must be >= 1, got {self.max_rows!r}")

    def max_bytes(self, itemsize: int | None = None) -> int | None:
        """Bytes of the largest legal tensor (``max_rows`` rows of ``shape``), or None when unbounded."""
        if self.shape is None or self.max_rows is None:
            return None
        if itemsize is None:
            itemsize = torch.empty(0, dtype=self.dtype or torch.float32).element_size()
        return int(self.max_rows) * math.prod(int(d) for d in self.shape) * int(itemsize)

    def check(self, a: object) -> str | None:
        """Why ``a`` (one client's :class:`Activations`) is unacceptable, or None when it is fine."""
        if not isinstance(a, Activations):
            return f"not an Activations record ({type(a).__name__})"
        if isinstance(a.client_id, bool) or not isinstance(a.client_id, int):
            return f"client id {a.client_id!r} is not an int"
        for name in ("a_q", "a_k"):
            t = getattr(a, name)
            if not isinstance(t, torch.Tensor):
                return f"{name} is a {type(t).__name__}, not a tensor"
            bound = self.max_bytes(t.element_size())
            nbytes = t.numel() * t.element_size()
            if bound is not None and nbytes > bound:
                return (f"oversized payload: {name} has {nbytes} bytes, more than the {bound} bytes of "
                        f"{self.max_rows} rows of shape {tuple(self.shape or ())}")
            if self.dtype is not None and t.dtype != self.dtype:
                return f"{name} has dtype {t.dtype}, expected {self.dtype}"
            if not t.is_floating_point():
                return f"{name} has dtype {t.dtype}, expected a floating-point type"
            if t.dim() != 4:
                return f"{name} has shape {tuple(t.shape)}, expected (rows, C, H, W)"
            if self.shape is not None and tuple(t.shape[1:]) != tuple(self.shape):
                return f"{name} has shape {tuple(t.shape)}, expected (rows, {', '.join(str(d) for d in self.shape)})"
            if t.shape[0] < 1:
                return f"{name} has no rows"
            if self.max_rows is not None and t.shape[0] > self.max_rows:
                return f"{name} has {t.shape[0]} rows, more than the {self.max_rows} a client sends"
        if a.a_q.shape != a.a_k.shape:
            return f"a_q shape {tuple(a.a_q.shape)} differs from a_k shape {tuple(a.a_k.shape)}"
        if a.a_q.dtype != a.a_k.dtype:
            return f"a_q dtype {a.a_q.dtype} differs from a_k dtype {a.a_k.dtype}"
        for name in ("a_q", "a_k"):
            if not bool(torch.isfinite(getattr(a, name)).all()):
                return f"{name} holds non-finite values (NaN or Inf)"
        return None


@dataclass
class StepResult:
    loss: float
    grads: dict[int, torch.Tensor]  # client id -> d(loss)/d(a_q), shape of that client's a_q
    rows: int  # query rows the server processed
    rejected: dict[object, str] = field(default_factory=dict)  # client id -> why its activations were refused


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
        spec: ActivationSpec | None = None,
        precision: str = "fp32",
    ) -> None:
        PRECISIONS.check(precision)
        self.precision = precision  # fp32 | bf16: the net's forwards under bfloat16 autocast (mona_sfl.core.precision)
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
        if spec is None:
            spec = ActivationSpec()
        if spec.dtype is None:  # the dtype the server computes in
            p = next(self.online.parameters(), None)
            spec = ActivationSpec(spec.shape, spec.max_rows, p.dtype if p is not None else torch.get_default_dtype())
        self.spec = spec

    def set_epoch(self, epoch: int) -> None:
        """Cosine LR over epochs, stepped once per epoch (reference)."""
        self.epoch = epoch
        lr = server_lr(self.lr, epoch, self.epochs)
        for grp in self.optimizer.param_groups:
            grp["lr"] = lr

    def validate(self, acts: list[Activations]) -> tuple[list[Activations], dict[object, str]]:
        """Split ``acts`` into the acceptable ones (in order) and the refused ones (client id -> reason).

        Reads the inputs only. Every entry of a client id that occurs more than once is refused.
        """
        ids = [a.client_id if isinstance(a, Activations) else None for a in acts]
        counts = Counter(ids)
        rejected: dict[object, str] = {}
        good: list[Activations] = []
        for i, a in enumerate(acts):
            cid = ids[i]
            key: object = cid if isinstance(cid, int) and not isinstance(cid, bool) else f"#{i} ({cid!r})"
            reason = self.spec.check(a)
            if reason is None and counts[cid] > 1:
                reason = f"client id {cid} occurs {counts[cid]} times in one step"
            if reason is None:
                good.append(a)
            else:
                rejected[key] = reason
                log.warning("server: rejected the activations of client %s: %s; the client is dropped for this step", key, reason)
        return good, rejected

    def step(self, acts: list[Activations]) -> StepResult:
        """One server step over the activations of the participating clients, in list order.

        Clients whose activations fail :meth:`validate` are left out of the step (``rejected``
        in the result); ``ActivationsRejected`` when none is left (or none was given), with the
        state untouched.
        """
        if not acts:
            raise ActivationsRejected({})
        acts, rejected = self.validate(list(acts))
        if not acts:
            raise ActivationsRejected(rejected)
        sizes = [a.a_q.shape[0] for a in acts]
        Q = torch.cat([a.a_q.to(self.device) for a in acts]).requires_grad_(True)  # (n, C, H, W)
        Kp = torch.cat([a.a_k.to(self.device) for a in acts])  # (n, C, H, W)

        ema_update(self.momentum, self.online, self.m)  # server EMA first (reference)
        queue = self.queue.queue.clone()  # negatives as they were before this step's enqueue
        q = F.normalize(self._net(self.online, Q), dim=1)  # (n, dim)
        with torch.no_grad():
            k = F.normalize(self._net(self.momentum, Kp), dim=1)  # (n, dim)
        loss = infonce(q, k, queue, self.T)
        keys = k
        if self.symmetric == "original":
            q2 = F.normalize(self._net(self.online, Kp), dim=1)
            with torch.no_grad():
                k2 = F.normalize(self._net(self.momentum, Q.detach()), dim=1)
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
        return StepResult(loss=float(loss.detach()), grads=grads, rows=int(sum(sizes)), rejected=rejected)

    def _net(self, net: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """``net(a)`` in the server's precision, in ``a``'s dtype (float32: normalisation and loss
        stay float32)."""
        with autocast(self.precision, self.device):
            return net(a).to(a.dtype)  # a no-op in fp32

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
