"""Linear probe on frozen, precomputed features (algorithm.md section 4).

Unlike the reference ``linear_eval`` (section 9, items 9-10) this probe
shuffles the training set every epoch, uses one cosine decay over all steps,
honours ``lr`` and reports the test accuracy after the last epoch (no model
selection on the test set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mona_sfl.core import schedule
from mona_sfl.eval.knn import _check_features, _check_labels, _check_num_classes

__all__ = ["ProbeResult", "linear_probe", "cosine_lr"]

_STD_FLOOR = 1e-6
_EVAL_CHUNK = 8192


@dataclass
class ProbeResult:
    """Outcome of :func:`linear_probe`.

    ``top1``: test accuracy (%) after the last epoch; ``train_top1``: accuracy
    (%) of the final classifier on the whole training set; ``epochs``: epochs
    run; ``final_loss``: mean training cross-entropy over the last epoch.
    """

    top1: float
    train_top1: float
    epochs: int
    final_loss: float = float("nan")


def cosine_lr(step: int, total_steps: int, base_lr: float) -> float:
    """Learning rate of step ``step`` (0-based) of ``total_steps``:
    ``base_lr * (1 + cos(pi * step / total_steps)) / 2`` (no restarts)."""
    return schedule.cosine_lr(base_lr, step, total_steps)


def _standardize(
    train: torch.Tensor, test: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardise (N, D) train and (M, D) test features with the train
    per-dimension mean and (biased) std; dimensions with std below 1e-6 are
    only centred."""
    mean = train.mean(dim=0, keepdim=True)
    std = train.std(dim=0, unbiased=False, keepdim=True)
    std = torch.where(std > _STD_FLOOR, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


@torch.no_grad()
def _accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    """Top-1 accuracy (%) of the linear classifier (w, b) on (x, y)."""
    correct = 0
    for start in range(0, x.shape[0], _EVAL_CHUNK):
        logits = F.linear(x[start : start + _EVAL_CHUNK], w, b)
        correct += int((logits.argmax(dim=1) == y[start : start + _EVAL_CHUNK]).sum())
    return 100.0 * correct / x.shape[0]


def _positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    standardize: bool = True,
) -> ProbeResult:
    """Train ``Linear(D, C)`` on frozen features and report accuracies.

    Inputs: ``train_feats`` (N, D), ``train_labels`` (N,), ``test_feats``
    (M, D), ``test_labels`` (M,), labels in [0, num_classes). Features are cast
    to float32 and moved to ``device``; with ``standardize`` they are centred
    and scaled with the training statistics only. Weight: Xavier-uniform,
    bias: zero. Adam(lr, weight_decay) on cross-entropy, mini-batches of
    ``batch_size`` (the last one may be smaller) in an order reshuffled each
    epoch, LR ``cosine_lr(step, epochs * steps_per_epoch, lr)`` set before each
    step. The init and the order come from a CPU ``torch.Generator`` seeded
    with ``seed``; the global RNG is not used. Bit-reproducible on CPU.
    """
    _check_features(train_feats, "train_feats")
    _check_features(test_feats, "test_feats")
    _check_num_classes(num_classes)
    n, d = train_feats.shape
    if n == 0:
        raise ValueError("train_feats is empty (N = 0)")
    if test_feats.shape[0] == 0:
        raise ValueError("test_feats is empty (M = 0)")
    if test_feats.shape[1] != d:
        raise ValueError(
            f"train_feats and test_feats must have the same feature dimension, "
            f"got {d} and {test_feats.shape[1]}"
        )
    _check_labels(train_labels, "train_labels", n, num_classes)
    _check_labels(test_labels, "test_labels", test_feats.shape[0], num_classes)
    _positive_int(epochs, "epochs")
    _positive_int(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")

    dev = torch.device(device)
    x_train = train_feats.detach().to(device=dev, dtype=torch.float32)
    x_test = test_feats.detach().to(device=dev, dtype=torch.float32)
    y_train = train_labels.detach().to(device=dev, dtype=torch.long)
    y_test = test_labels.detach().to(device=dev, dtype=torch.long)
    if standardize:
        x_train, x_test = _standardize(x_train, x_test)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    weight = torch.empty(num_classes, d, dtype=torch.float32)
    torch.nn.init.xavier_uniform_(weight, generator=gen)
    weight = weight.to(dev).requires_grad_(True)
    bias = torch.zeros(num_classes, dtype=torch.float32, device=dev, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)

    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    step = 0
    epoch_loss = torch.zeros((), dtype=torch.float32, device=dev)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(dev)
        xs, ys = x_train[perm], y_train[perm]
        epoch_loss = torch.zeros((), dtype=torch.float32, device=dev)
        for start in range(0, n, batch_size):
            xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total_steps, lr)
            loss = F.cross_entropy(F.linear(xb, weight, bias), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += loss.detach() * xb.shape[0]
            step += 1

    w, b = weight.detach(), bias.detach()
    return ProbeResult(
        top1=_accuracy(x_test, y_test, w, b),
        train_top1=_accuracy(x_train, y_train, w, b),
        epochs=epochs,
        final_loss=float(epoch_loss) / n,
    )
