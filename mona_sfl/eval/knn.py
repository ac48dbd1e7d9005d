"""Feature extraction and the weighted kNN monitor (algorithm.md section 4).

The kNN classifier is the one used by the MoCo / MocoSFL monitors: cosine
similarity between L2-normalised features, the ``k`` most similar bank entries
vote for their label with weight ``exp(sim / t)`` and the class with the largest
summed weight wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    import numpy as np

__all__ = ["extract_features", "knn_predict", "knn_accuracy", "stratified_subset"]

_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _channel_stats(
    values: Sequence[float] | torch.Tensor, name: str, channels: int
) -> torch.Tensor:
    """Return per-channel statistics as a float32 CPU tensor of shape (C,)."""
    t = torch.as_tensor(values, dtype=torch.float32).flatten().cpu()
    if t.numel() != channels:
        raise ValueError(
            f"{name} must have one value per image channel ({channels}), got {t.numel()}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Encode a uint8 image tensor batch by batch.

    Each batch of ``images`` (uint8, (N, C, H, W), normally on CPU) is moved to
    ``device``, converted to float in [0, 1] (``x / 255``), normalised per channel
    as ``(x - mean) / std`` and passed to ``encode``, which must return a (B, D)
    tensor. Returns the (N, D) float32 features on CPU. Runs under ``no_grad``
    and never touches module modes: the caller puts its model in ``eval()``.
    """
    if not callable(encode):
        raise ValueError("encode must be callable")
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    n, channels = images.shape[0], images.shape[1]
    if n == 0:
        raise ValueError("images is empty (N = 0)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    mean_t = _channel_stats(mean, "mean", channels)
    std_t = _channel_stats(std, "std", channels)
    if not bool((std_t > 0).all()):
        raise ValueError(f"std must be > 0 for every channel, got {std_t.tolist()}")
    dev = torch.device(device)
    mean_t = mean_t.to(dev).view(1, channels, 1, 1)
    std_t = std_t.to(dev).view(1, channels, 1, 1)

    out: torch.Tensor | None = None
    for start in range(0, n, batch_size):
        batch = images[start : start + batch_size]
        x = batch.to(dev, non_blocking=True).float().div_(255.0)
        x = x.sub_(mean_t).div_(std_t)
        feats = encode(x)
        if not isinstance(feats, torch.Tensor):
            raise ValueError(f"encode must return a tensor, got {type(feats).__name__}")
        if feats.dim() != 2 or feats.shape[0] != batch.shape[0]:
            raise ValueError(
                f"encode must return shape (B, D) with B = {batch.shape[0]}, "
                f"got {tuple(feats.shape)}"
            )
        feats = feats.detach().to(device="cpu", dtype=torch.float32)
        if out is None:
            out = torch.empty(n, feats.shape[1], dtype=torch.float32)
        elif feats.shape[1] != out.shape[1]:
            raise ValueError(
                f"encode returned {feats.shape[1]} features for a batch, "
                f"{out.shape[1]} for an earlier one"
            )
        out[start : start + batch.shape[0]] = feats
    return cast(torch.Tensor, out)  # n >= 1, so the loop ran at least once


def _check_features(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_TYPES:
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_labels(labels: torch.Tensor, name: str, n: int, num_classes: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if n > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, {num_classes - 1}], got values in [{lo}, {hi}]"
            )


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    *,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN labels for ``query`` (M, D) against ``bank`` (N, D).

    Both are L2-normalised here. For each query the ``min(k, N)`` bank rows of
    highest cosine similarity vote with weight ``exp(sim / t)``;
    ``score_c`` is the summed weight of neighbours labelled ``c`` and the
    prediction is ``argmax_c score_c`` (ties go to the lowest class index).
    Weights are computed as ``exp((sim - max_sim) / t)``, the same scores up to a
    positive per-query factor, so small ``t`` cannot overflow.

    Work runs on ``bank.device`` in chunks of ``chunk`` queries (float64 if
    either input is float64, else float32). Returns int64 labels (M,) on
    ``query.device``.
    """
    _check_features(query, "query")
    _check_features(bank, "bank")
    _check_num_classes(num_classes)
    if query.shape[1] != bank.shape[1]:
        raise ValueError(
            f"query and bank must have the same feature dimension, "
            f"got {query.shape[1]} and {bank.shape[1]}"
        )
    if bank.shape[0] == 0:
        raise ValueError("bank is empty (N = 0)")
    _check_labels(bank_labels, "bank_labels", bank.shape[0], num_classes)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"t must be a finite number > 0, got {t!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")

    dtype = torch.float64 if torch.float64 in (query.dtype, bank.dtype) else torch.float32
    dev = bank.device
    bank_n = F.normalize(bank.to(dtype), dim=1)
    labels = bank_labels.to(device=dev, dtype=torch.long)
    k_eff = min(k, bank.shape[0])
    m = query.shape[0]
    preds = torch.empty(m, dtype=torch.long, device=dev)
    for start in range(0, m, chunk):
        q = F.normalize(query[start : start + chunk].to(device=dev, dtype=dtype), dim=1)
        sim = q @ bank_n.T  # (c, N)
        top_sim, top_idx = sim.topk(k_eff, dim=1)  # sorted, descending
        weights = ((top_sim - top_sim[:, :1]) / t).exp()  # (c, k_eff), max weight 1
        scores = torch.zeros(q.shape[0], num_classes, dtype=dtype, device=dev)
        scores.scatter_add_(1, labels[top_idx], weights)
        preds[start : start + q.shape[0]] = scores.argmax(dim=1)
    return preds.to(query.device)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy in percent (0..100) of :func:`knn_predict` with the
    training features (N, D) as bank and the test features (M, D) as queries."""
    _check_features(test_feats, "test_feats")
    _check_num_classes(num_classes)
    if test_feats.shape[0] == 0:
        raise ValueError("test_feats is empty (M = 0)")
    _check_labels(test_labels, "test_labels", test_feats.shape[0], num_classes)
    preds = knn_predict(
        test_feats, train_feats, train_labels, num_classes, k=k, t=t, chunk=chunk
    )
    correct = int((preds.cpu() == test_labels.cpu().long()).sum())
    return 100.0 * correct / test_feats.shape[0]


def stratified_subset(labels: torch.Tensor, n: int, seed: int = 0x7E57) -> "np.ndarray":
    """Sorted indices of ``n`` items drawn class by class in turn (a fixed, seeded draw).

    Every class's indices are shuffled by a generator of its own seed, then the classes are
    visited round-robin: with balanced classes the per-class counts differ by at most one.
    The draw does not depend on the run's seed, so every run is evaluated on the same items.
    """
    import numpy as np

    lab = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if n >= lab.size:
        return np.arange(lab.size)
    pools = []
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        pools.append(idx[np.random.default_rng([seed, int(c)]).permutation(idx.size)])
    width = max(p.size for p in pools)
    table = np.full((width, len(pools)), -1, dtype=np.int64)
    for j, p in enumerate(pools):
        table[: p.size, j] = p
    order = table.reshape(-1)
    order = order[order >= 0]
    return np.sort(order[:n])
