"""How healthy a client front's output is: dead channels, spread and effective rank of its activations.

A front whose clients stop receiving useful gradients does not show it in the loss, which the
server's layers keep low: its output does. :func:`activation_stats` measures a batch of a
front's activations (images x channels x H x W); :func:`inspect_run` compares a run folder's
synced front (``global_online`` of its checkpoint) with the run's untrained front on a
class-stratified draw of test images. ``mona-sfl front RUN_DIR...`` prints both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mona_sfl.checkpoint import load_run_config, load_weights, synced_encoder, synced_front
from mona_sfl.config import ConfigError
from mona_sfl.data.views import normalize
from mona_sfl.eval.knn import knn_accuracy, stratified_subset


@torch.no_grad()
def encode_front(front: nn.Module, images: Tensor, mean: Any, std: Any, device: torch.device, batch_size: int = 256) -> Tensor:
    """uint8 images -> client activations (float32, on the CPU); the front as it is (callers set eval mode)."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = normalize(images[i : i + batch_size], mean, std).to(device)
        out.append(front(x).float().cpu())
    return torch.cat(out)


@dataclass
class FrontStats:
    """Statistics of a batch of activations (images x channels x H x W).

    - ``dead_channels``: channels that are exactly 0 for every image and position;
    - ``zero_fraction``: the share of exactly-0 entries;
    - ``mean_abs``: the mean absolute activation;
    - ``effective_rank``: exp of the entropy of the principal components' variance shares of the
      images' flattened, centred activations (1: every image differs from the mean only along
      one direction; at most images - 1);
    - ``top_share``: the first principal component's share of the variance;
    - ``channel_cv``: the median over the channels that are not dead of the std across images
      of the channel's mean activation over its mean absolute value (about 0: the channel says
      the same for every image; 0 when every channel is dead);
    - ``weight_sq``: the front's squared parameter norm (floating-point entries), when given.
    """

    images: int
    channels: int
    dead_channels: int
    zero_fraction: float
    mean_abs: float
    effective_rank: float
    top_share: float
    channel_cv: float
    weight_sq: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weight_norm_sq(state: dict[str, Tensor]) -> float:
    """Sum of squares of a state dict's floating-point tensors (counters and integer buffers left out)."""
    return float(sum(v.detach().double().pow(2).sum() for v in state.values() if v.is_floating_point()))


def activation_stats(acts: Tensor, state: dict[str, Tensor] | None = None) -> FrontStats:
    """:class:`FrontStats` of ``acts`` (N x C x H x W, N >= 2); ``state``: the front's weights, for ``weight_sq``."""
    if acts.dim() != 4:
        raise ConfigError(f"activations must be images x channels x H x W, got shape {tuple(acts.shape)}")
    n, c = int(acts.shape[0]), int(acts.shape[1])
    if n < 2:
        raise ConfigError(f"activation statistics need at least 2 images, got {n}")
    a = acts.detach().double()
    flat = a.flatten(1)
    flat = flat - flat.mean(0)
    # the principal components' variances: eigenvalues of the images' Gram matrix (N x N), cheaper
    # than an SVD when an image's activations have more entries than there are images
    var = torch.linalg.eigvalsh(flat @ flat.T).clamp_min(0).flip(0)
    total = float(var.sum())
    if total > 0:
        p = var / total
        p = p[p > 0]
        erank, top = math.exp(float(-(p * p.log()).sum())), float(p[0])
    else:  # every image gives the same activations
        erank, top = 0.0, 0.0
    pooled = a.mean(dim=(2, 3))
    scale = pooled.abs().mean(0)
    live = scale > 0
    cv = float(torch.quantile(pooled.std(0)[live] / scale[live], 0.5)) if bool(live.any()) else 0.0
    return FrontStats(
        images=n,
        channels=c,
        dead_channels=int((a.abs().amax(dim=(0, 2, 3)) == 0).sum()),
        zero_fraction=float((a == 0).double().mean()),
        mean_abs=float(a.abs().mean()),
        effective_rank=erank,
        top_share=top,
        channel_cv=cv,
        weight_sq=weight_norm_sq(state) if state is not None else math.nan,
    )


@torch.no_grad()
def front_knn(front: nn.Module, bank: Any, test: Any, cfg: Any, device: torch.device) -> float:
    """kNN top-1 (%) of the front's own activations (flattened, L2-normalised): the run's kNN bank
    and evaluation test set, its ``eval.knn_k`` and ``eval.knn_t``."""

    def feats(data: Any) -> Tensor:
        return torch.nn.functional.normalize(encode_front(front, data.images, data.mean, data.std, device).flatten(1), dim=1)

    return knn_accuracy(feats(bank), bank.labels, feats(test), test.labels, len(bank.classes), k=cfg.eval.knn_k, t=cfg.eval.knn_t)


@torch.no_grad()
def depth_features(front: nn.Module, server: nn.Module, images: Tensor, mean: Any, std: Any, device: torch.device, batch_size: int = 256) -> dict[str, Tensor]:
    """L2-normalised features at every depth of the encoder ``front -> server`` (both as they are;
    callers set eval mode), on the CPU: ``"front"`` (the front's output averaged over positions),
    ``"unit N"`` after each server backbone unit N (averaged over positions; the last one is the
    pooled backbone feature) and ``"projector"`` (the projector's output)."""
    parts: dict[str, list[Tensor]] = {}
    for i in range(0, images.shape[0], batch_size):
        h = front(normalize(images[i : i + batch_size], mean, std).to(device))
        row = {"front": h.mean(dim=(2, 3))}
        for name, unit in server.body.named_children():
            h = unit(h)
            row[f"unit {name}"] = h.mean(dim=(2, 3))
        row["projector"] = server.projector(server.pool(h))
        for k, v in row.items():
            parts.setdefault(k, []).append(torch.nn.functional.normalize(v.float(), dim=1).cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def depth_knn(front: nn.Module, server: nn.Module, bank: Any, test: Any, cfg: Any, device: torch.device) -> dict[str, float]:
    """kNN top-1 (%) of :func:`depth_features` at every depth, on the run's kNN bank and evaluation
    test set with its ``eval.knn_k`` and ``eval.knn_t``: where along the encoder what tells the
    classes apart is gained or lost."""
    bs = cfg.eval.batch_size
    fb = depth_features(front, server, bank.images, bank.mean, bank.std, device, bs)
    ft = depth_features(front, server, test.images, bank.mean, bank.std, device, bs)
    return {k: knn_accuracy(fb[k], bank.labels, ft[k], test.labels, len(bank.classes), k=cfg.eval.knn_k, t=cfg.eval.knn_t) for k in fb}


def inspect_run(
    run_dir: str | Path, *, num_test: int = 1000, device: str | None = None, knn: bool = False, depth: bool = False
) -> dict[str, Any]:
    """The run's synced front (its checkpoint's ``global_online``) and its untrained front, in eval
    mode, on ``num_test`` test images drawn class by class (:func:`~mona_sfl.eval.knn.stratified_subset`,
    the draw of the run's kNN test set): ``{"step", "num_test", "untrained", "trained"}``
    with :class:`FrontStats` for both. ``device`` None: the run config's ``device`` key.
    ``knn``: also ``"knn": {"untrained", "trained"}``, :func:`front_knn` of both fronts;
    ``depth``: also ``"depth": {"untrained", "trained"}``, :func:`depth_knn` of the run's
    untrained and trained encoders (front and server)."""
    from mona_sfl import build
    from mona_sfl.eval.monitor import eval_sets

    if isinstance(num_test, bool) or not isinstance(num_test, int) or num_test < 2:
        raise ConfigError(f"num-test must be an integer >= 2, got {num_test!r}")
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    server_state: dict[str, Any] | None = None
    if depth:
        state, server_state, step = synced_encoder(run_dir)
    else:
        state, step = synced_front(run_dir)
    test = build.load_data(cfg, "test")
    if len(test) < num_test:
        raise ConfigError(f"num-test {num_test} is more than the run's {len(test)} test images")
    dev = build.resolve_device(cfg.device if device is None else device)
    front, server = build.build_models(cfg)
    front, server = front.to(dev).eval(), server.to(dev).eval()
    images = test.images[torch.as_tensor(stratified_subset(test.labels, num_test))]  # image folders list class by class
    sets = eval_sets(cfg, build.load_data(cfg, "train"), test) if knn or depth else None
    res: dict[str, Any] = {"step": step, "num_test": num_test, **({"knn": {}} if knn else {}), **({"depth": {}} if depth else {})}
    for which in ("untrained", "trained"):
        if which == "trained":
            load_weights(front, state, "client front")
            if server_state is not None:
                load_weights(server, server_state, "server")
        res[which] = activation_stats(encode_front(front, images, test.mean, test.std, dev), front.state_dict())
        if knn and sets is not None:
            res["knn"][which] = front_knn(front, *sets, cfg, dev)
        if depth and sets is not None:
            res["depth"][which] = depth_knn(front, server, *sets, cfg, dev)
    return res


__all__ = ["FrontStats", "activation_stats", "depth_features", "depth_knn", "encode_front", "front_knn", "inspect_run", "weight_norm_sq"]
