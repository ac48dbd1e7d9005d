"""``mona-sfl flwr-run``: ``flwr run`` of this project on Flower's local simulation SuperLink, without traps.

Plain ``flwr run .`` (Flower 1.42) has four: it needs ``flower-superlink`` on ``PATH`` (an
activated venv), it builds a fresh Python environment for every run (``uv sync`` of the
FAB's dependencies: gigabytes for torch), it prints nothing after "Successfully started run"
unless ``--stream`` is given, and the local SuperLink it starts keeps running afterwards.
This command runs the same thing with:

* this interpreter's ``bin`` folder first on ``PATH`` (no activation needed);
* ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: the run uses the installed environment;
* ``--stream`` (the ServerApp's log, and its result line, are printed);
* the run config passed as a TOML file (every key and path quoted by our TOML writer, so an
  ``--out`` with quotes or spaces reaches the ServerApp intact);
* the local SuperLink stopped afterwards when this command started it (``--keep-superlink``
  leaves it up for the next run);

and prints the summary lines of ``mona-sfl train``. It needs a source checkout (the project
folder with ``pyproject.toml``'s ``[tool.flwr.app]``), as ``flwr run .`` does.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mona_sfl.errors import ConfigError

LOCAL_HEALTH = "http://127.0.0.1:39091/health"  # Flower 1.42's managed local SuperLink


def add_parser(sub: Any) -> None:
    from mona_sfl.cli import add_settings

    p = sub.add_parser(
        "flwr-run",
        help="`flwr run` of this app on Flower's local simulation SuperLink (no activation, no env build, log streamed)",
        description="Run the Flower app with `flwr run` on the local simulation SuperLink; see docs/runtimes.md, 'Flower runtime'.",
    )
    add_settings(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--project", help="the project folder with pyproject.toml's [tool.flwr.app] (default: this checkout)")
    p.add_argument("--federation-config", default="",
                   help="passed to flwr run, e.g. 'client-resources-num-cpus=1' (num-supernodes defaults to the config's node count)")
    p.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running afterwards")
    p.add_argument("--timeout", type=float, default=0.0, help="give up after N seconds (0: no limit)")


def project_dir(given: str | None) -> Path:
    """The folder holding the Flower app's pyproject.toml (a source checkout)."""
    import tomllib

    import mona_sfl

    path = Path(given) if given else Path(mona_sfl.__file__).resolve().parent.parent
    pp = path / "pyproject.toml"
    if not pp.is_file():
        raise ConfigError(f"{path} has no pyproject.toml: flwr-run needs a source checkout of mona-sfl (pass --project DIR)")
    if "app" not in tomllib.loads(pp.read_text(encoding="utf-8")).get("tool", {}).get("flwr", {}):
        raise ConfigError(f"{pp} has no [tool.flwr.app] table: it is not the mona-sfl Flower app")
    return path


def superlink_up() -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(LOCAL_HEALTH, timeout=1.0) as r:  # noqa: S310 (loopback)
            return 200 <= r.status < 300
    except OSError:
        return False


def stop_processes(pids: list[int], wait_s: float = 10.0) -> None:
    """SIGTERM to ``pids``, SIGKILL to those left after ``wait_s`` (a pid reused meanwhile is left alone)."""
    from mona_sfl.runtime.reaper import reap, start_time

    reap({pid: st for pid in pids if (st := start_time(pid)) is not None}, grace_s=wait_s)


def local_superlinks(flwr_home: Path) -> list[int]:
    """Pids of simulation SuperLinks whose state lives in ``flwr_home`` (the one ``flwr run`` starts)."""
    db = str(flwr_home / "local-superlink")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if any(a.endswith("flower-superlink") for a in text) and "--simulation" in text and any(db in a for a in text):
            pids.append(int(proc.name))
    return pids


def run(args: argparse.Namespace) -> int:
    from mona_sfl.checkpoint import check_new_run_dir, lock_run_dir
    from mona_sfl.config import load_config, resolve_config_path

    if args.timeout < 0:
        raise ConfigError(f"--timeout must be >= 0, got {args.timeout:g}")
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    run_dir = Path(args.out).resolve()  # the ServerApp runs in another process and folder
    check_new_run_dir(run_dir)
    project = project_dir(args.project)
    with lock_run_dir(run_dir, "flwr-run"):  # one writer per folder: held until the run has ended
        check_new_run_dir(run_dir)  # again under the lock, before any process starts
        return _flwr_run(args, cfg, project, run_dir)


def _flwr_run(args: argparse.Namespace, cfg: Any, project: Path, run_dir: Path) -> int:
    from mona_sfl.checkpoint import SUMMARY
    from mona_sfl.cli.train import print_summary
    from mona_sfl.runtime.flower.run_config import app_config_toml

    flwr_home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    started_here = not superlink_up()
    flwr = Path(sys.executable).parent / "flwr"
    with tempfile.TemporaryDirectory(prefix="mona-sfl-run-config-") as tmp:
        rc = Path(tmp) / "run_config.toml"
        rc.write_text(app_config_toml(cfg, out=str(run_dir)), encoding="utf-8")
        cmd = [str(flwr) if flwr.exists() else "flwr", "run", str(project), "--stream", "--run-config", str(rc)]
        fed = args.federation_config
        if "num-supernodes" not in fed:  # as many SuperNodes as the config asks for (Flower's default is 2)
            fed = f"{fed} num-supernodes={cfg.num_nodes}".strip()
        cmd += ["--federation-config", fed]
        print(f"running: flwr run {project} --stream (run folder {run_dir})", file=sys.stderr)
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.timeout or None, check=False)
            rc_code = proc.returncode
        except subprocess.TimeoutExpired:
            print(f"mona-sfl: error: flwr run did not finish within {args.timeout:g} s", file=sys.stderr)
            rc_code = 1
        finally:
            if started_here and not args.keep_superlink:
                stop_processes(local_superlinks(flwr_home))
            elif started_here:
                print(f"the local SuperLink keeps running (stop it with: kill {' '.join(map(str, local_superlinks(flwr_home)))})", file=sys.stderr)
    if rc_code != 0:
        print(f"mona-sfl: error: flwr run exited with {rc_code}", file=sys.stderr)
        return 1
    summary_path = run_dir / SUMMARY
    # `flwr run --stream` returns when the log stream ends; the summary is the ServerApp's last write
    deadline = time.monotonic() + 60.0
    while not summary_path.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not summary_path.is_file():
        print(f"mona-sfl: error: the run wrote no {SUMMARY} in {run_dir}: see the log above", file=sys.stderr)
        return 1
    import json

    print_summary(json.loads(summary_path.read_text(encoding="utf-8")), run_dir)
    return 0
