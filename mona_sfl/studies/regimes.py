"""The reference's training regimes, as presets of the split-depth study (``mona-sfl study --regime``).

MonAcoSFL's claim is about *how* clients train: how many, with which batch, how often they
sync. Each regime fixes those settings (``docs/algorithm.md`` sections 7.2-7.3) and leaves the
data (``--config`` / ``--set data.*``), width, cuts, seeds and step budget to the command line:

==============  =======  =====  ========  ===============================  ==========================
regime          clients  batch  sampled   sync                             source
==============  =======  =====  ========  ===============================  ==========================
``batch20``     5        20     all       every 10 steps and epoch end     MocoSFL's 5-client protocol
``batch2``      5        2      all       every 50 steps and epoch end     MonAcoSFL's released script
``clients20``   20       20     25%       every 12 steps and epoch end     resnet18_20_clients.sh
``clients200``  200      1      50%       every 50 steps and epoch end     resnet18_200_clients.sh
==============  =======  =====  ========  ===============================  ==========================

Every regime uses label-shard non-IID data (2 shards per client), the reference's queue and
projector (K 6000, 1024-d), its per-step client LR schedule (``train.client_schedule =
reference``) and a 200-epoch cosine (the step budget, ``train.max_steps``, ends the run long
before). kNN runs every ``curve_every`` steps for the learning curves; the divergence
metrics are logged at every sync. Everything is a ``--set`` override, so the user's own
``--set`` wins. An epoch is one pass over a client's images: with 200 clients on a
5,000-image subset it lasts 25 steps, and the epoch-end sync comes before the 50th step
(the run warns); ``clients200`` needs the whole CIFAR-10 training set
(``data.proportion=1.0``, 250 images per client) for the reference's 50-step interval.

This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass

from mona_sfl.errors import ConfigError
from mona_sfl.registry import suggest

COMMON = [
    "data.partition=noniid",
    "data.noniid_ratio=0.2",
    "algo.K=6000",
    "algo.dim=1024",
    "algo.hidden_dim=1024",
    "train.client_schedule=reference",
    "train.epochs=200",
    "train.lr=0.06",
    "eval.every=0",
]


@dataclass(frozen=True)
class Regime:
    name: str
    description: str
    overrides: tuple[str, ...]
    steps: int  # default step budget


REGIMES: dict[str, Regime] = {
    r.name: r
    for r in (
        Regime("batch20", "5 clients, batch 20, sync every 10 steps (MocoSFL's protocol)",
               ("fed.num_clients=5", "fed.sample_ratio=1.0", "train.batch_size=20", "fed.sync_every=10"), 1000),
        Regime("batch2", "5 clients, batch 2, sync every 50 steps (released MonAcoSFL script)",
               ("fed.num_clients=5", "fed.sample_ratio=1.0", "train.batch_size=2", "fed.sync_every=50"), 20000),
        Regime("clients20", "20 clients, batch 20, 25% sampled per epoch, sync every 12 steps and at epoch end",
               ("fed.num_clients=20", "fed.sample_ratio=0.25", "train.batch_size=20", "fed.sync_every=12"), 1000),
        Regime("clients200", "200 clients, batch 1, 50% sampled per epoch, sync every 50 steps",
               ("fed.num_clients=200", "fed.sample_ratio=0.5", "train.batch_size=1", "fed.sync_every=50"), 5000),
    )
}


def regime_overrides(name: str, *, steps: int | None = None, width: float | None = None, curve_every: int | None = None) -> list[str]:
    """The ``--set`` overrides of regime ``name`` with a step budget, width and kNN-curve interval.

    ``curve_every`` defaults to a tenth of the budget (at least 1); 0 turns the curves off.
    """
    if name not in REGIMES:
        raise ConfigError(f"--regime {name!r} is not a regime: choose one of {', '.join(REGIMES)}{suggest(name, list(REGIMES))}")
    r = REGIMES[name]
    budget = r.steps if steps is None else int(steps)
    if budget < 1:
        raise ConfigError(f"--steps must be >= 1, got {budget}")
    every = max(1, budget // 10) if curve_every is None else int(curve_every)
    if every < 0:
        raise ConfigError(f"--curve-every must be >= 0, got {every}")
    out = [*COMMON, *r.overrides, f"train.max_steps={budget}", f"eval.every_steps={every}"]
    if width is not None:
        if not width > 0:
            raise ConfigError(f"--width must be > 0, got {width}")
        out.append(f"model.width={width}")
    return out


__all__ = ["COMMON", "REGIMES", "Regime", "regime_overrides"]
