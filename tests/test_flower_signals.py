"""SIGTERM on Flower's simulation engine (``mona-sfl train --set runtime=flower``).

The engine starts Ray in the main thread while the trainer (the ServerApp) runs in another
one; ``train_with_flower`` starts Ray itself first and re-installs the stop handlers, so that
SIGTERM stops the run as it does on the local and Ray runtimes: the current step finishes, a
checkpoint is written, every process the run started ends, the resume hint is printed and the
exit code is 143. ``--resume`` then completes the run.

The run is paused at a known step with the test-only hook ``MONA_SFL_TEST_PAUSE_AT`` (see
``mona_sfl.interrupt.pause_point``), signalled, then released. It runs in its own session
(``start_new_session``), so that every process it starts (Ray's GCS, raylet, workers, agents
and the ClientApp actors) can be found by session id as well as by parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import end_leftovers, processes, started_by, still_running
from mona_sfl.checkpoint import read_metrics

pytest.importorskip("flwr")
pytest.importorskip("ray")

TINY_FLOWER = [
    "runtime=flower",
    "device=cpu",
    "model.width=0.125",
    "model.cut=2",
    "algo.K=32",
    "algo.dim=16",
    "algo.hidden_dim=32",
    "data.synthetic_size=120",
    "data.synthetic_test_size=0",  # a fifth of the training set, not the default config's 10,000
    "data.image_size=16",
    "fed.num_clients=2",
    "flower.num_supernodes=2",
    "fed.sync_every=2",
    "train.epochs=2",
    "train.steps_per_epoch=3",
    "train.batch_size=4",
    "eval.every=0",
    "eval.linear=false",
    "eval.knn_k=5",
    "eval.batch_size=64",
]
TIMEOUT = 300  # seconds for one subprocess phase (Ray start-up included) on a loaded 2-core machine


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace").lower()
    except OSError:
        return ""


class Run:
    """One ``mona-sfl train`` process in a session of its own, optionally paused at POINT:STEP."""

    def __init__(self, tmp: Path, run: Path, *, resume: bool = False, pause: str | None = None) -> None:
        n = len(list(tmp.glob("*.err")))
        self.err_path = tmp / f"p{n}.err"
        self.marker = tmp / f"p{n}.paused"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
        env["FLWR_HOME"] = str(tmp / "flwr_home")
        for k in ("MONA_SFL_TEST_PAUSE_AT", "RAY_ADDRESS"):  # no pause unless asked; a private Ray instance
            env.pop(k, None)
        if pause:
            env["MONA_SFL_TEST_PAUSE_AT"] = pause
            env["MONA_SFL_TEST_PAUSE_FILE"] = str(self.marker)
        args = ["train", "--quiet"] + (["--resume", str(run)] if resume else ["--out", str(run)] + [a for o in TINY_FLOWER for a in ("--set", o)])
        with open(tmp / f"p{n}.out", "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "mona_sfl", *args], stdout=out, stderr=err, env=env, cwd=tmp, start_new_session=True)
        self.seen: list[tuple[int, str]] = []

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def look(self) -> None:
        """Remember the processes the run has started so far."""
        self.seen = sorted(set(self.seen) | set(started_by(self.proc.pid)))

    def wait_paused(self) -> str:
        deadline = time.monotonic() + TIMEOUT
        while not self.marker.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (rc {self.proc.returncode}) before its pause point:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no pause within {TIMEOUT}s:\n{self.stderr[-3000:]}")
            time.sleep(0.05)
        self.look()
        return self.marker.read_text().split()[0]

    def wait(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the run did not finish within {TIMEOUT}s:\n{self.stderr[-3000:]}")
            self.look()
            time.sleep(0.5)
        return self.proc.returncode

    def session_left(self) -> list[int]:
        """Live processes still in the run's session once it has ended."""
        return [pid for pid, st in processes().items() if st[2] == self.proc.pid and st[1] != "Z"]

    def end(self) -> None:
        """Kill what is left of this run (by pid, after checking the start time)."""
        if self.proc.poll() is None:
            self.look()
            self.proc.kill()
            self.proc.wait(timeout=30)
        end_leftovers(self.seen)


def loss_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the run's processes through /proc")
def test_flower_simulation_sigterm_checkpoints_stops_everything_then_resume_completes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    runs: list[Run] = []
    try:
        p = Run(tmp_path, run, pause="step:2")
        runs.append(p)
        assert p.wait_paused() == "step:2"
        assert any("ray" in _cmdline(pid) for pid, _ in p.seen), "the simulation should have started Ray processes"
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # let the handler run while the process waits
        p.marker.unlink()
        rc = p.wait()
        err = p.stderr
        assert rc == 143, f"rc {rc}:\n{err[-3000:]}"
        assert "SIGTERM" in err and f"continue with: mona-sfl train --resume {run}" in err and "Traceback" not in err, err[-3000:]
        assert int(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["global_step"]) == 2
        assert loss_steps(run) == [1, 2]
        assert still_running(p.seen) == [], "SIGTERM should end every process the run started (Ray, ClientApp actors)"
        assert p.session_left() == [], "processes left in the run's session"

        r = Run(tmp_path, run, resume=True)
        runs.append(r)
        rc = r.wait()
        assert rc == 0, r.stderr[-3000:]
        assert loss_steps(run) == [1, 2, 3, 4, 5, 6]  # no gaps, no duplicates
        assert (run / "summary.json").exists()
        assert still_running(r.seen) == [] and r.session_left() == []
    finally:
        for x in runs:
            x.end()
