"""``mona-sfl comm``: analytic communication (bytes per step, sync, epoch, run) over cut layers 1..9."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from mona_sfl.cli import add_settings

    c = sub.add_parser("comm", help="analytic communication (bytes per step, sync, epoch, run) over cut layers 1..9")
    add_settings(c)
    c.add_argument("--steps-per-epoch", type=int, help="steps per epoch (default: train.steps_per_epoch or from the data size)")
    c.add_argument("--exact", action="store_true", help="print exact byte counts instead of KiB/MiB/GiB")
    c.add_argument("--reference", action="store_true", help="also print MocoSFL's overhead_calculator formula over the cuts")


def run(args: argparse.Namespace) -> int:
    from mona_sfl.comms import comm_costs, comm_table, fmt_bytes, reference_table
    from mona_sfl.config import load_config, resolve_config_path

    from mona_sfl.config import MAX_STEPS_PER_EPOCH, ConfigError

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    spe = args.steps_per_epoch
    if spe is not None and not 1 <= spe <= MAX_STEPS_PER_EPOCH:
        raise ConfigError(f"--steps-per-epoch must be in 1..{MAX_STEPS_PER_EPOCH}, got {spe}")
    print(comm_table(cfg, steps_per_epoch=spe, exact=bool(args.exact)))
    c = comm_costs(cfg, steps_per_epoch=spe)
    print(
        f"\nconfigured cut {c.cut}: {fmt_bytes(c.bytes_per_step)} per step and {fmt_bytes(c.bytes_per_sync)} per sync over "
        f"{c.clients_per_step} clients; run total {fmt_bytes(c.bytes_total)} (activations {fmt_bytes(c.latent_total)}, "
        f"fronts {fmt_bytes(c.weights_total)})"
    )
    if args.reference:
        m = cfg.model
        print()
        print(reference_table(m.arch, width=m.width, norm=m.norm, weight_std=m.weight_std, input_size=cfg.data.image_size))
    return 0
