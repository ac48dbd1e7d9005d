"""Personalisation by mini-interventions (``fed.interventions``).

For every client of the last sync, an :class:`~mona_sfl.core.intervention.Intervention` on a
slice of the merged front's output channels is trained so that the merged front's output
matches the client's own pre-merge front's output on the client's own (unlabeled) training
images (L1, Adam lr 1e-3, batches of 16). Each client is then evaluated by kNN (the run's
bank and kNN settings) on the test images of its own classes, with the merged front, the
merged front + its intervention, and its own pre-merge front.

With ``fed.intervention_every_sync`` the interventions are fitted after every sync instead
(:func:`refit`: each client of the sync continues from its last intervention), and the end of
training evaluates the ones the last sync fitted (:func:`personalise` with ``fitted``).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mona_sfl.core.intervention import Intervention, InterventionFit, fit_intervention
from mona_sfl.data.views import normalize

if TYPE_CHECKING:
    from mona_sfl.config import Config
    from mona_sfl.core.sync import StateDict
    from mona_sfl.data.images import ImageData
    from mona_sfl.eval.monitor import Monitor
    from mona_sfl.models.split import ServerNet

LR = 1e-3
BATCH = 16


def _front(template: nn.Module, state: "StateDict") -> nn.Module:
    front = copy.deepcopy(template)
    front.load_state_dict(state)
    return front


def _images(train: "ImageData", part: np.ndarray, device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(np.asarray(part), dtype=torch.long)
    return normalize(train.images[idx], train.mean, train.std).to(device)


def _fit(cfg: "Config", merged: nn.Module, own: nn.Module, images: torch.Tensor, seed: int, init: "StateDict | None" = None) -> InterventionFit:
    f = cfg.fed
    return fit_intervention(
        merged, own, images, rank=f.intervention_rank, width=f.intervention_channels, steps=f.intervention_steps,
        lr=LR, batch_size=BATCH, seed=seed, init=init,
    )


def _cpu(iv: nn.Module) -> "StateDict":
    return {k: v.detach().cpu() for k, v in iv.state_dict().items()}


def refit(
    cfg: "Config",
    template: nn.Module,
    merged_state: "StateDict",
    own_states: dict[int, "StateDict"],
    train: "ImageData",
    parts: list[np.ndarray],
    device: torch.device,
    previous: dict[int, "StateDict"],
    sync_index: int,
) -> tuple[dict[int, "StateDict"], dict[int, list[float]], dict[str, float]]:
    """After a sync (``fed.intervention_every_sync``): every client of the sync (``own_states``,
    its pre-merge front) fits its intervention on the new merged front, starting from its
    ``previous`` one (the identity the first time), with the seed ``seed + client +
    num_clients * sync_index``. Returns the interventions by client (all of ``previous``, those
    of the sync replaced), each fitted client's first and last L1, and the sync record's means
    (``interv_l1_first``, ``interv_l1_last``)."""
    merged = _front(template, merged_state)
    states, l1 = dict(previous), {}
    for c in sorted(own_states):
        init = previous.get(c)
        fit = _fit(
            cfg, merged, _front(template, own_states[c]), _images(train, parts[c], device),
            cfg.seed + c + cfg.fed.num_clients * sync_index, None if init is None else {k: v.to(device) for k, v in init.items()},
        )
        states[c] = _cpu(fit.intervention)
        l1[c] = [fit.losses[0], fit.losses[-1]]
    n = max(1, len(l1))
    stats = {"interv_l1_first": sum(v[0] for v in l1.values()) / n, "interv_l1_last": sum(v[1] for v in l1.values()) / n}
    return states, l1, stats


def personalise(
    cfg: "Config",
    monitor: "Monitor",
    server: "ServerNet",
    merged_state: "StateDict",
    own_states: dict[int, "StateDict"],
    train: "ImageData",
    parts: list[np.ndarray],
    fitted: dict[int, "StateDict"] | None = None,
    fitted_l1: dict[int, list[float]] | None = None,
) -> tuple[list[dict[str, Any]], dict[int, "StateDict"]]:
    """One row per client (sorted by id) and the interventions' state dicts by client.

    ``fitted`` (with ``fitted_l1``, their first and last L1): the interventions the last sync
    fitted (``fed.intervention_every_sync``); evaluated as they are, not trained again."""
    dev = monitor.device
    merged = _front(monitor.front, merged_state)
    front_params = sum(p.numel() for p in merged.parameters())
    rows, states = [], {}
    for c in sorted(own_states):
        own = _front(monitor.front, own_states[c])
        images = _images(train, parts[c], dev)
        if fitted is None:
            fit = _fit(cfg, merged, own, images, cfg.seed + c)
            iv, l1 = fit.intervention, [fit.losses[0], fit.losses[-1]]
        else:
            w1 = fitted[c]["w1"]
            with torch.no_grad():
                channels = int(merged(images[:1]).shape[1])
            iv = Intervention(channels, rank=int(w1.shape[0]), width=int(w1.shape[1])).to(dev)
            iv.load_state_dict(fitted[c])
            l1 = list((fitted_l1 or {})[c])
        classes = torch.unique(train.labels[torch.as_tensor(np.asarray(parts[c]), dtype=torch.long)])
        test = monitor.test.subset(torch.isin(monitor.test.labels, classes).numpy())
        row: dict[str, Any] = {"client": c, "classes": int(classes.numel()), "test_images": len(test)}
        if len(test):
            row["knn_merged"] = monitor.knn_module(merged, server, test)
            row["knn_intervened"] = monitor.knn_module(nn.Sequential(merged, iv), server, test)
            row["knn_own"] = monitor.knn_module(own, server, test)
        row.update(extra_params=iv.extra_params(), front_params=front_params, l1_first=l1[0], l1_last=l1[1])
        rows.append(row)
        states[c] = _cpu(iv)
    return rows, states


__all__ = ["personalise", "refit"]
