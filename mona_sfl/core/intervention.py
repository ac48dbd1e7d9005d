"""Mini-interventions (IntervMerge, Osial et al., SDM 2025) on the smashed representation.

An :class:`Intervention` edits a slice of the channels of a front's output ``(N, C, H, W)``
at every spatial position: with ``h`` the slice's vector (``width`` channels),

    h' = h + W2ᵀ (W1 h + b - W2 h),     W1, W2: (rank, width), b: (rank,)

(the "NoReFT" form, W1 and W2 unconstrained). The other channels pass through untouched.
Initialised with ``W1 = W2`` (seeded) and ``b = 0`` it is the identity, bit for bit.

:func:`fit_intervention` trains one so that ``intervention(merged(x))`` matches
``own(x)`` (L1, Adam) on a client's own unlabeled images: the merged front personalised
towards the client's pre-merge front. Pure torch; no runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Intervention(nn.Module):
    """``h + W2ᵀ (W1 h + b - W2 h)`` on channels ``[start, start + width)`` of ``(N, C, H, W)``."""

    def __init__(self, channels: int, *, rank: int = 1, width: int = 0, start: int = 0, seed: int = 0) -> None:
        super().__init__()
        width = channels - start if width <= 0 else width
        if not (0 <= start and start + width <= channels and width >= 1):
            raise ValueError(f"intervention slice [{start}, {start + width}) does not fit {channels} channels")
        if rank < 1:
            raise ValueError(f"intervention rank must be >= 1, got {rank}")
        self.channels, self.start, self.width, self.rank = channels, start, width, rank
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(rank, width, generator=g) / width**0.5
        self.w1 = nn.Parameter(w.clone())
        self.w2 = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.zeros(rank))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.dim() != 4 or a.shape[1] != self.channels:
            raise ValueError(f"intervention expects (N, {self.channels}, H, W), got {tuple(a.shape)}")
        s, e = self.start, self.start + self.width
        h = a[:, s:e].permute(0, 2, 3, 1)  # (N, H, W, width)
        z = F.linear(h, self.w1, self.b) - F.linear(h, self.w2)  # (N, H, W, rank)
        edited = (h + F.linear(z, self.w2.t())).permute(0, 3, 1, 2)
        return torch.cat([a[:, :s], edited, a[:, e:]], dim=1)

    def extra_params(self) -> int:
        """Parameters the intervention adds: ``2 * rank * width + rank``."""
        return 2 * self.rank * self.width + self.rank


@dataclass
class InterventionFit:
    intervention: Intervention
    losses: list[float]  # L1 per step


def fit_intervention(
    merged: nn.Module,
    own: nn.Module,
    images: torch.Tensor,
    *,
    rank: int = 1,
    width: int = 0,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    init: dict[str, torch.Tensor] | None = None,
) -> InterventionFit:
    """Train an intervention on ``merged``'s output towards ``own``'s (both frozen, eval mode) on
    ``images`` (float, normalised, (N, 3, H, W)); batches drawn by a generator seeded with ``seed``.
    ``width``: the first ``width`` output channels (all of them when 0 or more than there are).
    ``init``: start from this intervention's state dict (a warm start) instead of the identity."""
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("fit_intervention needs steps >= 1, batch_size >= 1 and lr > 0")
    merged.eval()
    own.eval()
    with torch.no_grad():
        channels = int(merged(images[:1]).shape[1])
    iv = Intervention(channels, rank=rank, width=min(width, channels), seed=seed).to(images.device)
    if init is not None:
        iv.load_state_dict(init)
    opt = torch.optim.Adam(iv.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=g)
        x = images[idx.to(images.device)]
        with torch.no_grad():
            a_m, a_o = merged(x), own(x)
        loss = (iv(a_m) - a_o).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return InterventionFit(iv, losses)


__all__ = ["Intervention", "InterventionFit", "fit_intervention"]
