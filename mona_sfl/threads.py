"""Torch intra-op threads per phase: the same count for the same computation in every process.

Torch's CPU kernels split reductions by thread count, so bit-identical results across
runtimes need client compute to run with ``train.client_threads`` threads and server compute
with ``train.server_threads`` threads wherever they run (the driver, a Ray actor, a Flower
ClientApp). ``0`` means every CPU this process may use.

This module imports torch lazily.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve(n: int) -> int:
    return cpus() if n <= 0 else int(n)


def set_threads(n: int) -> None:
    import torch

    n = resolve(n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads (0 = all CPUs), then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


__all__ = ["cpus", "resolve", "set_threads", "threads"]
