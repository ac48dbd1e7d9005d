"""Merging client fronts beyond the plain mean: AXIS (SVD component selection).

AXIS (Osial et al., "Efficient Multi-Source Knowledge Transfer by Model Merging") merges
several models fine-tuned from one base. Per weight matrix (a convolution's weight
``(out, in, kh, kw)`` read as the matrix ``(out, in*kh*kw)``):

1. the sources' deltas ``D_i = W_i - W_base`` (i = 1..n) are decomposed, ``D_i = U_i S_i V_i^T``;
2. the rank-one triplets ``(u, s, v)`` of all sources are pooled and ranked by their raw
   singular value ``s`` (no per-source normalisation; ties keep source order, then
   component order);
3. the top ``K`` triplets are kept and summed, ``D = sum u s v^T``;
4. ``D`` is re-orthogonalised by a second SVD, ``D = U_t S_t V_t^T``, truncated to the ``K``
   components it can have (a no-op in exact arithmetic; it drops rounding noise and is the
   basis a singular-value fine-tuning trains in);
5. the merged weight is ``W_base + D / n``: keeping every triplet gives ``W_base + mean(D_i)``,
   the mean of the sources (FedAvg) up to float rounding.

``K = max(1, floor(keep * min(out, in*kh*kw)))``, at most the ``n * rank`` pooled triplets:
``keep`` is the kept share of the layer's rank (the paper keeps about 10%); ``keep >= n``
keeps every triplet. Tensors that are not matrices (biases, normalisation parameters,
buffers) are averaged exactly as :func:`~mona_sfl.core.sync.fedavg` averages them.

The kept energy share of a layer is ``sum of kept s^2 / sum of all pooled s^2`` (1 when
every delta is zero): how much of the sources' squared Frobenius mass the merge keeps.

Pure functions on state dicts; the SVDs run in float64 on the tensors' device.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from mona_sfl.core.sync import Aggregate, Merge, StateDict, fedavg


@dataclass
class LayerMerge:
    """One matrix's AXIS merge: the merged delta (already divided by n) and what was kept."""

    delta: torch.Tensor  # (out, in*kh*kw), float64
    kept: int  # K: triplets kept
    pooled: int  # n * rank: triplets pooled
    energy: float  # kept share of the pooled squared singular values


@dataclass(frozen=True)
class Axis:
    """``fed.aggregation = "axis"``: an :data:`~mona_sfl.core.sync.Aggregate` that keeps the
    top ``keep`` share of each layer's rank (see the module docstring)."""

    keep: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.keep) and self.keep > 0):
            raise ValueError(f"AXIS keep must be a positive share of the rank, got {self.keep}")

    def __call__(self, state_dicts: list[StateDict], base: StateDict | None = None) -> Merge:
        if base is None:
            raise ValueError("AXIS merges deltas from a base front: pass base=")
        return axis_merge(state_dicts, base, self.keep)


def is_matrix(t: torch.Tensor) -> bool:
    """Whether AXIS treats a state-dict entry as a weight matrix (floating point, 2-D or more)."""
    return t.is_floating_point() and t.dim() >= 2


def layer_k(shape: torch.Size | tuple[int, ...], keep: float, sources: int) -> int:
    """K for a weight of ``shape``: ``max(1, floor(keep * rank))``, at most ``sources * rank``."""
    rank = min(int(shape[0]), math.prod(int(s) for s in shape[1:]))
    return min(sources * rank, max(1, math.floor(keep * rank + 1e-9)))


def axis_matrix(deltas: list[torch.Tensor], k: int) -> LayerMerge:
    """AXIS on one matrix: ``deltas`` are the n sources' deltas (any shape ``(out, ...)``, read
    as ``(out, prod(...))``); returns the merged delta ``D / n`` as a float64 matrix."""
    if not deltas:
        raise ValueError("AXIS needs at least one source")
    if k < 1:
        raise ValueError(f"AXIS keeps at least one triplet, got K={k}")
    us, ss, vs = [], [], []
    for d in deltas:
        u, s, vh = torch.linalg.svd(d.detach().reshape(d.shape[0], -1).to(torch.float64), full_matrices=False)
        us.append(u)
        ss.append(s)
        vs.append(vh)
    s_all = torch.cat(ss)
    k = min(k, s_all.numel())
    order = torch.sort(s_all, descending=True, stable=True).indices[:k]
    s_kept = s_all[order]
    summed = (torch.cat(us, dim=1)[:, order] * s_kept) @ torch.cat(vs, dim=0)[order]
    ut, st, vth = torch.linalg.svd(summed, full_matrices=False)  # re-orthogonalise
    r = min(k, st.numel())
    merged = (ut[:, :r] * st[:r]) @ vth[:r]
    total = float(s_all.pow(2).sum())
    energy = float(s_kept.pow(2).sum()) / total if total > 0 else 1.0
    return LayerMerge(merged / len(deltas), k, int(s_all.numel()), energy)


def axis_merge(state_dicts: list[StateDict], base: StateDict, keep: float) -> Merge:
    """AXIS over whole fronts: every matrix merged by :func:`axis_matrix`, the rest by FedAvg.

    The stats are ``kept_energy`` (mean over the matrices of their kept energy share),
    ``kept_energy_min`` (the smallest) and ``merge_s`` (seconds this merge took); ``layers``
    maps each matrix's key to its kept energy share.
    """
    t0 = time.perf_counter()
    if not state_dicts:
        raise ValueError("AXIS needs at least one state dict")
    keys = list(state_dicts[0])
    if any(list(sd) != keys for sd in state_dicts[1:]) or set(base) != set(keys):
        raise ValueError("AXIS: the state dicts and the base have different keys")
    matrices = [key for key in keys if is_matrix(state_dicts[0][key])]
    rest = fedavg([{key: sd[key] for key in keys if key not in matrices} for sd in state_dicts])
    out: StateDict = {}
    layers: dict[str, float] = {}
    n = len(state_dicts)
    for key in keys:
        if key not in matrices:
            out[key] = rest[key]
            continue
        ref = state_dicts[0][key]
        b = base[key].detach().to(ref.device)
        if b.shape != ref.shape:
            raise ValueError(f"AXIS: {key} has shape {tuple(ref.shape)} in the sources and {tuple(b.shape)} in the base")
        b64 = b.to(torch.float64)
        lm = axis_matrix([sd[key].detach().to(torch.float64) - b64 for sd in state_dicts], layer_k(ref.shape, keep, n))
        out[key] = (b64 + lm.delta.reshape(ref.shape)).to(ref.dtype)
        layers[key] = lm.energy
    energies = list(layers.values())
    stats = {
        "kept_energy": sum(energies) / len(energies) if energies else 1.0,
        "kept_energy_min": min(energies) if energies else 1.0,
        "merge_s": time.perf_counter() - t0,
    }
    return Merge(out, stats, layers)


# ---------------------------------------------------------------- AGGREGATIONS targets
# Each name of ``fed.aggregation`` stands for a function of the config's ``fed`` section that
# returns the Aggregate a sync calls.
def fedavg_aggregation(fed: object) -> Aggregate:
    """``fed.aggregation = "fedavg"``: the plain mean."""
    return fedavg


def axis_aggregation(fed: object) -> Aggregate:
    """``fed.aggregation = "axis"``: AXIS keeping ``fed.axis_keep`` of each layer's rank."""
    return Axis(float(fed.axis_keep))  # type: ignore[attr-defined]


__all__ = ["Axis", "LayerMerge", "axis_aggregation", "axis_matrix", "axis_merge", "fedavg_aggregation", "is_matrix", "layer_k"]
