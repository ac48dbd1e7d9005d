"""``mona-sfl transfer RUN_DIR``: adapt a run's backbone to a labelled target set (linear probe,
singular-value fine-tuning at several shares, full fine-tuning) and print each one's trainable
parameters and test accuracy."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mona_sfl.errors import ConfigError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_parser(sub: Any) -> None:
    t = sub.add_parser("transfer", help="adapt a run's backbone to a labelled target set: linear probe, SVF, full fine-tuning")
    t.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (its synced client front + server body); writes transfer.json into it")
    t.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
        help="the target set, as data.* keys over the run's config (default: the run's own dataset); repeatable",
    )
    labels = t.add_mutually_exclusive_group()
    labels.add_argument("--labels-per-class", type=int, default=0, help="labelled training images per class (default 10 when neither is given)")
    labels.add_argument("--label-fraction", type=float, default=0.0, help="share of each class's training images that are labelled, e.g. 0.01")
    t.add_argument("--methods", type=_names, default=("linear", "svf", "full"), help="comma-separated: linear, svf, full (default all)")
    t.add_argument("--shares", type=_floats, default=(0.1, 0.2, 0.4), help="SVF: trained share of each matrix's singular values (default 0.1,0.2,0.4)")
    t.add_argument("--epochs", type=int, default=10, help="training epochs over the labelled images (default 10)")
    t.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    t.add_argument("--lr-head", type=float, default=0.1, help="learning rate of the linear head (default 0.1)")
    t.add_argument("--lr-svf", type=float, default=0.1, help="learning rate of the singular values (default 0.1, the paper's)")
    t.add_argument("--lr-full", type=float, default=0.01, help="learning rate of the backbone in full fine-tuning (default 0.01)")
    t.add_argument("--seed", type=int, default=0, help="seed of the labelled draw, the head and the batch order (default 0)")
    t.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")


def run(args: argparse.Namespace) -> int:
    from mona_sfl.checkpoint import load_run_config, lock_run_dir
    from mona_sfl.eval.transfer import METHODS, TRANSFER_JSON, transfer_run

    for m in args.methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: '{m}' is not one of {', '.join(METHODS)}")
    if not args.methods:
        raise ConfigError("--methods: name at least one of linear, svf, full")
    for s in args.shares:
        if not 0 < s <= 1:
            raise ConfigError(f"--shares: each share must be in (0, 1], got {s}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr_head", "lr_svf", "lr_full"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.labels_per_class < 0 or not 0 <= args.label_fraction <= 1:
        raise ConfigError("--labels-per-class must be >= 0 and --label-fraction in [0, 1]")
    per_class = args.labels_per_class if (args.labels_per_class or args.label_fraction) else 10
    load_run_config(Path(args.run_dir))  # a missing or foreign folder is refused, not created by the lock
    with lock_run_dir(Path(args.run_dir), "the transfer"):  # no training writing it while transfer.json is written
        res = transfer_run(
            args.run_dir,
            args.overrides,
            labels_per_class=per_class,
            label_fraction=args.label_fraction,
            methods=tuple(args.methods),
            shares=tuple(args.shares),
            device=args.device,
            seed=args.seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr_head=args.lr_head,
            lr_svf=args.lr_svf,
            lr_full=args.lr_full,
        )
    m = res.meta
    print(
        f"transfer of {m['run_dir']} (step {m['checkpoint_step']}) to {m['target']}: {m['labelled']} labelled images "
        f"({m['classes']} classes), {m['test']} test images, {args.epochs} epochs"
    )
    print(f"{'method':<10} {'share':>6} {'trainable':>11} {'of backbone':>12} {'top1 %':>8} {'train %':>8} {'s':>7}")
    for r in res.rows:
        share = f"{r.share:g}" if r.share is not None else "-"
        print(f"{r.method:<10} {share:>6} {r.trainable:>11,} {r.backbone_params:>12,} {r.top1:>8.2f} {r.train_top1:>8.2f} {r.seconds:>7.1f}")
    print(f"written to {Path(args.run_dir) / TRANSFER_JSON}")
    return 0
