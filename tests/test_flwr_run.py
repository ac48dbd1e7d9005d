"""`mona-sfl flwr-run`: `flwr run` of this app with no activated venv, no per-run environment
build, the log streamed, the local SuperLink stopped, and the same losses as the in-process run
(which `--set runtime=flower` gives bit for bit too: tests/test_runtimes_agree.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import losses, tiny_overrides

pytest.importorskip("flwr")

TINY = tiny_overrides("fed.num_clients=2", "eval.linear=false")


@pytest.mark.slow
def test_flwr_run_equals_the_local_run_and_stops_its_superlink(tmp_path: Path) -> None:
    from mona_sfl.cli import main
    from mona_sfl.cli.flwr_run import local_superlinks, superlink_up

    if superlink_up():
        pytest.skip("a local Flower SuperLink already runs on this machine's port 39091")
    sets = [a for kv in TINY for a in ("--set", kv)]
    ref = tmp_path / "local"
    assert main(["train", "--quiet", "--out", str(ref), *sets, "--set", "runtime=local"]) == 0

    home = tmp_path / "flwr home"
    out = tmp_path / 'run "quoted" out'
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION")}
    env.update(FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", PATH="/usr/bin:/bin")  # nothing activated
    r = subprocess.run([sys.executable, "-m", "mona_sfl", "flwr-run", "--out", str(out), *sets, "--timeout", "400"],
                       env=env, capture_output=True, text=True, timeout=450)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "mona-sfl: kNN top-1" in r.stdout + r.stderr  # the ServerApp's log was streamed
    assert "kNN top-1 accuracy:" in r.stdout
    assert losses(out) == losses(ref) and len(losses(ref)) == 6  # bit-identical to the in-process run
    assert not (home / "runtime-envs").exists()  # no per-run environment was built
    assert local_superlinks(home) == [] and not superlink_up()  # the SuperLink it started is gone


def test_flwr_run_refuses_a_folder_without_the_app(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mona_sfl.cli import main

    assert main(["flwr-run", "--out", str(tmp_path / "r"), "--project", str(tmp_path)]) == 2
    assert "has no pyproject.toml" in capsys.readouterr().err
