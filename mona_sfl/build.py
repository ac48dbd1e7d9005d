"""Build a run's pieces from its config: device, data, partition, schedule, models, client host, server.

Every process that hosts clients (the driver, a Ray actor, a Flower ClientApp) calls these
same functions with the same config, so all of them see identical data, partitions and
initial weights without shipping them around.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mona_sfl.config import Config, ConfigError
from mona_sfl.core.client import ClientHParams
from mona_sfl.core.host import ClientHost
from mona_sfl.core.schedule import Schedule
from mona_sfl.core.server import ActivationSpec, Server
from mona_sfl.data.datasets import ImageData, load_dataset
from mona_sfl.data.partition import partition
from mona_sfl.data.stream import ClientStream
from mona_sfl.data.views import TwoViews
from mona_sfl.errors import DataError
from mona_sfl.models.split import CutInfo, ServerNet, build_split, cut_info


def resolve_device(name: str, *, strict: bool = True) -> torch.device:
    """``auto``: CUDA when present. ``cuda`` without a CUDA device is a ConfigError, or CPU when not
    ``strict`` (a client host on a machine without a GPU follows the server's choice as far as it can)."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda" and strict:
        raise ConfigError("device='cuda' but no CUDA device is available: use device=auto or device=cpu")
    return torch.device("cpu")


def load_data(cfg: Config, split: str, *, progress: bool = False) -> ImageData:
    """Train or test data, decoded once into a uint8 tensor; the train set honours data.proportion.

    ``progress``: show the decoding of an image folder (:class:`mona_sfl.progress.Meter`)."""
    d = cfg.data
    if d.name != "synthetic" and not d.dir:
        hint = "" if d.name == "imagefolder" else " (and data.download=true on a machine with internet)"
        raise ConfigError(f"data.name='{d.name}' needs a data directory: set data.dir=PATH{hint}")
    data = load_dataset(
        d.name,
        split,
        root=d.dir or None,
        download=d.download,
        seed=cfg.data_seed,
        synthetic_size=d.synthetic_size,
        synthetic_test_size=d.synthetic_test_size,
        num_classes=d.num_classes,
        image_size=d.image_size,
        max_image_pixels=d.max_image_pixels,
        progress=progress,
    )
    if split == "train" and d.proportion < 1.0:
        rng = np.random.default_rng([cfg.data_seed, 0xDA7A])
        n = max(1, int(len(data) * d.proportion))
        data = data.subset(np.sort(rng.permutation(len(data))[:n]))
    return data


def client_partition(cfg: Config, labels: torch.Tensor, num_classes: int) -> list[np.ndarray]:
    """The seeded partition of the training set over fed.num_clients clients."""
    parts = partition(
        labels.numpy(),
        cfg.fed.num_clients,
        cfg.data.partition,
        rng=np.random.default_rng([cfg.seed, 0x9A27]),
        noniid_ratio=cfg.data.noniid_ratio,
        alpha=cfg.data.alpha,
        num_classes=num_classes,
    )
    small = min(len(p) for p in parts)
    if cfg.train.batch_size > small:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the smallest client's data ({small} images "
            f"with {cfg.fed.num_clients} clients): lower train.batch_size or fed.num_clients"
        )
    return parts


def schedule(cfg: Config, parts: list[np.ndarray]) -> Schedule:
    """The run's schedule for this partition of the training set."""
    return Schedule.from_config(cfg, sum(len(p) for p in parts))


def steps_per_epoch(cfg: Config, parts: list[np.ndarray]) -> int:
    """train.steps_per_epoch, or ceil(mean client size / batch size)."""
    return schedule(cfg, parts).steps_per_epoch


def build_models(cfg: Config) -> tuple[nn.Sequential, ServerNet]:
    """Client front and server net with the run's initial weights (seeded, CPU)."""
    m = cfg.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return build_split(
            m.arch,
            m.cut,
            width=m.width,
            norm=m.norm,
            weight_std=m.weight_std,
            proj_hidden=cfg.algo.hidden_dim,
            proj_dim=cfg.algo.dim,
        )


def client_hparams(cfg: Config) -> ClientHParams:
    return ClientHParams(
        lr=cfg.client_lr,
        momentum=cfg.train.momentum,
        weight_decay=cfg.train.weight_decay,
        m=cfg.algo.m,
        symmetric=cfg.algo.symmetric,
        schedule=cfg.train.client_schedule,
        epochs=cfg.train.epochs,
        batching=cfg.train.client_batching,
        precision=cfg.train.precision,
    )


def two_views(cfg: Config, data: ImageData) -> TwoViews:
    """The run's MoCo v2 augmentation, normalising with ``data``'s mean and std."""
    return TwoViews(data.mean, data.std, size=cfg.data.image_size, blur=cfg.data.blur, crop_scale=(cfg.data.crop_min, 1.0))


def build_host(
    cfg: Config,
    client_ids: list[int],
    *,
    train: ImageData | None = None,
    parts: list[np.ndarray] | None = None,
    device: torch.device | None = None,
) -> ClientHost:
    """A host of ``client_ids``; loads data and partitions unless given."""
    if train is None:
        train = load_data(cfg, "train")
    if parts is None:
        parts = client_partition(cfg, train.labels, len(train.classes))
    views = two_views(cfg, train)
    streams = {
        cid: ClientStream(train, parts[cid], cfg.train.batch_size, seed=cfg.seed, client_id=cid, views=views)
        for cid in client_ids
    }
    front, _ = build_models(cfg)
    return ClientHost(front, client_hparams(cfg), streams, device=device or resolve_device(cfg.device))


def split_info(cfg: Config, cut: int | None = None) -> CutInfo:
    """Sizes of the config's split (at ``cut`` instead of ``model.cut`` if given), without weights."""
    m = cfg.model
    return cut_info(
        m.arch, m.cut if cut is None else cut, input_size=cfg.data.image_size, width=m.width, norm=m.norm,
        weight_std=m.weight_std, proj_hidden=cfg.algo.hidden_dim, proj_dim=cfg.algo.dim,
    )


def activation_spec(cfg: Config) -> ActivationSpec:
    """What the server accepts from one client per step: rows of the cut's (C, H, W), float32."""
    info = split_info(cfg)
    return ActivationSpec(shape=tuple(info.activation_shape), max_rows=cfg.rows_per_client, dtype=torch.float32)


def build_server(cfg: Config, device: torch.device) -> Server:
    _, net = build_models(cfg)
    a = cfg.algo
    return Server(
        net,
        K=a.K,
        dim=a.dim,
        T=a.T,
        m=a.server_m,
        lr=cfg.train.lr,
        momentum=cfg.train.momentum,
        weight_decay=cfg.train.weight_decay,
        epochs=cfg.train.epochs,
        symmetric=a.symmetric,
        device=device,
        queue_seed=cfg.seed,
        spec=activation_spec(cfg),
        precision=cfg.train.precision,
    )


__all__ = [
    "DataError",
    "resolve_device",
    "load_data",
    "client_partition",
    "schedule",
    "steps_per_epoch",
    "build_models",
    "client_hparams",
    "two_views",
    "build_host",
    "split_info",
    "activation_spec",
    "build_server",
]
