"""Nothing lost, nothing trusted: run-folder locks, safe deployment values, image folders that
cannot loop or lie, resource bounds, and OS errors as one clear line.

Every case runs the real code (the CLI entry in-process, or a real subprocess where a second
process is the point) on tiny inputs; each takes seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mona_sfl.checkpoint import lock_run_dir, read_metrics
from mona_sfl.cli import main
from mona_sfl.config import ConfigError, load_config
from mona_sfl.data.datasets import load_dataset
from mona_sfl.errors import CheckpointError, DataError

TINY = [
    "model.width=0.0625",
    "algo.K=16",
    "algo.dim=8",
    "algo.hidden_dim=8",
    "data.synthetic_size=40",
    "data.image_size=16",
    "fed.num_clients=2",
    "train.batch_size=4",
    "train.max_steps=2",
    "eval.every=0",
    "eval.linear=false",
    "eval.knn_k=5",
    "eval.batch_size=64",
]


def sets(*overrides: str) -> list[str]:
    out: list[str] = []
    for o in [*TINY, *overrides]:
        out += ["--set", o]
    return out


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and folder under ``root``."""
    out: dict[str, bytes | str] = {}
    for d, dirs, files in os.walk(root):
        for x in dirs:
            out[os.path.relpath(os.path.join(d, x), root)] = "dir"
        for f in files:
            out[os.path.relpath(os.path.join(d, f), root)] = Path(d, f).read_bytes()
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run that stopped at step 2 of an epoch (summary.json removed: a resume continues it)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    assert main(["train", "--quiet", "--out", str(run), *sets()]) == 0
    (run / "summary.json").unlink()
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- run-folder locks
HOLD = (
    "import sys; from pathlib import Path; from mona_sfl.checkpoint import lock_run_dir\n"
    "with lock_run_dir(Path(sys.argv[1])):\n"
    "    print('locked', flush=True); sys.stdin.read()\n"
)


def hold_lock(folder: Path) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "locked"
    return p


def test_a_second_writer_is_refused_naming_the_holder_and_changes_nothing(stopped_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(stopped_run, tmp_path / "run")
    (run / ".checkpoint.pt.abc.tmp").write_bytes(b"a live writer's temporary checkpoint")
    holder = hold_lock(run)
    try:
        before = tree(run)
        capsys.readouterr()
        assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=3"]) == 2
        err = capsys.readouterr().err
        assert f"run folder {run} is in use by another mona-sfl process (pid {holder.pid})" in err
        assert main(["train", "--quiet", "--out", str(run), *sets()]) == 2  # a new run: refused (it holds a run anyway)
        assert main(["attack", str(run), "--epochs", "1", "--num-test", "4"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert tree(run) == before  # the live writer's temporary file is still there
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL): its lock is gone with it, and the resume runs
    assert main(["train", "--quiet", "--resume", str(run), "--set", "train.max_steps=3"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3]


def test_two_new_runs_into_one_folder_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new"
    holder = hold_lock(out)  # as if another `train --out new` had just started
    try:
        assert main(["train", "--quiet", "--out", str(out), *sets()]) == 2
        assert f"(pid {holder.pid})" in capsys.readouterr().err
        assert os.listdir(out) == []
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_leaves_no_file_and_a_failed_new_run_leaves_no_folder(tmp_path: Path) -> None:
    with lock_run_dir(tmp_path / "a" / "b"):
        assert os.listdir(tmp_path / "a" / "b") == []
    assert os.listdir(tmp_path / "a" / "b") == []
    with pytest.raises(DataError):
        with lock_run_dir(tmp_path / "c"):
            raise DataError("the run failed before writing anything")
    assert not (tmp_path / "c").exists()


def test_in_process_second_lock_is_refused(tmp_path: Path) -> None:
    with lock_run_dir(tmp_path):
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
            with lock_run_dir(tmp_path):
                pass
    with lock_run_dir(tmp_path):  # released
        pass
