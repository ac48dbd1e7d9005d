"""The sync: what every client loads after the sampled clients' fronts are merged.

:func:`sync_fronts` is the whole step. It merges the online fronts (``aggregate``: FedAvg by
default, ``fed.aggregation``), and, for MonAcoSFL, :func:`align_momentum` merges the momentum
fronts the same way so that every client leaves the sync with its momentum front equal to
the merged one (MocoSFL keeps each client's own momentum front). An aggregation may
need the last global fronts (AXIS merges deltas from them: :mod:`mona_sfl.core.merge`);
``sync_fronts(..., base=)`` hands it the online base for the online fronts and the momentum
base for the momentum fronts. It also computes the divergence metrics the reference logs
at every sync. *When* to sync is the schedule's
business (:mod:`mona_sfl.core.schedule`); moving fronts is the runtime's.

Pure functions on state dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]


@dataclass
class Merge:
    """What an aggregation that reports on its work returns: the merged state, numbers for the
    sync's step record (``stats``) and per-layer detail (``layers``: key -> number)."""

    state: StateDict
    stats: dict[str, float] = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)


#: ``aggregate(state_dicts, base)``: merge the sources (``base``: the fronts they started from
#: at the last sync, or None) into one state dict, or a :class:`Merge` with its report.
Aggregate = Callable[[list[StateDict], StateDict | None], StateDict | Merge]


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
    stats: dict[str, float] = field(default_factory=dict)  # divergence metrics (``divergence``), the aggregation's stats
    clients: int = 0  # how many clients' fronts were merged
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # the aggregation's per-layer detail ("online", "momentum")


def state_bytes(sd: StateDict) -> int:
    """Bytes of a state dict's tensors (numel x itemsize): what moving it costs."""
    return sum(int(t.numel()) * t.element_size() for t in sd.values())


def fedavg(state_dicts: list[StateDict], base: StateDict | None = None) -> StateDict:
    """Unweighted mean of state dicts, summed in list order (exact and order-defined).

    Integer entries (e.g. BatchNorm's ``num_batches_tracked``) are averaged and rounded down.
    ``base`` is ignored: the mean does not depend on where the sources started.
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


def align_momentum(
    momentum_fronts: list[StateDict], aggregate: Aggregate = fedavg, base: StateDict | None = None
) -> StateDict | Merge:
    """MonAcoSFL's momentum alignment: merge the momentum fronts as the online ones are merged.

    The EMA is linear in the online trajectory, so the mean of the clients' momentum fronts is
    the EMA of the averaged online trajectory; loading it into every client keeps each
    client's momentum front aligned with the merged online front after the sync. ``base``:
    the momentum fronts' last global (for aggregations that merge deltas).
    """
    return aggregate(momentum_fronts, base)


def _unpack(result: StateDict | Merge, suffix: str, stats: dict[str, float], layers: dict[str, dict[str, float]], name: str) -> StateDict:
    if not isinstance(result, Merge):
        return result
    stats.update({f"{k}{suffix}": v for k, v in result.stats.items()})
    if result.layers:
        layers[name] = dict(result.layers)
    return result.state


def sync_fronts(
    fronts: list[tuple[StateDict, StateDict]],
    *,
    align: bool,
    aggregate: Aggregate = fedavg,
    base: GlobalFronts | None = None,
) -> SyncResult:
    """The sync over the sampled clients' (online, momentum) fronts, in pool order.

    Returns what every client loads (the merged online front, and under MonAcoSFL,
    ``align=True``, the aligned momentum front), the divergence metrics, and what the
    aggregation reports (its stats, momentum ones suffixed ``_m``). ``base``: the fronts
    every client loaded at the last sync (the initial ones before any); the online fronts are
    merged against ``base.online``, the momentum fronts against ``base.momentum``.
    """
    if not fronts:
        raise ValueError("a sync needs the fronts of at least one client")
    online = [o for o, _ in fronts]
    momentum = [m for _, m in fronts]
    extra: dict[str, float] = {}
    layers: dict[str, dict[str, float]] = {}
    merged = _unpack(aggregate(online, base.online if base is not None else None), "", extra, layers, "online")
    loaded_momentum = None
    if align:
        mbase = base.momentum if base is not None else None
        loaded_momentum = _unpack(align_momentum(momentum, aggregate, mbase), "_m", extra, layers, "momentum")
    # the divergence metrics are defined against the plain means, whatever the aggregation
    mean_online = merged if aggregate is fedavg else fedavg(online)
    mean_momentum = loaded_momentum if (aggregate is fedavg and loaded_momentum is not None) else fedavg(momentum)
    stats = divergence(online, momentum, mean_online, mean_momentum)
    stats.update(extra)
    return SyncResult(GlobalFronts(merged, loaded_momentum), stats, len(fronts), layers)


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


__all__ = ["Aggregate", "GlobalFronts", "Merge", "StateDict", "SyncResult", "align_momentum", "divergence", "fedavg", "state_bytes", "sync_fronts"]
