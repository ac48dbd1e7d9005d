"""The compute precision of the training forwards (``train.precision``).

``fp32``: everything in float32, the reference semantics; :func:`autocast` is then a no-op
context and the forwards run exactly as without it.

``bf16``: the forwards of the client fronts (per-client and batched, the recomputed one
included) and of the server net (body and projector) run under
``torch.autocast(device_type, dtype=torch.bfloat16)``, on CPU and CUDA alike. Everything
that persists stays float32: weights, gradients, optimizer state, the EMA of the momentum
fronts, BatchNorm running statistics, the key queue. The tensors that cross the cut are
float32 too (the fronts' outputs are cast up before they leave a client, the server's
activation gradients are float32 because its inputs are), so the runtimes, the messages and
the byte ledger do not depend on the setting. The InfoNCE loss (normalisation, logits,
cross-entropy) is computed in float32 from the cast-up projector outputs.

This module imports neither ray nor flwr.
"""

from __future__ import annotations

import contextlib

import torch

from mona_sfl.core import PRECISIONS


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context the training forwards run in on ``device`` under ``precision``."""
    PRECISIONS.check(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


__all__ = ["PRECISIONS", "autocast"]
