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
    t.add_argument("--seeds", metavar="S1,S2,...", help="one run per seed, in OUT/seed<N>, then a table with the mean and sample std over the seeds")
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


def run(args: argparse.Namespace) -> int:
    from mona_sfl.checkpoint import check_resumable, default_run_dir, lock_run_dir
    from mona_sfl.interrupt import stop_on_signals

    with stop_on_signals():  # SIGINT/SIGTERM: checkpoint, then TrainingStopped
        if args.seeds is not None:
            return train_seeds(args)
        if args.resume:
            if args.config or args.out:
                raise ConfigError("--resume takes the config and folder of the run: do not pass --config or --out with it")
            max_steps = resume_max_steps(args.overrides)
            run_dir = Path(args.resume)
            check_resumable(run_dir, max_steps)  # before the lock: a missing folder is not created
            with lock_run_dir(run_dir, "--resume"):  # one writer per folder; nothing changed before it is held
                summary = _resume(run_dir, check_resumable(run_dir, max_steps), max_steps, quiet=args.quiet)
        else:
            from mona_sfl.api import make_config, train

            cfg = make_config(args.config, args.overrides)
            run_dir = Path(args.out) if args.out else default_run_dir(cfg)
            summary = train(cfg, out=run_dir, progress=not args.quiet, report=lambda line: print(line, file=sys.stderr))
    print_summary(summary, run_dir)
    return 0


def _resume(run_dir: Path, cfg: Any, max_steps: int | None, *, quiet: bool) -> dict[str, Any]:
    if cfg.runtime == "flower":
        from mona_sfl.runtime.flower.launch import resume_with_flower

        print(f"resuming {run_dir} on Flower's simulation engine", file=sys.stderr)
        return resume_with_flower(run_dir, progress=not quiet, max_steps=max_steps)
    from mona_sfl.engine import Trainer

    with Trainer.resume(run_dir, progress=not quiet, max_steps=max_steps) as trainer:
        print(f"resuming {run_dir} at step {trainer.global_step} (epoch {trainer.epoch})", file=sys.stderr)
        return trainer.run(resumed=True)


def train_seeds(args: argparse.Namespace) -> int:
    """``--seeds``: the runs one after the other, then the per-seed table with mean and sample std."""
    from mona_sfl import api
    from mona_sfl.checkpoint import default_run_dir
    from mona_sfl.runs import seeds_table
    from mona_sfl.studies.split_depth import parse_ints

    if args.resume:
        raise ConfigError("--seeds starts new runs: resume each seed's folder with --resume OUT/seed<N> instead")
    seeds = parse_ints(args.seeds, "seeds")
    out = Path(args.out) if args.out else default_run_dir(api.make_config(args.config, args.overrides))
    summaries = api.train_seeds(
        args.config, args.overrides, seeds, out, progress=not args.quiet, report=lambda line: print(line, file=sys.stderr),
    )
    print(seeds_table(seeds, summaries, [out / f"seed{s}" for s in seeds]), end="")
    return 0


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
