"""Personalisation by mini-interventions at the end of training (``fed.interventions``).

For every client of the last sync, an :class:`~mona_sfl.core.intervention.Intervention` on a
slice of the merged front's output channels is trained so that the merged front's output
matches the client's own pre-merge front's output on the client's own (unlabeled) training
images (L1, Adam lr 1e-3, batches of 16). Each client is then evaluated by kNN (the run's
bank and kNN settings) on the test images of its own classes, with the merged front, the
merged front + its intervention, and its own pre-merge front.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mona_sfl.core.intervention import fit_intervention
from mona_sfl.data.views import normalize

if TYPE_CHECKING:
    from mona_sfl.config import Config
    from mona_sfl.core.sync import StateDict
    from mona_sfl.data.images import ImageData
    from mona_sfl.eval.monitor import Monitor
    from mona_sfl.models.split import ServerNet

LR = 1e-3
BATCH = 16


def personalise(
    cfg: "Config",
    monitor: "Monitor",
    server: "ServerNet",
    merged_state: "StateDict",
    own_states: dict[int, "StateDict"],
    train: "ImageData",
    parts: list[np.ndarray],
) -> tuple[list[dict[str, Any]], dict[int, "StateDict"]]:
    """One row per client (sorted by id) and the interventions' state dicts by client."""
    f = cfg.fed
    dev = monitor.device
    merged = copy.deepcopy(monitor.front)
    merged.load_state_dict(merged_state)
    front_params = sum(p.numel() for p in merged.parameters())
    rows, states = [], {}
    for c in sorted(own_states):
        own = copy.deepcopy(monitor.front)
        own.load_state_dict(own_states[c])
        idx = torch.as_tensor(np.asarray(parts[c]), dtype=torch.long)
        images = normalize(train.images[idx], train.mean, train.std).to(dev)
        fit = fit_intervention(
            merged, own, images, rank=f.intervention_rank, width=f.intervention_channels, steps=f.intervention_steps,
            lr=LR, batch_size=BATCH, seed=cfg.seed + c,
        )
        classes = torch.unique(train.labels[idx])
        test = monitor.test.subset(torch.isin(monitor.test.labels, classes).numpy())
        row: dict[str, Any] = {"client": c, "classes": int(classes.numel()), "test_images": len(test)}
        if len(test):
            row["knn_merged"] = monitor.knn_module(merged, server, test)
            row["knn_intervened"] = monitor.knn_module(nn.Sequential(merged, fit.intervention), server, test)
            row["knn_own"] = monitor.knn_module(own, server, test)
        row.update(
            extra_params=fit.intervention.extra_params(), front_params=front_params,
            l1_first=fit.losses[0], l1_last=fit.losses[-1],
        )
        rows.append(row)
        states[c] = {k: v.detach().cpu() for k, v in fit.intervention.state_dict().items()}
    return rows, states


__all__ = ["personalise"]
