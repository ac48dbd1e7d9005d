"""Transfer of a finished run's backbone to a labelled target set: linear probe, singular-value
fine-tuning (SVF, AXIS's stage 2) and full fine-tuning, side by side.

The backbone is the run's synced client front followed by the server's online body and its
pooling (the projector is dropped); a new linear head maps its pooled features to the target
classes. Three ways to adapt it, each trained with cross-entropy on the same labelled images:

* ``linear``: the backbone frozen (in eval mode), only the head trains;
* ``svf`` (share ``N``): every weight matrix ``W`` of the backbone (a convolution read as
  ``(out, in*kh*kw)``) is re-expressed as ``U diag(s) V^T`` (its SVD, taken once); only the
  top ``max(1, floor(N * rank))`` singular values of each matrix and the head train; ``U``,
  ``V``, the other singular values, biases and normalisation parameters stay frozen
  (backbone in eval mode);
* ``full``: every backbone parameter and the head train (backbone in train mode).

Training: SGD with momentum 0.9, one cosine decay over all steps, mini-batches reshuffled
each epoch by a generator seeded with ``seed``; no augmentation (images normalised only).
The head's initial weights come from the same seed, so every method starts from the same
head. Bit-reproducible on CPU.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mona_sfl.checkpoint import atomic_write_text, load_run_config, load_weights, synced_encoder
from mona_sfl.core.merge import is_matrix, layer_k
from mona_sfl.core.schedule import cosine_lr
from mona_sfl.data.views import normalize
from mona_sfl.errors import ConfigError

if TYPE_CHECKING:
    from mona_sfl.config import Config
    from mona_sfl.data.images import ImageData

TRANSFER_JSON = "transfer.json"
METHODS = ("linear", "svf", "full")


# ----------------------------------------------------------------------------- the backbone
class Backbone(nn.Module):
    """Client front -> server body -> pooling: ``(N, 3, H, W) -> (N, D)`` pooled features."""

    def __init__(self, front: nn.Module, server: nn.Module) -> None:
        super().__init__()
        self.front = front
        self.body = server.body
        self.pool = server.pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(self.front(x)))


class SingularValues(nn.Module):
    """A parametrization ``W = U diag([top; rest]) V^T`` of one weight: only ``top`` (the
    ``n`` largest singular values) is a parameter; ``u``, ``vh`` and ``rest`` are buffers."""

    def __init__(self, weight: torch.Tensor, n: int) -> None:
        super().__init__()
        shape = tuple(weight.shape)
        u, s, vh = torch.linalg.svd(weight.detach().reshape(shape[0], -1).to(torch.float64), full_matrices=False)
        if not 1 <= n <= s.numel():
            raise ValueError(f"SVF trains 1..{s.numel()} singular values of a {shape} weight, got {n}")
        dtype = weight.dtype
        self.shape = shape
        self.register_buffer("u", u.to(dtype))
        self.register_buffer("vh", vh.to(dtype))
        self.register_buffer("rest", s[n:].to(dtype).clone())
        self.top = nn.Parameter(s[:n].to(dtype).clone())

    def forward(self, original: torch.Tensor) -> torch.Tensor:  # the stored weight is not used
        s = torch.cat([self.top, self.rest])
        return ((self.u * s) @ self.vh).reshape(self.shape)


def svf_sizes(model: nn.Module, share: float) -> list[int]:
    """Trainable singular values per weight matrix of ``model`` at ``share``: ``max(1, floor(share * rank))``."""
    return [layer_k(p.shape, share, 1) for _, p in matrix_weights(model)]


def matrix_weights(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """(module, weight) of every module whose own ``weight`` is a matrix (2-D or more), in order."""
    out = []
    for mod in model.modules():
        w = mod._parameters.get("weight")
        if w is not None and is_matrix(w):
            out.append((mod, w))
    return out


def make_svf(model: nn.Module, share: float) -> list[SingularValues]:
    """Freeze ``model`` and re-express every weight matrix by :class:`SingularValues` with its
    top ``max(1, floor(share * rank))`` singular values trainable; returns the parametrizations."""
    if not (math.isfinite(share) and 0 < share <= 1):
        raise ConfigError(f"SVF share must be in (0, 1], got {share}")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for mod, w in matrix_weights(model):
        sv = SingularValues(w, layer_k(w.shape, share, 1))
        parametrize.register_parametrization(mod, "weight", sv)
        params.append(sv)
    return params


def count(params: list[nn.Parameter] | Any) -> int:
    return sum(int(p.numel()) for p in params)


# ----------------------------------------------------------------------------- the target set
def labelled_subset(labels: torch.Tensor, *, per_class: int = 0, fraction: float = 0.0, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded class-stratified draw: ``per_class`` images of every class
    (all of a smaller class), or ``max(1, round(fraction * class size))`` of each."""
    if (per_class > 0) == (fraction > 0):
        raise ConfigError("give exactly one of labels per class (> 0) or a label fraction in (0, 1]")
    if fraction > 1:
        raise ConfigError(f"the label fraction must be in (0, 1], got {fraction}")
    lab = labels.numpy()
    picked = []
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        idx = idx[np.random.default_rng([seed, int(c)]).permutation(idx.size)]
        k = per_class if per_class > 0 else max(1, round(fraction * idx.size))
        picked.append(idx[:k])
    return np.sort(np.concatenate(picked))


# ----------------------------------------------------------------------------- training
@dataclass
class TransferRow:
    """One adapted model: its method, SVF share, trainable parameters and test accuracy (%)."""

    method: str
    share: float | None
    trainable: int
    backbone_params: int
    top1: float
    train_top1: float
    seconds: float


@dataclass
class TransferResult:
    rows: list[TransferRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], **self.meta}


@torch.no_grad()
def accuracy(model: nn.Module, head: nn.Linear, data: "ImageData", batch_size: int, device: torch.device) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start : start + batch_size], data.mean, data.std).to(device)
        pred = head(model(x)).argmax(dim=1).cpu()
        correct += int((pred == data.labels[start : start + batch_size]).sum())
    return 100.0 * correct / max(len(data), 1)


def fit(
    model: nn.Module,
    head: nn.Linear,
    params: list[nn.Parameter],
    data: "ImageData",
    *,
    lr_backbone: float,
    lr_head: float,
    epochs: int,
    batch_size: int,
    seed: int,
    train_mode: bool,
    device: torch.device,
) -> None:
    """Cross-entropy on ``data``: SGD (momentum 0.9) on ``params`` (backbone) and the head, cosine LR."""
    groups = [{"params": list(head.parameters()), "lr": lr_head, "base": lr_head}]
    if params:
        groups.append({"params": params, "lr": lr_backbone, "base": lr_backbone})
    opt = torch.optim.SGD(groups, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    steps_per_epoch = math.ceil(n / batch_size)
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        model.train(train_mode)
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = normalize(data.images[idx], data.mean, data.std).to(device)
            y = data.labels[idx].to(device)
            for grp in opt.param_groups:
                grp["lr"] = cosine_lr(grp["base"], step, total)
            loss = F.cross_entropy(head(model(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1


def new_head(dim: int, classes: int, seed: int, device: torch.device) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(dim, classes).to(device)


def adapt(
    make_backbone: Callable[[], nn.Module],
    method: str,
    train: "ImageData",
    test: "ImageData",
    *,
    share: float | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr_head: float = 0.1,
    lr_svf: float = 0.1,
    lr_full: float = 0.01,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[TransferRow, nn.Module, nn.Linear]:
    """Adapt a fresh backbone (``make_backbone()``) by ``method`` (linear, svf, full); returns the row, model and head."""
    if method not in METHODS:
        raise ConfigError(f"transfer method {method!r} is not one of {', '.join(METHODS)}")
    dev = torch.device(device)
    t0 = time.perf_counter()
    model = make_backbone().to(dev)
    backbone_params = count(model.parameters())
    with torch.no_grad():
        model.eval()
        dim = int(model(normalize(train.images[:1], train.mean, train.std).to(dev)).shape[1])
    head = new_head(dim, len(train.classes), seed, dev)
    if method == "linear":
        for p in model.parameters():
            p.requires_grad_(False)
        params: list[nn.Parameter] = []
        lr_b, train_mode = 0.0, False
    elif method == "svf":
        params = [sv.top for sv in make_svf(model, float(share if share is not None else 0.1))]
        lr_b, train_mode = lr_svf, False
    else:
        params = list(model.parameters())
        lr_b, train_mode = lr_full, True
    fit(model, head, params, train, lr_backbone=lr_b, lr_head=lr_head, epochs=epochs, batch_size=batch_size, seed=seed, train_mode=train_mode, device=dev)
    row = TransferRow(
        method=method,
        share=share if method == "svf" else None,
        trainable=count(params) + count(head.parameters()),
        backbone_params=backbone_params,
        top1=accuracy(model, head, test, batch_size, dev),
        train_top1=accuracy(model, head, train, batch_size, dev),
        seconds=time.perf_counter() - t0,
    )
    return row, model, head


# ----------------------------------------------------------------------------- a run folder
def target_config(cfg: "Config", overrides: list[str]) -> "Config":
    """The run's config with ``data.*`` overrides (the target set); other keys are refused."""
    from mona_sfl.config import with_overrides

    for o in overrides:
        if not o.strip().startswith("data."):
            raise ConfigError(f"transfer --set takes data.* keys only (the target set), got '{o}'")
    return with_overrides(cfg, overrides)


def run_backbone(run_dir: Path, cfg: "Config") -> tuple[Callable[[], Backbone], int]:
    """A function building a fresh copy of the run's trained backbone (front + server body), and the checkpoint's step."""
    from mona_sfl import build

    front_state, server_state, step = synced_encoder(run_dir)

    def make() -> Backbone:
        front, server = build.build_models(cfg)
        load_weights(front, front_state, "client front")
        load_weights(server, server_state, "server")
        return Backbone(front, server)

    return make, step


def transfer_run(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    *,
    labels_per_class: int = 0,
    label_fraction: float = 0.0,
    methods: tuple[str, ...] = METHODS,
    shares: tuple[float, ...] = (0.1, 0.2, 0.4),
    device: str = "cpu",
    seed: int = 0,
    write: bool = True,
    **kw: Any,
) -> TransferResult:
    """Adapt a run folder's backbone to a target set (the run's data, or ``data.*`` overrides)
    with each method (``svf`` once per share); writes ``transfer.json`` into the run folder."""
    from mona_sfl import build
    from mona_sfl.eval.monitor import eval_sets

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    tcfg = target_config(cfg, list(overrides or []))
    make, step = run_backbone(run_dir, cfg)
    train_all, test_all = build.load_data(tcfg, "train"), build.load_data(tcfg, "test")
    _, test = eval_sets(tcfg, train_all, test_all)
    train = train_all.subset(labelled_subset(train_all.labels, per_class=labels_per_class, fraction=label_fraction, seed=seed))
    dev = build.resolve_device(device)
    rows = []
    for method in methods:
        for share in shares if method == "svf" else (None,):
            row, _, _ = adapt(make, method, train, test, share=share, seed=seed, device=dev, **kw)
            rows.append(row)
    meta = {
        "run_dir": str(run_dir),
        "checkpoint_step": step,
        "target": tcfg.data.name,
        "labelled": len(train),
        "test": len(test),
        "classes": len(train.classes),
        "labels_per_class": labels_per_class,
        "label_fraction": label_fraction,
        "seed": seed,
        **{k: v for k, v in kw.items()},
    }
    res = TransferResult(rows, meta)
    if write:
        atomic_write_text(run_dir / TRANSFER_JSON, json.dumps(res.to_dict(), indent=2) + "\n")
    return res


__all__ = [
    "METHODS",
    "TRANSFER_JSON",
    "Backbone",
    "SingularValues",
    "TransferResult",
    "TransferRow",
    "adapt",
    "labelled_subset",
    "make_svf",
    "matrix_weights",
    "svf_sizes",
    "transfer_run",
]
