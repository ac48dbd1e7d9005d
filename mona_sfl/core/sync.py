"""The sync: what every client loads after the sampled clients' fronts are merged.

:func:`sync_fronts` is the whole step. It merges the online fronts (``aggregate``: FedAvg by
default, ``fed.aggregation``), and, for MonAcoSFL, :func:`align_momentum` merges the momentum
fronts the same way so that every client leaves the sync with its momentum front equal to
the merged one (MocoSFL keeps each client's own momentum front). It also computes the
divergence metrics the reference logs at every sync. *When* to sync is the schedule's
business (:mod:`mona_sfl.core.schedule`); moving fronts is the runtime's.

Pure functions on state dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]
Aggregate = Callable[[list[StateDict]], StateDict]


@dataclass
class GlobalFronts:
    """What every client loads at a sync.

    ``momentum`` is the merged momentum front under MonAcoSFL (alignment on), or None: under
    MocoSFL every client keeps its own momentum front.
    """

    online: StateDict
    momentum: StateDict | None = None

    @property
    def aligned(self) -> bool:
        return self.momentum is not None

    def nbytes(self) -> int:
        """Payload bytes of one download (what one client receives)."""
        return state_bytes(self.online) + (state_bytes(self.momentum) if self.momentum is not None else 0)


@dataclass
class SyncResult:
    fronts: GlobalFronts  # what every client loads
    stats: dict[str, float] = field(default_factory=dict)  # divergence metrics (``divergence``)
    clients: int = 0  # how many clients' fronts were merged


def state_bytes(sd: StateDict) -> int:
    """Bytes of a state dict's tensors (numel x itemsize): what moving it costs."""
    return sum(int(t.numel()) * t.element_size() for t in sd.values())


def fedavg(state_dicts: list[StateDict]) -> StateDict:
    """Unweighted mean of state dicts, summed in list order (exact and order-defined).

    Integer entries (e.g. BatchNorm's ``num_batches_tracked``) are averaged and rounded down.
    """
    if not state_dicts:
        raise ValueError("fedavg needs at least one state dict")
    keys = list(state_dicts[0])
    for sd in state_dicts[1:]:
        if list(sd) != keys:
            raise ValueError("fedavg: state dicts have different keys")
    out: StateDict = {}
    n = len(state_dicts)
    for key in keys:
        ref = state_dicts[0][key]
        if ref.is_floating_point():
            acc = ref.detach().clone()
            for sd in state_dicts[1:]:
                acc.add_(sd[key].detach())
            out[key] = acc.div_(n)
        else:
            acc = ref.detach().clone().to(torch.int64)
            for sd in state_dicts[1:]:
                acc.add_(sd[key].detach().to(torch.int64))
            out[key] = torch.div(acc, n, rounding_mode="floor").to(ref.dtype)
    return out


def align_momentum(momentum_fronts: list[StateDict], aggregate: Aggregate = fedavg) -> StateDict:
    """MonAcoSFL's momentum alignment: merge the momentum fronts as the online ones are merged.

    The EMA is linear in the online trajectory, so the mean of the clients' momentum fronts is
    the EMA of the averaged online trajectory; loading it into every client keeps each
    client's momentum front aligned with the merged online front after the sync.
    """
    return aggregate(momentum_fronts)


def sync_fronts(
    fronts: list[tuple[StateDict, StateDict]], *, align: bool, aggregate: Aggregate = fedavg
) -> SyncResult:
    """The sync over the sampled clients' (online, momentum) fronts, in pool order.

    Returns what every client loads (the merged online front, and under MonAcoSFL,
    ``align=True``, the aligned momentum front) and the divergence metrics.
    """
    if not fronts:
        raise ValueError("a sync needs the fronts of at least one client")
    online = [o for o, _ in fronts]
    momentum = [m for _, m in fronts]
    merged = aggregate(online)
    loaded_momentum = align_momentum(momentum, aggregate) if align else None
    # the divergence metrics are defined against the plain means, whatever the aggregation
    mean_online = merged if aggregate is fedavg else fedavg(online)
    mean_momentum = loaded_momentum if (aggregate is fedavg and loaded_momentum is not None) else fedavg(momentum)
    stats = divergence(online, momentum, mean_online, mean_momentum)
    return SyncResult(GlobalFronts(merged, loaded_momentum), stats, len(fronts))


def _sq_dist(a: StateDict, b: StateDict) -> tuple[float, int]:
    total = 0.0
    numel = 0
    for key, x in a.items():
        if not x.is_floating_point():
            continue
        d = (x.detach().float() - b[key].detach().float()).pow(2).sum()
        total += float(d)
        numel += x.numel()
    return total, numel


def divergence(
    online: list[StateDict], momentum: list[StateDict], avg_online: StateDict, avg_momentum: StateDict
) -> dict[str, float]:
    """The reference's divergence metrics, averaged over the participating clients.

    * ``ol_og``: ||online_i - mean online||^2 / numel
    * ``ol_ml``: ||online_i - momentum_i||^2 / numel  (the online/momentum misalignment)
    * ``ml_mg``: ||momentum_i - mean momentum||^2 / numel
    """
    vals = {"ol_og": 0.0, "ol_ml": 0.0, "ml_mg": 0.0}
    for on, mo in zip(online, momentum):
        for name, (a, b) in (("ol_og", (on, avg_online)), ("ol_ml", (on, mo)), ("ml_mg", (mo, avg_momentum))):
            s, n = _sq_dist(a, b)
            vals[name] += s / max(n, 1)
    k = max(len(online), 1)
    return {name: v / k for name, v in vals.items()}


__all__ = ["GlobalFronts", "StateDict", "SyncResult", "align_momentum", "divergence", "fedavg", "state_bytes", "sync_fronts"]
