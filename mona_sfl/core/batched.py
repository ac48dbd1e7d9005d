"""One batched pass for all clients of a host (``train.client_batching = "on"``).

The clients' fronts share one architecture, so n of them run as ONE network whose every
layer is n times wider and split into n independent groups (:func:`stack_front`):

* a convolution ``(C_in -> C_out, groups g)`` becomes ``(n*C_in -> n*C_out, groups n*g)``
  whose weight is the n clients' weights concatenated along the output channels;
  weight standardisation is per output channel, so it is unchanged;
* ``GroupNorm(G, C)`` becomes ``GroupNorm(n*G, n*C)`` (groups are contiguous channels, so
  group ``i*G + j`` is client i's group j), ``BatchNorm2d(C)`` becomes ``BatchNorm2d(n*C)``
  (statistics per channel, i.e. per client and channel), running statistics concatenated;
* the input of client i with R rows, (R, 3, H, W), goes to channels ``[3i, 3i + 3)`` of a
  (R, 3n, H, W) batch; the output splits the same way.

Every client's rows therefore meet only their own weights: the batched pass computes the
same numbers as the per-client loop, up to the rounding of a different kernel. Clients
whose batches differ in size (the last batch of a pass) run in separate groups of equal
size. The parameters are gathered from the live workers for each pass (one concatenation
per tensor name); the workers stay the owners of all state, so compaction, syncs,
checkpoints and the host's state format are those of the per-client loop. The optimizer
step (SGD with momentum and weight decay, each client's own learning rate and momentum
buffer) and the EMA update of the momentum fronts are ``torch._foreach_*`` calls over all
the clients' tensors, the same arithmetic as ``torch.optim.SGD`` and
:func:`mona_sfl.core.moco.ema_update`.

This module imports neither ray nor flwr.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from mona_sfl.core.client import Activations, ClientWorker, make_inputs
from mona_sfl.core.moco import ema_update_tensors
from mona_sfl.core.precision import autocast
from mona_sfl.core.schedule import CLIENT_BATCHING, client_step_lr
from mona_sfl.errors import ConfigError

_PLAIN = (nn.Sequential, nn.ReLU, nn.ReLU6, nn.Identity)


def stack_front(front: nn.Module, n: int) -> nn.Module:
    """``front`` as one network computing n independent copies of it (module docstring).

    Parameters and buffers keep their names; the state of the n copies is each tensor of
    the n state dicts concatenated along dim 0 (0-dim counters excepted). Raises a
    ConfigError for a layer with weights that is not a convolution, GroupNorm or BatchNorm2d.
    """
    stacked = copy.deepcopy(front)
    for parent in list(stacked.modules()):
        for name, c in list(parent.named_children()):
            if isinstance(c, nn.Conv2d):
                if c.padding_mode != "zeros":
                    raise ConfigError(f"train.client_batching=on: convolution padding mode {c.padding_mode!r} is not supported")
                new: nn.Module = type(c)(
                    c.in_channels * n, c.out_channels * n, c.kernel_size, c.stride, c.padding, c.dilation,
                    c.groups * n, c.bias is not None, device="meta",
                )
            elif isinstance(c, nn.GroupNorm):
                new = nn.GroupNorm(c.num_groups * n, c.num_channels * n, c.eps, c.affine, device="meta")
            elif type(c) is nn.BatchNorm2d:
                new = nn.BatchNorm2d(c.num_features * n, c.eps, c.momentum, c.affine, c.track_running_stats, device="meta")
            else:
                if next(c.parameters(recurse=False), None) is not None or next(c.buffers(recurse=False), None) is not None:
                    raise ConfigError(f"train.client_batching=on: layer {type(c).__name__} cannot be batched over clients")
                continue
            new.train(c.training)
            setattr(parent, name, new)
    return stacked


def _stack_rows(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """n tensors (R, C, H, W) -> (R, n*C, H, W), client i in channels [iC, (i+1)C)."""
    x = torch.stack(list(xs), dim=1)  # (R, n, C, H, W)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _split_rows(y: torch.Tensor, n: int) -> list[torch.Tensor]:
    """(R, n*C, H, W) -> n contiguous tensors (R, C, H, W)."""
    v = y.reshape(y.shape[0], n, -1, *y.shape[2:])
    return [v[:, i].contiguous() for i in range(n)]


@dataclass
class _Graph:
    """The graph of one batched online forward, kept until the clients' gradients arrive."""

    ids: list[int]
    out: torch.Tensor  # (R, n*C, H, W) with graph
    params: list[torch.Tensor]  # stacked leaves, in parameter-name order
    waiting: set[int] = field(default_factory=set)


class BatchedClients:
    """The batched forward and backward of a host's live clients (one per host)."""

    def __init__(self, template: nn.Module) -> None:
        self.template = template
        self.param_names = [k for k, _ in template.named_parameters()]
        buffers = dict(template.named_buffers())
        self.stat_names = [k for k, b in buffers.items() if b.dim() > 0]  # BatchNorm running statistics
        self.count_names = [k for k, b in buffers.items() if b.dim() == 0]  # BatchNorm batch counters
        self._stacked: dict[int, nn.Module] = {}
        # a live front's (parameters, buffers by name), looked up once per epoch, not per pass
        self._members: dict[int, tuple[nn.Module, list[torch.Tensor], dict[str, torch.Tensor]]] = {}
        self.graphs: dict[int, _Graph] = {}  # client id -> the graph holding its last forward
        stack_front(template, 1)  # refuse an unsupported front now, not at the first step

    def module(self, n: int) -> nn.Module:
        if n not in self._stacked:
            if len(self._stacked) >= 4:  # group sizes seen: the full pool, a smaller last batch, ...
                self._stacked.clear()
            self._stacked[n] = stack_front(self.template, n)
        return self._stacked[n]

    # ---------------------------------------------------------------- gathering
    def params(self, m: nn.Module) -> list[torch.Tensor]:
        """``list(m.parameters())``, in :attr:`param_names` order (cached until :meth:`clear`)."""
        return self._lookup(m)[1]

    def _lookup(self, m: nn.Module) -> tuple[nn.Module, list[torch.Tensor], dict[str, torch.Tensor]]:
        got = self._members.get(id(m))
        if got is None or got[0] is not m:
            got = self._members[id(m)] = (m, list(m.parameters()), dict(m.named_buffers()))
        return got

    def _tensors(self, mods: Sequence[nn.Module], names: list[str], buffers: bool = False) -> dict[str, list[torch.Tensor]]:
        if buffers:
            per = [self._lookup(m)[2] for m in mods]
            return {k: [d[k] for d in per] for k in names}
        lists = [self._lookup(m)[1] for m in mods]
        return {k: [ps[i] for ps in lists] for i, k in enumerate(names)}

    def _run(
        self, mods: Sequence[nn.Module], x: torch.Tensor, *, grad: bool, keep_stats: bool, precision: str
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One pass of the n fronts ``mods`` on the stacked input ``x`` in ``precision``.
        Returns the output in ``x``'s dtype and the stacked parameters (leaves requiring grad when
        ``grad``); running statistics are written back to the fronts when ``keep_stats``."""
        n = len(mods)
        ps = self._tensors(mods, self.param_names)
        params = [torch.cat([p.detach() for p in ps[k]]) for k in self.param_names]
        if grad:
            for p in params:
                p.requires_grad_(True)
        stats = self._tensors(mods, self.stat_names + self.count_names, buffers=True)
        state = dict(zip(self.param_names, params))
        state.update({k: torch.cat(stats[k]) for k in self.stat_names})
        counts = {k: torch.zeros((), dtype=stats[k][0].dtype, device=x.device) for k in self.count_names}
        state.update(counts)
        with torch.set_grad_enabled(grad), autocast(precision, x.device):
            out = functional_call(self.module(n), state, (x,)).to(x.dtype)  # a no-op in fp32
        if keep_stats:
            with torch.no_grad():
                for k in self.stat_names:
                    torch._foreach_copy_(stats[k], list(state[k].chunk(n)))
                for k in self.count_names:
                    torch._foreach_add_(stats[k], counts[k])
        return out, params

    # ---------------------------------------------------------------- forward
    def forward(self, workers: Sequence[ClientWorker], views: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[Activations]:
        """What :meth:`ClientWorker.forward` does for each worker, as one batched pass per
        group of equal batch sizes; the graphs are kept in :attr:`graphs`."""
        if not workers:
            return []
        hp = workers[0].hp
        # EMA of the momentum fronts first, as ClientWorker.forward does
        ema_update_tensors(
            [p for w in workers for p in self.params(w.momentum)], [p.detach() for w in workers for p in self.params(w.online)], hp.m
        )
        inputs = [make_inputs(x1, x2, hp.symmetric) for x1, x2 in views]
        result: dict[int, Activations] = {}
        for group in _groups([(tuple(q.shape), tuple(k.shape)) for q, k in inputs]):
            ws = [workers[i] for i in group]
            out, params = self._run(
                [w.online for w in ws], _stack_rows([inputs[i][0] for i in group]), grad=True, keep_stats=True, precision=hp.precision
            )
            a_k, _ = self._run(
                [w.momentum for w in ws], _stack_rows([inputs[i][1] for i in group]), grad=False, keep_stats=True, precision=hp.precision
            )
            graph = _Graph([w.client_id for w in ws], out, params, {w.client_id for w in ws})
            for w, q, k in zip(ws, _split_rows(out.detach(), len(ws)), _split_rows(a_k, len(ws))):
                self.graphs[w.client_id] = graph
                w.momentum_synced = False
                if self.stat_names:
                    w.online_synced = False
                result[w.client_id] = Activations(w.client_id, q, k)
        return [result[w.client_id] for w in workers]

    # ---------------------------------------------------------------- backward
    def backward(self, workers: Sequence[ClientWorker], grads: Sequence[torch.Tensor], recompute: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """What :meth:`ClientWorker.backward` does for each worker: through the kept graph, or
        through a batched recomputation from ``recompute[client id]`` (the forward's views;
        no EMA, running statistics left as the forward left them)."""
        if not workers:
            return
        hp = workers[0].hp
        kept: dict[int, list[int]] = {}  # id(graph) -> positions in workers
        rebuilt: list[int] = []
        for i, w in enumerate(workers):
            g = self.graphs.get(w.client_id)
            if g is not None:
                kept.setdefault(id(g), []).append(i)
            elif w.client_id in recompute:
                rebuilt.append(i)
            else:
                raise RuntimeError(f"client {w.client_id}: backward without a forward (pass the views to recompute)")
        for pos in kept.values():
            g = self.graphs[workers[pos[0]].client_id]
            self._backward(g, [workers[i] for i in pos], [grads[i] for i in pos])
        if rebuilt:
            inputs = {i: make_inputs(*recompute[workers[i].client_id], hp.symmetric)[0] for i in rebuilt}
            for group in _groups([tuple(inputs[i].shape) for i in rebuilt]):
                pos = [rebuilt[j] for j in group]
                ws = [workers[i] for i in pos]
                out, params = self._run(
                    [w.online for w in ws], _stack_rows([inputs[i] for i in pos]), grad=True, keep_stats=False, precision=hp.precision
                )
                g = _Graph([w.client_id for w in ws], out, params, {w.client_id for w in ws})
                self._backward(g, ws, [grads[i] for i in pos])

    def _backward(self, g: _Graph, ws: list[ClientWorker], grads: list[torch.Tensor]) -> None:
        n = len(g.ids)
        shape = (g.out.shape[0], g.out.shape[1] // n, *g.out.shape[2:])
        full = torch.zeros(g.out.shape[0], n, *shape[1:], dtype=g.out.dtype, device=g.out.device)
        where = {cid: i for i, cid in enumerate(g.ids)}
        for w, gr in zip(ws, grads):
            if tuple(gr.shape) != shape:
                raise ValueError(f"client {w.client_id}: gradient shape {tuple(gr.shape)} != activation shape {shape}")
            full[:, where[w.client_id]] = gr.to(g.out.device, g.out.dtype)
        for w in ws:
            g.waiting.discard(w.client_id)
            self.graphs.pop(w.client_id, None)
        stacked = torch.autograd.grad(g.out, g.params, full.reshape(g.out.shape), retain_graph=bool(g.waiting))
        per = [t.chunk(n) for t in stacked]
        sgd_step(ws, [[c[where[w.client_id]] for c in per] for w in ws], [self.params(w.online) for w in ws])

    def drop(self, cid: int) -> None:
        g = self.graphs.pop(cid, None)
        if g is not None:
            g.waiting.discard(cid)

    def clear(self) -> None:
        self.graphs.clear()
        self._members.clear()


def _groups(keys: Sequence[object]) -> list[list[int]]:
    """Positions with equal keys, in order of first appearance."""
    out: dict[object, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.values())


@torch.no_grad()
def sgd_step(workers: Sequence[ClientWorker], grads: Sequence[Sequence[torch.Tensor]], params_of: Sequence[list[torch.Tensor]]) -> None:
    """One ``torch.optim.SGD`` step of each worker's optimizer with ``grads[i]`` (its
    parameters' gradients, in the order of ``params_of[i]``, its parameters), as
    ``ClientWorker.backward`` takes it: the reference
    schedule's per-step LR, weight decay, momentum buffers kept in the optimizer's state."""
    hp = workers[0].hp
    params: list[torch.Tensor] = []
    d_p: list[torch.Tensor] = []
    lrs: list[float] = []
    states: list[dict] = []
    for w, gs, ps in zip(workers, grads, params_of):
        w._set_lr(client_step_lr(hp.schedule, hp.lr, w.steps, hp.epochs))
        for p, gr in zip(ps, gs, strict=True):
            p.grad = gr  # as after the per-client backward
        params += ps
        d_p += list(gs)
        lrs += [float(w.optimizer.param_groups[0]["lr"])] * len(ps)
        if hp.momentum != 0:
            states += [w.optimizer.state[p] for p in ps]
    if hp.weight_decay != 0:
        d_p = torch._foreach_add(d_p, params, alpha=hp.weight_decay)
    if hp.momentum != 0:
        old = [i for i, st in enumerate(states) if st.get("momentum_buffer") is not None]
        if old:
            bufs = [states[i]["momentum_buffer"] for i in old]
            torch._foreach_mul_(bufs, hp.momentum)
            torch._foreach_add_(bufs, [d_p[i] for i in old])
        for st, d in zip(states, d_p):
            if st.get("momentum_buffer") is None:  # the first step: the buffer is the update
                st["momentum_buffer"] = d.clone()
        d_p = [st["momentum_buffer"] for st in states]
    for lr, pos in _by_value(lrs).items():
        torch._foreach_add_([params[i] for i in pos], [d_p[i] for i in pos], alpha=-lr)
    for w in workers:
        w.steps += 1
        w.online_synced = False


def _by_value(values: Sequence[float]) -> dict[float, list[int]]:
    out: dict[float, list[int]] = {}
    for i, v in enumerate(values):
        out.setdefault(v, []).append(i)
    return out


__all__ = ["CLIENT_BATCHING", "BatchedClients", "sgd_step", "stack_front"]
