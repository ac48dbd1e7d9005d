"""MoCo building blocks: InfoNCE loss, the key queue, the EMA update. Pure tensor code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """Mean MoCo InfoNCE loss.

    Shape:
        q: (n, dim) L2-normalised queries (with graph).
        k: (n, dim) L2-normalised positive keys (no graph needed).
        queue: (dim, K) L2-normalised negatives, as they were before this step's enqueue.
    Returns the mean over the n rows of CE([q.k, q.queue] / T, label 0).
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (n, 1)
    l_neg = q @ queue  # (n, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / T  # (n, 1 + K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


class KeyQueue(nn.Module):
    """FIFO queue of K keys of size dim, stored as buffers so it lives in a state_dict.

    Initialised with standard-normal columns, L2-normalised along dim 0 (reference).
    """

    queue: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, dim: int, K: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if dim < 1 or K < 1:
            raise ValueError(f"KeyQueue needs dim >= 1 and K >= 1, got dim={dim}, K={K}")
        q = torch.randn(dim, K, generator=generator)
        self.register_buffer("queue", F.normalize(q, dim=0))  # (dim, K)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def K(self) -> int:
        return self.queue.shape[1]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys (n, dim) at the pointer, wrapping around; if n > K only the last K stay."""
        n = keys.shape[0]
        K = self.K
        if n >= K:
            keys = keys[n - K :]
            start = (int(self.ptr) + n - K) % K
            idx = (torch.arange(K, device=keys.device) + start) % K
        else:
            idx = (torch.arange(n, device=keys.device) + int(self.ptr)) % K
        self.queue[:, idx] = keys.t().to(self.queue.dtype)
        self.ptr.fill_((int(self.ptr) + n) % K)


@torch.no_grad()
def ema_update(momentum: nn.Module, online: nn.Module, m: float) -> None:
    """momentum <- m * momentum + (1 - m) * online, over parameters only (not buffers)."""
    mp = [p for p in momentum.parameters()]
    op = [p.detach() for p in online.parameters()]
    if len(mp) != len(op):
        raise ValueError("ema_update: online and momentum models have different parameter lists")
    ema_update_tensors(mp, op, m)


@torch.no_grad()
def ema_update_tensors(mp: list[torch.Tensor], op: list[torch.Tensor], m: float) -> None:
    """mp[i] <- m * mp[i] + (1 - m) * op[i] for matching lists of tensors (any number of fronts at once)."""
    if m == 1.0:
        return
    if m == 0.0:
        torch._foreach_copy_(mp, op)
        return
    torch._foreach_mul_(mp, m)
    torch._foreach_add_(mp, op, alpha=1.0 - m)
