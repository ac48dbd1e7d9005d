"""Command line: ``mona-sfl train``, ``mona-sfl attack``, ``mona-sfl comm``.

Exit codes: 0 success, 2 a problem with the input (config, data, run folder, checkpoint),
1 an unexpected error, 130 / 143 stopped by SIGINT / SIGTERM (after a checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path

from mona_sfl.checkpoint import CONFIG, SUMMARY, CheckpointError, load_run_config
from mona_sfl.config import Config, ConfigError, load_config, with_overrides
from mona_sfl.interrupt import TrainingStopped, interrupted_exit, stop_on_signals

EXIT_USAGE = 2


def bundled_config(name: str) -> Path | None:
    """A config shipped with the package (``configs/NAME.toml``), or None."""
    base = resources.files("mona_sfl") / "configs"
    for suffix in ("", ".toml", ".yaml", ".yml"):
        p = base / f"{name}{suffix}"
        if p.is_file():
            return Path(str(p))
    return None


def resolve_config_path(arg: str | None) -> Path:
    if arg is None:
        p = bundled_config("default")
        if p is None:
            raise ConfigError("the bundled default config is missing: reinstall mona-sfl or pass --config FILE")
        return p
    p = Path(arg)
    if p.exists():
        return p
    found = bundled_config(arg)
    if found is not None:
        return found
    raise ConfigError(f"config file not found: {arg} (neither a file nor a bundled config name)")


def default_run_dir(cfg: Config) -> Path:
    method = "mona" if cfg.algo.align_momentum else "moco"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model.arch}-cut{cfg.model.cut}-{method}"


#: Files whose presence marks a folder as (part of) a run.
RUN_FILES = (CONFIG, "checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl", SUMMARY)


def check_new_run_dir(out: Path) -> None:
    """Refuse an --out that cannot take a new run, before anything is written anywhere."""
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {out} is a broken symbolic link: remove it or choose another --out")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder: choose another --out")
    if out.is_dir() and any((out / n).exists() for n in RUN_FILES):
        raise ConfigError(f"--out {out} already holds a run: continue it with `mona-sfl train --resume {out}` or choose another --out")
    base = out
    while not base.exists() and not base.is_symlink() and base != base.parent:
        base = base.parent  # the nearest existing folder, where the run folder will be created
    if not base.is_dir():
        raise ConfigError(f"--out {out} cannot be created: {base} is not a folder; choose another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out} cannot be created: no permission to write in {base}; choose another --out")


def check_resumable(run_dir: Path, max_steps: int | None) -> None:
    """Refuse to resume a folder that is no run, or a run that has finished (nothing would be trained)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir} is a file, not a run folder: pass the folder given as --out")
    cfg = load_run_config(run_dir)  # CheckpointError when the folder or its config.toml is unusable
    for name in RUN_FILES:
        if (run_dir / name).exists() and not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir / name} is not a file: this run folder is damaged; restore the file or start a new run")
    if max_steps is not None:
        with_overrides(cfg, [f"train.max_steps={max_steps}"])  # ConfigError for a negative value
    try:
        done = json.loads((run_dir / SUMMARY).read_text(encoding="utf-8"))
        steps, epochs = int(done["steps"]), int(done["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # no (readable) summary: the run has not finished
    limit = cfg.train.max_steps if max_steps is None else max_steps
    if epochs >= cfg.train.epochs:
        raise CheckpointError(
            f"the run in {run_dir} has finished (all {cfg.train.epochs} epochs; see {SUMMARY}): nothing to resume; "
            f"train.epochs cannot change on resume, so start a new run for more epochs"
        )
    if limit and steps >= limit:
        raise CheckpointError(
            f"the run in {run_dir} has finished ({steps} steps, train.max_steps={limit}; see {SUMMARY}): nothing to "
            f"resume; to train further pass --set train.max_steps=N with N > {steps}"
        )


def _run_runtime(run_dir: Path) -> str:
    """The runtime recorded in a run folder's config ('local' when unreadable: Trainer.resume then says why)."""
    try:
        return load_config(run_dir / CONFIG).runtime
    except ConfigError:
        return "local"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mona-sfl", description="Split federated self-supervised learning (MonAcoSFL / MocoSFL).")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a run")
    t.add_argument("--config", help="TOML/YAML config file or bundled config name (default: the bundled 'default')")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set model.cut=4 (repeatable)")
    t.add_argument("--out", help="run folder (default: runs/<time>-<arch>-cut<N>-<method>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress output")

    sub.add_parser(
        "deploy-local",
        add_help=False,
        help="train through a local Flower SuperLink + N SuperNodes (separate processes); see `deploy-local --help`",
    )

    a = sub.add_parser("attack", help="model-inversion attack on a run's client front (or on an untrained front)")
    a.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run folder: attacks its synced client front; writes attack.json and attack.png into it")
    a.add_argument("--untrained", action="store_true", help="attack the run's initial front instead (baseline; writes attack_untrained.json/.png)")
    a.add_argument("--config", help="instead of RUN_DIR: attack the untrained front of this config (needs --out)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override with --config (repeatable)")
    a.add_argument("--out", help="output folder with --config (attack.json, attack.png)")
    a.add_argument("--epochs", type=int, default=50, help="decoder training epochs (default 50)")
    a.add_argument("--aux-fraction", type=float, default=0.01, help="attacker's auxiliary share of the training set (default 0.01)")
    a.add_argument("--num-test", type=int, default=128, help="held-out test images to reconstruct (default 128)")
    a.add_argument("--batch-size", type=int, default=32, help="decoder batch size (default 32)")
    a.add_argument("--decoder-width", type=int, default=64, help="decoder channels (default 64)")
    a.add_argument("--seed", type=int, default=0, help="seed of the auxiliary draw and the decoder (default 0)")
    a.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")

    c = sub.add_parser("comm", help="analytic communication (bytes per step, sync, epoch, run) over cut layers 1..9")
    c.add_argument("config", nargs="?", help="TOML/YAML config file or bundled config name (default: the bundled 'default')")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    c.add_argument("--steps-per-epoch", type=int, help="steps per epoch (default: train.steps_per_epoch or from the data size)")
    c.add_argument("--exact", action="store_true", help="print exact byte counts instead of KiB/MiB/GiB")
    c.add_argument("--reference", action="store_true", help="also print MocoSFL's overhead_calculator formula over the cuts")
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from mona_sfl.engine import Trainer

    if args.resume:
        if args.config or args.out:
            raise ConfigError("--resume takes the config and folder of the run: do not pass --config or --out with it")
        max_steps = None
        for item in args.overrides:
            key, _, val = item.partition("=")
            if key.strip() != "train.max_steps":
                raise ConfigError(f"--set {key.strip()} cannot change a run being resumed (only train.max_steps can)")
            try:
                max_steps = int(val)
            except ValueError:
                raise ConfigError(f"--set train.max_steps={val}: value must be of type int") from None
        run_dir = Path(args.resume)
        check_resumable(run_dir, max_steps)
        if _run_runtime(run_dir) == "flower":
            from mona_sfl.runtime.flower.launch import resume_with_flower

            print(f"resuming {args.resume} on Flower's simulation engine", file=sys.stderr)
            summary = resume_with_flower(run_dir, progress=not args.quiet, max_steps=max_steps)
            num_classes = int(summary["num_classes"])
        else:
            trainer = Trainer.resume(args.resume, progress=not args.quiet, max_steps=max_steps)
            print(f"resuming {args.resume} at step {trainer.global_step} (epoch {trainer.epoch})", file=sys.stderr)
            try:
                summary = trainer.run(resumed=True)
            finally:
                trainer.runtime.close()  # Ray: stop the actors and the private Ray instance
            num_classes = trainer.num_classes
    else:
        cfg = load_config(resolve_config_path(args.config), args.overrides)
        run_dir = Path(args.out) if args.out else default_run_dir(cfg)
        check_new_run_dir(run_dir)
        what = (
            f"training {cfg.model.arch} width {cfg.model.width} cut {cfg.model.cut} "
            f"({'MonAcoSFL' if cfg.algo.align_momentum else 'MocoSFL'}), {cfg.fed.num_clients} clients, "
        )
        if cfg.runtime == "flower":
            from mona_sfl.runtime.flower.launch import train_with_flower

            if cfg.data.name != "imagefolder":  # fail in seconds, not after starting Flower (decoding folders twice costs more)
                from mona_sfl import build

                train = build.load_data(cfg, "train")
                build.client_partition(cfg, train.labels, len(train.classes))
            nodes = cfg.flower.num_supernodes or cfg.fed.num_clients
            print(f"{what}runtime flower (simulation engine, {nodes} SuperNodes), data {cfg.data.name}", file=sys.stderr)
            summary = train_with_flower(cfg, run_dir, progress=not args.quiet)
            num_classes = int(summary["num_classes"])
        else:
            trainer = Trainer(cfg, run_dir, progress=not args.quiet)
            print(f"{what}{trainer.total_steps} steps, runtime {cfg.runtime}, device {trainer.device}, data {cfg.data.name}", file=sys.stderr)
            try:
                summary = trainer.run()
            finally:
                trainer.runtime.close()  # Ray: stop the actors and the private Ray instance
            num_classes = trainer.num_classes
    chance = 100.0 / num_classes
    init = summary.get("knn_top1_init")
    init_txt = f"at initialisation {init:.2f}%, " if init is not None else ""
    print(f"kNN top-1 accuracy: {summary['knn_top1']:.2f}% ({init_txt}chance {chance:.2f}%)")
    if "linear_top1" in summary:
        print(f"linear probe top-1 accuracy: {summary['linear_top1']:.2f}%")
    print(f"steps {summary['steps']}, {summary['images_per_s']:.1f} images/s, {summary['wall_s']:.1f} s; run folder: {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["deploy-local"]:  # its own parser (argparse cannot hand "--help" etc. to a sub-tool)
        from mona_sfl.runtime.flower.deploy import main as deploy_main

        return deploy_main(argv[1:])
    args = _parser().parse_args(argv)
    from mona_sfl.data.datasets import DataError

    try:
        if args.command == "train":
            with stop_on_signals():  # SIGINT/SIGTERM: checkpoint, then TrainingStopped
                return cmd_train(args)
        if args.command == "attack":
            from mona_sfl.privacy.attack import attack_main

            return attack_main(args)
        if args.command == "comm":
            from mona_sfl.comms import comm_main

            return comm_main(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"mona-sfl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as e:
        print(f"mona-sfl: {e}; continue with: mona-sfl train --resume {e.run_dir}", file=sys.stderr)
        return e.exit_code  # 128 + signal: 130 for SIGINT, 143 for SIGTERM
    except KeyboardInterrupt:
        code, text = interrupted_exit()
        print(text, file=sys.stderr)
        return code
    except RuntimeError as e:
        from mona_sfl.core.server import ActivationsRejected
        from mona_sfl.engine import AllClientsLost

        if not isinstance(e, (AllClientsLost, ActivationsRejected)):
            raise
        print(f"mona-sfl: error: {e}; continue with: mona-sfl train --resume RUN_DIR", file=sys.stderr)
        return 1
    return EXIT_USAGE
