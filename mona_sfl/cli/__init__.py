"""The command line: ``mona-sfl train | config | plot | compare | attack | comm | study | deploy-local | flwr-run | certs | transfer | front``.

Every command takes its settings the same way: ``--config FILE|NAME`` (a file, or a bundled
config name; default: the bundled ``default``) and ``--set key=value`` (repeatable). Library
code raises; only this package prints errors and chooses exit codes:

0 success, 2 a problem with the input (config, data, run folder, checkpoint: any
:class:`mona_sfl.errors.UserError`), 1 a failed run (every client lost, activations refused,
a deployment that failed, an OS error such as a full disk: one line naming the path and
the cause), 130 / 143 stopped by SIGINT / SIGTERM (after a checkpoint).

Parsing imports neither torch nor the runtimes: a typo is answered at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from mona_sfl.errors import UserError

EXIT_USAGE = 2
EXIT_FAILED = 1

#: Subcommand -> module with ``add_parser(subparsers)`` and ``run(args) -> int``.
COMMANDS = {
    "train": "mona_sfl.cli.train",
    "config": "mona_sfl.cli.config",
    "plot": "mona_sfl.cli.plot",
    "compare": "mona_sfl.cli.compare",
    "attack": "mona_sfl.cli.attack",
    "comm": "mona_sfl.cli.comm",
    "study": "mona_sfl.cli.study",
    "deploy-local": "mona_sfl.cli.deploy",
    "flwr-run": "mona_sfl.cli.flwr_run",
    "certs": "mona_sfl.cli.certs",
    "transfer": "mona_sfl.cli.transfer",
    "front": "mona_sfl.cli.front",
}


def add_settings(p: argparse.ArgumentParser, *, what: str = "the run") -> None:
    """The one way to pass settings: ``--config`` and repeatable ``--set key=value``."""
    from mona_sfl.config import bundled_names

    p.add_argument(
        "--config",
        help=f"TOML/YAML config file, or a bundled config name ({', '.join(bundled_names())}; default: default)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a config key of {what}, e.g. --set model.cut=4 (repeatable; every key: mona-sfl config keys)",
    )


def parser() -> argparse.ArgumentParser:
    from mona_sfl.config import bundled_names

    p = argparse.ArgumentParser(
        prog="mona-sfl",
        description="Split federated self-supervised learning (MonAcoSFL / MocoSFL).",
        epilog=f"bundled configs (--config NAME): {', '.join(bundled_names())}. "
        "Config keys: 'mona-sfl config keys' (also the README's 'Key reference'); "
        "the resolved config: 'mona-sfl config show [--config X] [--set k=v ...]'. "
        "Help on one command: mona-sfl COMMAND --help.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    from mona_sfl.interrupt import TrainingStopped, interrupted_exit

    try:
        return int(importlib.import_module(COMMANDS[args.command]).run(args))
    except UserError as e:
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
        from mona_sfl.runtime import AllClientsLost

        if isinstance(e, ActivationsRejected):  # deterministic: a resume would compute the same activations again
            print(
                f"mona-sfl: error: {e}; the last checkpoint holds the state before this step, but a --resume would repeat "
                f"the same step and fail the same way: start a new run with a change that avoids it (e.g. a smaller "
                f"train.lr for non-finite activations)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        if not isinstance(e, AllClientsLost):
            raise
        print(f"mona-sfl: error: {e}; continue with: mona-sfl train --resume RUN_DIR", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # no space, read-only, permission, name too long: one line, the path and the cause
        from mona_sfl.checkpoint import os_error_text

        print(f"mona-sfl: error: {os_error_text(e)}; {os_error_advice(args)}", file=sys.stderr)
        return EXIT_FAILED


def _continue_run(run_dir: Path, how: str = "") -> str | None:
    """How to go on with the run a new-run command started in ``run_dir`` once the cause of an OS
    error is fixed; None when the folder holds no run (or cannot be read)."""
    from mona_sfl.checkpoint import CHECKPOINT, CONFIG, PREVIOUS

    try:
        if (run_dir / CHECKPOINT).exists() or (run_dir / PREVIOUS).exists():
            return f"the last checkpoint in {run_dir} is kept: fix the cause, then continue with `mona-sfl train --resume {run_dir}`{how}"
        if (run_dir / CONFIG).exists():
            return f"{run_dir} holds no checkpoint yet: fix the cause, delete the folder, then run the same command again"
    except OSError:  # the folder itself cannot be read: the cause comes first
        pass
    return None


def os_error_advice(args: argparse.Namespace) -> str:
    """What to do after an OS error, for the command that met it: only a training run is resumed."""
    from mona_sfl.checkpoint import SUMMARY

    again = "fix the cause, then run the same command again"
    if args.command == "train":
        if args.resume:
            return f"the last checkpoint in {args.resume} is kept: {again}"
        if args.seeds is not None:
            out = Path(args.out) if args.out else None
            folders = sorted(out.glob("seed*")) if out is not None and out.is_dir() else []
            steps = [a for a in (_continue_run(d) for d in folders if not (d / SUMMARY).exists()) if a and "--resume" in a]
            return "; ".join(steps) + " (then the seeds not started yet with --seeds and another --out)" if steps else again
        if args.out:
            return _continue_run(Path(args.out)) or again
        return f"{again}, or continue the run it started with `mona-sfl train --resume RUN_DIR`"
    if args.command == "study":
        return f"{again}: it keeps the finished rows and resumes the unfinished runs"
    if args.command in ("deploy-local", "flwr-run") and args.out:
        return _continue_run(Path(args.out), " (on Flower's simulation engine)") or again
    if args.command == "attack" and args.run_dir:
        return f"the run's checkpoints in {args.run_dir} are unchanged: {again}"
    return again


__all__ = ["COMMANDS", "EXIT_FAILED", "EXIT_USAGE", "add_settings", "main", "os_error_advice", "parser"]
