"""When things happen: client sampling, steps per epoch, total steps, syncs, learning rates.

One :class:`Schedule` per run, built from the config and the number of training images.
The engine runs it, :mod:`mona_sfl.comms` counts bytes from it, and the runtimes' byte
ledger follows the same :class:`SyncLedger`, so the analytic figures cannot drift from
what a run does.

The rules (reference semantics, ``docs/algorithm.md`` sections 1.2-1.5):

* an epoch samples its clients once (:func:`sample_clients`, a pure function of the seed and
  the epoch) and runs ``steps_per_epoch`` steps, ``train.steps_per_epoch`` or
  ``ceil(mean client size / batch)``;
* the run stops after ``train.epochs`` epochs or ``train.max_steps`` steps;
* a sync happens every ``fed.sync_every`` steps of an epoch, at every epoch's last step and
  at the run's last step;
* the server LR follows a cosine over epochs, stepped once per epoch; the client LR the same
  (``train.client_schedule = "epoch"``) or the reference's per-step periodic cosine with
  ``T_max = train.epochs`` (``"reference"``).

This module imports neither torch nor any runtime (numpy only inside :func:`sample_clients`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mona_sfl.registry import Choices

if TYPE_CHECKING:
    from mona_sfl.config import Config

#: ``train.client_schedule``: ``epoch`` (cosine over epochs) or ``reference`` (per-step periodic cosine).
CLIENT_SCHEDULES = Choices("train.client_schedule", ("epoch", "reference"))
#: ``train.client_batching``: a host's clients ``off`` one after another, ``on`` as one batched
#: pass (:mod:`mona_sfl.core.batched`); the same schedule either way.
CLIENT_BATCHING = Choices("train.client_batching", ("off", "on"))


def cosine_lr(base: float, t: float, t_max: int) -> float:
    """CosineAnnealingLR's closed form: base * (1 + cos(pi * t / t_max)) / 2."""
    return base * (1.0 + math.cos(math.pi * t / t_max)) / 2.0


def sample_clients(seed: int, epoch: int, num_clients: int, k: int) -> list[int]:
    """The clients of one epoch: a pure function of (seed, epoch), so nothing to checkpoint."""
    if k >= num_clients:
        return list(range(num_clients))
    import numpy as np

    rng = np.random.default_rng([seed, 0x5A3, epoch])
    return [int(i) for i in rng.choice(num_clients, size=k, replace=False)]


def epoch_length(num_images: int, num_clients: int, batch_size: int, override: int = 0) -> int:
    """``override`` if > 0, else ``ceil(mean client size / batch_size)``.

    Every partition assigns every image exactly once, so the mean client size is
    ``num_images / num_clients`` whatever the partition.
    """
    if override > 0:
        return int(override)
    return max(1, math.ceil(num_images / num_clients / batch_size))


def syncs_in(steps: int, every: int) -> int:
    """Syncs in an epoch that runs ``steps`` steps: every ``every`` steps, and at its last step."""
    if steps <= 0:
        return 0
    if every <= 0:
        return 1
    return steps // every + (1 if steps % every else 0)


@dataclass(frozen=True)
class Schedule:
    """The timetable of one run (see the module docstring)."""

    seed: int
    num_clients: int
    clients_per_epoch: int
    epochs: int
    steps_per_epoch: int
    max_steps: int = 0
    sync_every: int = 0
    lr: float = 0.06
    client_lr: float = 0.06
    client_schedule: str = "epoch"

    @classmethod
    def from_config(cls, cfg: "Config", num_images: int | None = None, *, steps_per_epoch: int | None = None) -> "Schedule":
        """The schedule of ``cfg`` for ``num_images`` training images (or a given ``steps_per_epoch``)."""
        if steps_per_epoch is None:
            if num_images is None:
                raise ValueError("Schedule.from_config needs num_images or steps_per_epoch")
            steps_per_epoch = epoch_length(num_images, cfg.fed.num_clients, cfg.train.batch_size, cfg.train.steps_per_epoch)
        return cls(
            seed=cfg.seed,
            num_clients=cfg.fed.num_clients,
            clients_per_epoch=cfg.clients_per_epoch,
            epochs=cfg.train.epochs,
            steps_per_epoch=int(steps_per_epoch),
            max_steps=cfg.train.max_steps,
            sync_every=cfg.fed.sync_every,
            lr=cfg.train.lr,
            client_lr=cfg.client_lr,
            client_schedule=cfg.train.client_schedule,
        )

    # ------------------------------------------------------------------ steps and epochs
    @property
    def total_steps(self) -> int:
        total = self.epochs * self.steps_per_epoch
        return min(total, self.max_steps) if self.max_steps else total

    @property
    def epochs_run(self) -> int:
        """Epochs begun (the last one may be cut short by ``max_steps``)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps epoch ``epoch`` runs (``steps_per_epoch``, fewer in a last one cut by ``max_steps``)."""
        start = epoch * self.steps_per_epoch
        return max(0, min(self.steps_per_epoch, self.total_steps - start))

    def pool(self, epoch: int) -> list[int]:
        """The clients sampled for ``epoch``."""
        return sample_clients(self.seed, epoch, self.num_clients, self.clients_per_epoch)

    # ------------------------------------------------------------------ syncs
    def sync_due(self, step_in_epoch: int, global_step: int) -> bool:
        """Whether the step that made ``step_in_epoch`` steps of its epoch (1-based) and
        ``global_step`` steps of the run ends with a sync."""
        return (
            step_in_epoch >= self.steps_per_epoch
            or global_step >= self.total_steps
            or (self.sync_every > 0 and step_in_epoch % self.sync_every == 0)
        )

    def sync_note(self) -> str | None:
        """A sentence when ``fed.sync_every`` is longer than an epoch (the clients then sync at
        every epoch end, more often than asked); None otherwise."""
        if self.sync_every > self.steps_per_epoch:
            return (
                f"fed.sync_every={self.sync_every} is longer than an epoch ({self.steps_per_epoch} steps): the clients sync at "
                f"every epoch end, every {self.steps_per_epoch} steps (more images per client, e.g. a larger data.proportion, "
                f"make epochs longer)"
            )
        return None

    def syncs_in_epoch(self, epoch: int) -> int:
        return syncs_in(self.steps_in_epoch(epoch), self.sync_every)

    @property
    def total_syncs(self) -> int:
        full, rem = divmod(self.total_steps, self.steps_per_epoch)
        return full * syncs_in(self.steps_per_epoch, self.sync_every) + syncs_in(rem, self.sync_every)

    def catchup_downloads(self) -> int:
        """Downloads of the latest average by sampled clients that missed syncs (0 when every
        client takes part in every epoch), following the run's client draws."""
        if self.clients_per_epoch >= self.num_clients:
            return 0
        ledger = SyncLedger(self.num_clients)
        count = 0
        for e in range(self.epochs_run):
            pool = self.pool(e)
            count += len(ledger.stale(pool))
            ledger.mark(pool)
            ledger.synced(pool, times=self.syncs_in_epoch(e))
        return count

    # ------------------------------------------------------------------ learning rates
    def server_lr(self, epoch: int) -> float:
        return server_lr(self.lr, epoch, self.epochs)

    def client_epoch_lr(self, epoch: int) -> float | None:
        return client_epoch_lr(self.client_schedule, self.client_lr, epoch, self.epochs)

    def client_step_lr(self, steps: int) -> float | None:
        return client_step_lr(self.client_schedule, self.client_lr, steps, self.epochs)


def server_lr(base: float, epoch: int, epochs: int) -> float:
    """The server LR of ``epoch``: a cosine over epochs, stepped once per epoch (reference)."""
    return cosine_lr(base, epoch, epochs)


def client_epoch_lr(kind: str, base: float, epoch: int, epochs: int) -> float | None:
    """The client LR set at the start of ``epoch`` under ``kind = "epoch"``; None under ``"reference"``."""
    return cosine_lr(base, epoch, epochs) if kind == "epoch" else None


def client_step_lr(kind: str, base: float, steps: int, epochs: int) -> float | None:
    """The client LR of a client's optimizer step number ``steps`` under ``kind = "reference"``
    (CosineAnnealingLR(T_max=epochs) stepped once per client step: periodic, reaching 0 every
    ``epochs`` steps); None under ``"epoch"``."""
    return cosine_lr(base, steps, epochs) if kind == "reference" else None


class SyncLedger:
    """Which clients hold the latest global fronts: the catch-up downloads of the byte ledger.

    ``syncs`` counts the syncs so far; a client whose ``seen`` count is lower missed some (it
    was not sampled, or was lost) and downloads the latest average once when it is next
    sampled.
    """

    def __init__(self, num_clients: int) -> None:
        self.syncs = 0
        self.seen = [0] * int(num_clients)

    def stale(self, clients: Iterable[int]) -> list[int]:
        return [c for c in clients if self.seen[c] < self.syncs]

    def mark(self, clients: Iterable[int]) -> None:
        for c in clients:
            self.seen[c] = self.syncs

    def synced(self, clients: Iterable[int], times: int = 1) -> None:
        """``times`` syncs happened, which ``clients`` took part in."""
        self.syncs += int(times)
        self.mark(clients)

    def state_dict(self) -> dict[str, Any]:
        return {"syncs": self.syncs, "seen": {str(c): v for c, v in enumerate(self.seen)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.syncs = int(state.get("syncs", 0))
        seen = state.get("seen", {})
        self.seen = [int(seen.get(str(c), self.syncs)) for c in range(len(self.seen))]


__all__ = ["CLIENT_BATCHING", "CLIENT_SCHEDULES", "Schedule", "SyncLedger", "client_epoch_lr", "client_step_lr", "cosine_lr", "server_lr", "sample_clients", "epoch_length", "syncs_in"]
