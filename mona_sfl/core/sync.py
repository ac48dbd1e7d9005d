"""Client synchronisation: FedAvg of fronts and the divergence metrics logged at each sync.

Pure functions on state dicts. *When* to sync is decided by the engine; *whether* the
momentum fronts are averaged too (MonAcoSFL) is the ``align_momentum`` switch, applied by
:meth:`mona_sfl.core.client.ClientGroup.load_global`.
"""

from __future__ import annotations

import torch

StateDict = dict[str, torch.Tensor]


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
