"""Communication accounting: analytic bytes per step, per sync, per epoch and per run.

Everything is float32 (4 bytes per entry); integer buffers of a front's state dict (e.g.
BatchNorm's ``num_batches_tracked``, int64) count 8 bytes. Per **participating client**
(algorithm.md 6.2, "per-step traffic in the training code"):

* per step, **up**: the query and key activations ``a_q`` and ``a_k``, each ``(B_c, C, H, W)``:
  ``2 * B_c * numel(act) * 4`` bytes, with ``B_c = 2B`` under ``algo.symmetric = "client"``
  (client-side doubling) and ``B_c = B`` otherwise;
* per step, **down**: the gradient of ``a_q``: ``B_c * numel(act) * 4``;
* per sync, the online front's state dict up (for FedAvg) and the average down; under
  MonAcoSFL (``algo.align_momentum``) also the momentum front up and its average down.

Whole-run totals multiply by the participating clients (``cfg.clients_per_epoch``), the
steps and the syncs the engine performs: a sync every ``fed.sync_every`` steps within an
epoch, always at an epoch's last step and at the run's last step
(``train.max_steps``). A client that missed syncs (not sampled) downloads the latest
average once when it is next sampled (``catchup_downloads``; 0 when every client takes
part in every epoch). Initial weights are built from the seed everywhere and not counted.

Steps per epoch (the engine's ``build.steps_per_epoch``): the ``steps_per_epoch`` argument
if given, else ``train.steps_per_epoch`` if > 0, else ``ceil(n_train / num_clients / B)``
where ``n_train`` is the training-set size after ``data.proportion``. Every partition method
assigns every image, so the mean client size is ``n_train / num_clients`` and no image has
to be loaded: ``synthetic`` uses ``data.synthetic_size``, CIFAR-10/100 50,000, SVHN 73,257,
STL-10 5,000 (pass ``num_train`` for subsets of your own); only ``imagefolder`` (size
unknown) loads the training set.

What every runtime counts (``Trainer.runtime.bytes``, the sharded runtime's byte ledger,
the same in ``local``, ``ray`` and ``flower``) equals ``counted_up_total`` /
``counted_down_total`` / ``counted_sync_total`` when every client's size is a multiple of the
batch size B. Otherwise a client's last batch of each pass over its images holds the
remainder, and the runtimes count that smaller batch: the per-step figures here assume full
batches and are an upper bound (5,000 images on 5 clients at B = 32: 31 batches of 32 and one
of 8 per pass, so 2.4% fewer activation bytes than counted here). These equal the protocol
totals except that under MocoSFL the runtimes also upload every client's momentum front at
each sync: the engine gathers it for the divergence (misalignment) metrics, which a
deployment would not need (``monitor_up_per_client``).

Steps, syncs and catch-up downloads come from the run's :class:`~mona_sfl.core.schedule.Schedule`,
the one the engine runs.

:func:`reference_overhead` reproduces MocoSFL's ``overhead_calculator.py`` (algorithm.md
6.1) for comparison; it undercounts (no key activations, no symmetric doubling, no momentum
sync).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from mona_sfl.config import Config
from mona_sfl.core.schedule import Schedule, epoch_length, syncs_in
from mona_sfl.data import TRAIN_SIZES
from mona_sfl.errors import ConfigError
from mona_sfl.models import NUM_CUTS

FLOAT_BYTES = 4
MB = 2**20  # the reference calculator's "MB"


# --------------------------------------------------------------------------- sizes


@functools.lru_cache(maxsize=64)
def _unit_buffers(arch: str, width: float, norm: str, weight_std: bool) -> tuple[tuple[int, int, int], ...]:
    """Per backbone unit: (float entries, int entries, int bytes) of its state dict (meta build)."""
    import torch

    from mona_sfl.models.backbones import build_backbone

    with torch.device("meta"):
        backbone = build_backbone(arch, width=width, norm=norm, weight_std=weight_std)
    out = []
    for unit in backbone:
        sd = unit.state_dict()
        fl = sum(t.numel() for t in sd.values() if t.is_floating_point())
        ints = [t for t in sd.values() if not t.is_floating_point()]
        out.append((fl, sum(t.numel() for t in ints), sum(t.numel() * t.element_size() for t in ints)))
    return tuple(out)


def _info(cfg: Config, cut: int | None = None):
    from mona_sfl.build import split_info

    return split_info(cfg, cut)


def front_state_bytes(cfg: Config, cut: int | None = None) -> int:
    """Bytes of one client front's state dict: ``client_state_numel`` float32 + integer buffers."""
    m = cfg.model
    c = m.cut if cut is None else cut
    ints = sum(b[2] for b in _unit_buffers(m.arch, float(m.width), m.norm, bool(m.weight_std))[:c])
    return _info(cfg, c).client_state_numel * FLOAT_BYTES + ints


def train_size(cfg: Config, num_train: int | None = None) -> int | None:
    """Training images after ``data.proportion`` without loading them (None: unknown, imagefolder)."""
    d = cfg.data
    if num_train is not None:
        n = int(num_train)
    elif d.name == "synthetic":
        n = d.synthetic_size
    elif d.name in TRAIN_SIZES:
        n = TRAIN_SIZES[d.name]
    else:
        return None
    return max(1, int(n * d.proportion)) if d.proportion < 1.0 else n


def resolve_steps_per_epoch(cfg: Config, steps_per_epoch: int | None = None, num_train: int | None = None) -> int:
    """The engine's steps per epoch, computed without loading images where possible (module doc)."""
    if steps_per_epoch is not None:
        if steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        return int(steps_per_epoch)
    if cfg.train.steps_per_epoch > 0:
        return cfg.train.steps_per_epoch
    n = train_size(cfg, num_train)
    if n is None:  # imagefolder: the size is only known from the files
        from mona_sfl import build

        if not cfg.data.dir:
            raise ConfigError(
                f"data.name='{cfg.data.name}' has no known size: set data.dir=PATH (its images are counted), "
                "train.steps_per_epoch=N, or pass --steps-per-epoch N"
            )
        train = build.load_data(cfg, "train")
        return build.steps_per_epoch(cfg, build.client_partition(cfg, train.labels, len(train.classes)))
    return epoch_length(n, cfg.fed.num_clients, cfg.train.batch_size)


# --------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class CommCosts:
    """Analytic bytes of one configuration (see the module docstring for the rules)."""

    arch: str
    cut: int
    width: float
    method: str  # MonAcoSFL | MocoSFL
    symmetric: str
    activation_shape: tuple[int, int, int]
    activation_numel: int
    client_params: int
    client_state_numel: int
    front_bytes: int  # one front state dict
    batch_per_client: int  # B_c
    clients_per_step: int
    up_per_client_step: int
    down_per_client_step: int
    sync_up_per_client: int
    sync_down_per_client: int
    monitor_up_per_client: int  # MocoSFL: momentum front gathered for the divergence metrics only
    steps_per_epoch: int
    syncs_per_epoch: int  # in a full epoch
    epochs: int  # epochs begun (the last one may be cut short by train.max_steps)
    total_steps: int
    total_syncs: int
    catchup_downloads: int  # downloads of the average by clients that missed syncs

    # per step
    @property
    def bytes_per_client_step(self) -> int:
        return self.up_per_client_step + self.down_per_client_step

    @property
    def up_per_step(self) -> int:
        return self.up_per_client_step * self.clients_per_step

    @property
    def down_per_step(self) -> int:
        return self.down_per_client_step * self.clients_per_step

    @property
    def bytes_per_step(self) -> int:
        return self.up_per_step + self.down_per_step

    # per sync
    @property
    def sync_per_client(self) -> int:
        return self.sync_up_per_client + self.sync_down_per_client

    @property
    def bytes_per_sync(self) -> int:
        return self.sync_per_client * self.clients_per_step

    # per epoch (a full epoch, without catch-up downloads)
    @property
    def bytes_per_epoch(self) -> int:
        return self.steps_per_epoch * self.bytes_per_step + self.syncs_per_epoch * self.bytes_per_sync

    # whole run
    @property
    def latent_total(self) -> int:
        return self.total_steps * self.bytes_per_step

    @property
    def weights_total(self) -> int:
        return self.total_syncs * self.bytes_per_sync + self.catchup_downloads * self.sync_down_per_client

    @property
    def bytes_total(self) -> int:
        return self.latent_total + self.weights_total

    @property
    def counted_up_total(self) -> int:
        return self.total_steps * self.up_per_step

    @property
    def counted_down_total(self) -> int:
        return self.total_steps * self.down_per_step

    @property
    def counted_sync_total(self) -> int:
        return self.weights_total + self.total_syncs * self.clients_per_step * self.monitor_up_per_client

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["activation_shape"] = list(self.activation_shape)
        for name in (
            "bytes_per_client_step", "up_per_step", "down_per_step", "bytes_per_step", "sync_per_client",
            "bytes_per_sync", "bytes_per_epoch", "latent_total", "weights_total", "bytes_total",
            "counted_up_total", "counted_down_total", "counted_sync_total",
        ):
            d[name] = getattr(self, name)
        return d


def comm_costs(cfg: Config, *, steps_per_epoch: int | None = None, num_train: int | None = None) -> CommCosts:
    """Analytic communication of ``cfg`` (float32; see the module docstring).

    ``steps_per_epoch`` overrides the computed value (pass ``build.steps_per_epoch`` when the
    data partition is at hand); ``num_train`` gives the training-set size (before
    ``data.proportion``) when it is not the standard one.
    """
    info = _info(cfg)
    front = front_state_bytes(cfg)
    align = cfg.algo.align_momentum
    b_c = 2 * cfg.train.batch_size if cfg.algo.symmetric == "client" else cfg.train.batch_size
    act = info.activation_numel * FLOAT_BYTES
    sched = Schedule.from_config(cfg, steps_per_epoch=resolve_steps_per_epoch(cfg, steps_per_epoch, num_train))
    fronts = 2 if align else 1
    return CommCosts(
        arch=cfg.model.arch,
        cut=cfg.model.cut,
        width=cfg.model.width,
        method=cfg.method,
        symmetric=cfg.algo.symmetric,
        activation_shape=info.activation_shape,
        activation_numel=info.activation_numel,
        client_params=info.client_params,
        client_state_numel=info.client_state_numel,
        front_bytes=front,
        batch_per_client=b_c,
        clients_per_step=cfg.clients_per_epoch,
        up_per_client_step=2 * b_c * act,
        down_per_client_step=b_c * act,
        sync_up_per_client=fronts * front,
        sync_down_per_client=fronts * front,
        monitor_up_per_client=0 if align else front,
        steps_per_epoch=sched.steps_per_epoch,
        syncs_per_epoch=syncs_in(sched.steps_per_epoch, sched.sync_every),
        epochs=sched.epochs_run,
        total_steps=sched.total_steps,
        total_syncs=sched.total_syncs,
        catchup_downloads=sched.catchup_downloads(),
    )


def fmt_bytes(n: float) -> str:
    """Human-readable binary units (B, KiB, MiB, GiB, TiB)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"  # pragma: no cover


def _with_cut(cfg: Config, cut: int) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cut=cut))


def comm_table(cfg: Config, *, steps_per_epoch: int | None = None, num_train: int | None = None, exact: bool = False) -> str:
    """A table over cuts 1..9 for the config's arch, width, batch, clients and schedule.

    Per step and per sync: one participating client. Per epoch and total: all participating
    clients, the whole run. ``*`` marks the cut with the smallest total.
    """
    spe = resolve_steps_per_epoch(cfg, steps_per_epoch, num_train)
    rows = [comm_costs(_with_cut(cfg, c), steps_per_epoch=spe) for c in range(1, NUM_CUTS + 1)]
    fmt = (lambda n: str(int(n))) if exact else fmt_bytes
    best = min(r.bytes_total for r in rows)
    r0 = rows[0]
    head = [
        f"{r0.method}, {cfg.model.arch} width {cfg.model.width}, {cfg.data.image_size}px input, batch {cfg.train.batch_size} "
        f"per client (B_c = {r0.batch_per_client}, symmetric={cfg.algo.symmetric}), {r0.clients_per_step} of "
        f"{cfg.fed.num_clients} clients per step",
        f"{r0.total_steps} steps ({r0.steps_per_epoch}/epoch), {r0.total_syncs} syncs ({r0.syncs_per_epoch}/epoch"
        + (f", sync every {cfg.fed.sync_every} steps" if cfg.fed.sync_every else ", at epoch ends")
        + "), float32; up/down/sync per participating client, epoch/total over all clients",
    ]
    cols = ["cut", "activation", "client params", "up/step", "down/step", "sync", "epoch", "total"]
    table = []
    for r in rows:
        c, h, w = r.activation_shape
        table.append(
            [
                str(r.cut),
                f"{c}x{h}x{w}",
                f"{r.client_params:,}",
                fmt(r.up_per_client_step),
                fmt(r.down_per_client_step),
                fmt(r.sync_per_client),
                fmt(r.bytes_per_epoch),
                fmt(r.bytes_total) + (" *" if r.bytes_total == best else ""),
            ]
        )
    widths = [max(len(cols[i]), *(len(t[i]) for t in table)) for i in range(len(cols))]
    line = lambda cells: "  ".join(c.rjust(widths[i]) if i != 1 else c.ljust(widths[i]) for i, c in enumerate(cells))  # noqa: E731
    return "\n".join(head + [line(cols), line(["-" * w for w in widths])] + [line(t) for t in table])


# --------------------------------------------------------------------------- the reference formula


@dataclass(frozen=True)
class ReferenceOverhead:
    """MocoSFL ``overhead_calculator.py`` numbers (MB = 2**20 bytes, float32)."""

    arch: str
    cut: int
    weights_mb: float
    latent_mb: float
    total_mb: float
    total_mb_momentum_synced: float  # weights counted twice (MonAcoSFL also syncs the momentum front)


def reference_overhead(
    arch: str,
    cut: int,
    *,
    width: float = 1.0,
    norm: str = "group",
    weight_std: bool = True,
    input_size: int = 32,
    num_epoch_per_client: int = 200,
    num_data_per_client: int = 50,
    sync_frequency: int = 1,
) -> ReferenceOverhead:
    """``weights = (epochs // sync_frequency) * numel(client state_dict)``;
    ``latent = 2 * epochs * data_per_client * numel(activation per sample)``; both * 4 / 2**20.

    Defaults are the calculator's (1000 clients x 50 images, one sync per epoch, 200
    epochs). ``numel(state_dict)`` includes integer buffers, as in the reference.
    """
    from mona_sfl.models.split import cut_info

    if sync_frequency < 1:
        raise ConfigError(f"sync_frequency must be >= 1, got {sync_frequency}")
    info = cut_info(arch, cut, input_size=input_size, width=width, norm=norm, weight_std=weight_std)
    state_numel = info.client_state_numel + sum(b[1] for b in _unit_buffers(arch, float(width), norm, bool(weight_std))[:cut])
    weights = (num_epoch_per_client // sync_frequency) * state_numel * FLOAT_BYTES / MB
    latent = 2 * num_epoch_per_client * num_data_per_client * info.activation_numel * FLOAT_BYTES / MB
    return ReferenceOverhead(arch, int(cut), weights, latent, weights + latent, 2 * weights + latent)


def reference_table(arch: str, *, width: float = 1.0, norm: str = "group", weight_std: bool = True, input_size: int = 32) -> str:
    """algorithm.md 6.2 style table of :func:`reference_overhead` over cuts 1..9."""
    rows = [reference_overhead(arch, c, width=width, norm=norm, weight_std=weight_std, input_size=input_size) for c in range(1, NUM_CUTS + 1)]
    best = min(r.total_mb for r in rows)
    out = [
        f"MocoSFL overhead_calculator formula ({arch} width {width}; 200 epochs x 50 images per client, 1 sync/epoch; MB = 2^20 B)",
        f"{'cut':>3}  {'weights MB':>11}  {'latent MB':>10}  {'total MB':>10}  {'+momentum sync':>14}",
    ]
    for r in rows:
        mark = " *" if r.total_mb == best else ""
        out.append(f"{r.cut:>3}  {r.weights_mb:>11.2f}  {r.latent_mb:>10.2f}  {r.total_mb:>10.2f}  {r.total_mb_momentum_synced:>14.2f}{mark}")
    return "\n".join(out)


__all__ = [
    "CommCosts",
    "ReferenceOverhead",
    "comm_costs",
    "comm_table",
    "fmt_bytes",
    "front_state_bytes",
    "reference_overhead",
    "reference_table",
    "resolve_steps_per_epoch",
    "train_size",
]
