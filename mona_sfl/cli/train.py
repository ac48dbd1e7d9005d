"""``mona-sfl train``: a new run (``--config``, ``--set``, ``--out``) or ``--resume RUN_DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mona_sfl.errors import ConfigError


def add_parser(sub: Any) -> None:
    from mona_sfl.cli import add_settings

    t = sub.add_parser("train", help="train (or resume) a run", description="Train a run, or continue one with --resume.")
    add_settings(t)
    t.add_argument("--out", help="run folder (default: runs/<time>-<arch>-cut<N>-<method>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint (only --set train.max_steps=N may change)")
    t.add_argument("--quiet", action="store_true", help="no progress output")


def resume_max_steps(overrides: list[str]) -> int | None:
    """The one override a resume accepts: ``train.max_steps=N``."""
    max_steps = None
    for item in overrides:
        key, _, val = item.partition("=")
        if key.strip() != "train.max_steps":
            raise ConfigError(f"--set {key.strip()} cannot change a run being resumed (only train.max_steps can)")
        try:
            max_steps = int(val)
        except ValueError:
            raise ConfigError(f"--set train.max_steps={val}: value must be of type int") from None
    return max_steps


def _train(trainer: Any, resumed: bool) -> dict[str, Any]:
    try:
        return trainer.run(resumed=resumed)
    finally:
        trainer.runtime.close()  # Ray: stop the actors and the private Ray instance


def run(args: argparse.Namespace) -> int:
    from mona_sfl.checkpoint import check_new_run_dir, check_resumable, default_run_dir, lock_run_dir
    from mona_sfl.config import load_config, resolve_config_path
    from mona_sfl.interrupt import stop_on_signals

    with stop_on_signals():  # SIGINT/SIGTERM: checkpoint, then TrainingStopped
        if args.resume:
            if args.config or args.out:
                raise ConfigError("--resume takes the config and folder of the run: do not pass --config or --out with it")
            max_steps = resume_max_steps(args.overrides)
            run_dir = Path(args.resume)
            check_resumable(run_dir, max_steps)  # before the lock: a missing folder is not created
            with lock_run_dir(run_dir, "--resume"):  # one writer per folder; nothing changed before it is held
                summary = _resume(run_dir, check_resumable(run_dir, max_steps), max_steps, quiet=args.quiet)
        else:
            cfg = load_config(resolve_config_path(args.config), args.overrides)
            run_dir = Path(args.out) if args.out else default_run_dir(cfg)
            check_new_run_dir(run_dir)
            with lock_run_dir(run_dir, "training"):
                check_new_run_dir(run_dir)  # again under the lock: a run started at the same moment has it now
                summary = _new_run(cfg, run_dir, quiet=args.quiet)
    print_summary(summary, run_dir)
    return 0


def _resume(run_dir: Path, cfg: Any, max_steps: int | None, *, quiet: bool) -> dict[str, Any]:
    if cfg.runtime == "flower":
        from mona_sfl.runtime.flower.launch import resume_with_flower

        print(f"resuming {run_dir} on Flower's simulation engine", file=sys.stderr)
        return resume_with_flower(run_dir, progress=not quiet, max_steps=max_steps)
    from mona_sfl.engine import Trainer

    trainer = Trainer.resume(run_dir, progress=not quiet, max_steps=max_steps)
    print(f"resuming {run_dir} at step {trainer.global_step} (epoch {trainer.epoch})", file=sys.stderr)
    return _train(trainer, resumed=True)


def _new_run(cfg: Any, run_dir: Path, *, quiet: bool) -> dict[str, Any]:
    what = f"training {cfg.model.arch} width {cfg.model.width} cut {cfg.model.cut} ({cfg.method}), {cfg.fed.num_clients} clients, "
    if cfg.runtime == "flower":
        from mona_sfl.runtime.flower.launch import train_with_flower

        if cfg.data.name != "imagefolder":  # fail in seconds, not after starting Flower (decoding folders twice costs more)
            from mona_sfl import build

            train = build.load_data(cfg, "train")
            build.client_partition(cfg, train.labels, len(train.classes))
        print(f"{what}runtime flower (simulation engine, {cfg.num_nodes} SuperNodes), data {cfg.data.name}", file=sys.stderr)
        return train_with_flower(cfg, run_dir, progress=not quiet)
    from mona_sfl.engine import Trainer

    trainer = Trainer(cfg, run_dir, progress=not quiet)
    print(f"{what}{trainer.total_steps} steps, runtime {cfg.runtime}, device {trainer.device}, data {cfg.data.name}", file=sys.stderr)
    return _train(trainer, resumed=False)


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """The lines every training command ends with."""
    chance = 100.0 / int(summary["num_classes"])
    init = summary.get("knn_top1_init")
    init_txt = f"at initialisation {init:.2f}%, " if init is not None else ""
    print(f"kNN top-1 accuracy: {summary['knn_top1']:.2f}% ({init_txt}chance {chance:.2f}%)")
    if "linear_top1" in summary:
        print(f"linear probe top-1 accuracy: {summary['linear_top1']:.2f}%")
    if summary.get("personal"):
        print("personalised kNN top-1 on each client's own classes (merged front / + intervention / own front; extra parameters):")
        for r in summary["personal"]:
            accs = " / ".join(f"{r[k]:.2f}%" if k in r else "-" for k in ("knn_merged", "knn_intervened", "knn_own"))
            print(f"  client {r['client']}: {accs}; +{r['extra_params']:,} parameters on a {r['front_params']:,}-parameter front")
    print(f"steps {summary['steps']}, {summary['images_per_s']:.1f} images/s, {summary['wall_s']:.1f} s; run folder: {run_dir}")
