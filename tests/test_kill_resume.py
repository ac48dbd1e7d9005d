"""Crash safety: SIGKILL at chosen and random moments, SIGINT/SIGTERM, torn metrics lines.

The subprocess tests run ``python -m mona_sfl train`` with one torch thread and stop it at a
known point with the test-only hook ``MONA_SFL_TEST_PAUSE_AT=POINT:STEP`` (see
``mona_sfl.interrupt.pause_point``): the process writes a marker file and waits; the test then
kills it (SIGKILL), or signals it and deletes the marker so that it goes on and stops cleanly.
``mona-sfl train --resume`` must then finish with exactly the uninterrupted run's metrics
records (per-step losses, sync metrics, final kNN) and final weights.

Tiny run: 3 clients, 2 epochs x 6 steps, sync every 2 steps (2, 4, 6, 8, 10, 12), checkpoints
at step 0, every 3 steps (3, 9) and at the epoch ends (6, 12).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import (
    assert_same,
    crash_in_server_step,
    end_leftovers,
    load_checkpoint,
    started_by,
    step_records,
    still_running,
    tiny_overrides,
)
from mona_sfl.checkpoint import MetricsLog, read_metrics, save_checkpoint, truncate_metrics
from mona_sfl.config import ConfigError, schema_config
from mona_sfl.engine import Trainer

TINY = tiny_overrides(
    "algo.K=32", "data.synthetic_size=120", "data.image_size=16", "fed.num_clients=3", "train.steps_per_epoch=6",
    "train.batch_size=4", "train.checkpoint_every=3", "eval.knn_k=5", "eval.batch_size=64",
)
RAY = ["runtime=ray", "ray.num_actors=1", "ray.cpus_per_actor=1"]
TIMEOUT = 240  # seconds for one subprocess phase, on a loaded 2-core machine


# ----------------------------------------------------------------------------- subprocess helpers
class Run:
    """One ``mona-sfl train`` process, optionally told to pause at POINT:STEP."""

    def __init__(self, tmp: Path, run: Path, *, resume: bool = False, pause: str | None = None, extra: list[str] | None = None) -> None:
        self.run = run
        n = len(list(tmp.glob("*.out")))
        self.out_path, self.err_path = tmp / f"p{n}.out", tmp / f"p{n}.err"
        self.marker = tmp / f"p{n}.paused"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0"}
        for k in ("MONA_SFL_TEST_PAUSE_AT", "RAY_ADDRESS"):  # no pause unless asked; a private Ray instance
            env.pop(k, None)
        if pause:
            env["MONA_SFL_TEST_PAUSE_AT"] = pause
            env["MONA_SFL_TEST_PAUSE_FILE"] = str(self.marker)
        args = ["train", "--quiet"]
        if resume:
            args += ["--resume", str(run)]
        else:
            args += ["--out", str(run)]
            for o in TINY + (extra or []):
                args += ["--set", o]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "mona_sfl", *args], stdout=out, stderr=err, env=env, cwd=tmp)
        self.children: list[tuple[int, str]] = []

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_paused(self) -> str:
        deadline = time.monotonic() + TIMEOUT
        while not self.marker.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (rc {self.proc.returncode}) before its pause point:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no pause within {TIMEOUT}s:\n{self.stderr[-3000:]}")
            time.sleep(0.02)
        self.children = started_by(self.proc.pid)
        return self.marker.read_text().split()[0]

    def release(self) -> None:
        self.marker.unlink()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the run did not finish within {TIMEOUT}s:\n{self.stderr[-3000:]}")


# ----------------------------------------------------------------------------- comparisons
def ckpt_step(run: Path, name: str = "checkpoint.pt") -> int:
    return int(load_checkpoint(run, name)["global_step"])


def loss_steps(run: Path) -> list[int]:
    return [r["step"] for r in step_records(run)]


def assert_same_run(ref: Path, run: Path, *, same_runtime: bool = True) -> None:
    """Every metrics record (losses, syncs, final kNN), final weights, client state and summary figures."""
    assert read_metrics(run / "metrics.jsonl") == read_metrics(ref / "metrics.jsonl")
    assert (run / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()  # no torn or duplicate lines either
    a, b = load_checkpoint(ref), load_checkpoint(run)
    # not torch_rng: torch seeds its global generator differently in every process, and training
    # does not draw from it (the checkpoint restores it all the same)
    keys = ["server", "global_online", "epoch", "step_in_epoch", "global_step", "images", "syncs", "metrics_records"]
    if same_runtime:
        keys += ["clients", "bytes", "config"]
    else:
        a["clients"].pop("ray", None)  # the Ray runtime's own counters
        b["clients"].pop("ray", None)
        keys.append("clients")
    for k in keys:
        assert_same(a[k], b[k], k)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (ref, run))
    for k in ("knn_top1", "steps", "epochs", "syncs", "final_loss", "images"):
        assert sa[k] == sb[k], k


class Reference:
    """The uninterrupted run (local runtime, one thread). It runs in the background while the
    first test starts its own processes (2 cores); ``path`` waits for it."""

    def __init__(self, tmp: Path) -> None:
        self.proc = Run(tmp, tmp / "run")
        self._done = False

    @property
    def path(self) -> Path:
        if not self._done:
            assert self.proc.wait() == 0, self.proc.stderr
            assert loss_steps(self.proc.run) == list(range(1, 13))
            self._done = True
        return self.proc.run


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return Reference(tmp_path_factory.mktemp("reference"))


# ----------------------------------------------------------------------------- SIGKILL
def test_sigkill_at_chosen_points_then_resume_is_exact(tmp_path: Path, reference: Reference) -> None:
    """One run killed five times, each resume killed at the next point, the last one completes."""
    run = tmp_path / "run"

    # (a) mid-step: the server stepped (step 5), the clients did not; last checkpoint: step 3
    p = Run(tmp_path, run, pause="step:5")
    assert p.wait_paused() == "step:5"
    p.kill()
    assert ckpt_step(run) == 3 and loss_steps(run) == [1, 2, 3, 4]

    # (b) during a checkpoint write: the step-6 checkpoint is complete under its temporary
    # name, not yet renamed: the step-3 checkpoint must still be the one in place
    p = Run(tmp_path, run, resume=True, pause="checkpoint_write:6")
    assert p.wait_paused() == "checkpoint_write:6"
    p.kill()
    assert ckpt_step(run) == 3 and ckpt_step(run, "checkpoint.prev.pt") == 0
    assert list(run.glob(".checkpoint.pt.*.tmp")), "the killed write should have left its temporary file"
    assert loss_steps(run)[-1] == 6  # logged before the kill; dropped by the resume

    # (c) during a sync (fronts gathered, average not loaded)
    p = Run(tmp_path, run, resume=True, pause="sync:8")
    assert p.wait_paused() == "sync:8"
    p.kill()
    assert not list(run.glob(".checkpoint.pt.*.tmp")), "the resume should have removed the stale temporary file"
    assert ckpt_step(run) == 6 and loss_steps(run) == [1, 2, 3, 4, 5, 6, 7]  # no duplicates of steps 4..6

    # (d) right after a checkpoint rename, before anything is logged after it
    p = Run(tmp_path, run, resume=True, pause="checkpoint_renamed:9")
    assert p.wait_paused() == "checkpoint_renamed:9"
    p.kill()
    assert ckpt_step(run) == 9 and ckpt_step(run, "checkpoint.prev.pt") == 6

    # (e) while a metrics line is half written: a torn last line
    p = Run(tmp_path, run, resume=True, pause="metrics_write:11")
    assert p.wait_paused() == "metrics_write:11"
    p.kill()
    text = (run / "metrics.jsonl").read_text()
    assert not text.endswith("\n") and loss_steps(run)[-1] == 10  # the torn record is not readable

    p = Run(tmp_path, run, resume=True)
    assert p.wait() == 0, p.stderr
    assert "resuming" in p.stderr and "at step 9" in p.stderr
    assert_same_run(reference.path, run)


def test_sigkill_at_a_random_moment_then_resume_is_exact(tmp_path: Path, reference: Reference) -> None:
    run = tmp_path / "run"
    p = Run(tmp_path, run)
    deadline = time.monotonic() + TIMEOUT
    while not (run / "checkpoint.pt").exists() and p.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the step-0 checkpoint: from here on any moment can be resumed
    delay = random.uniform(0.0, 4.0)
    time.sleep(delay)
    p.kill()
    where = f"killed {delay:.2f}s after the first checkpoint (rc {p.proc.returncode}); metrics steps {loss_steps(run)}"
    if not (run / "summary.json").exists():  # else it had finished: a resume is refused, nothing to do
        r = Run(tmp_path, run, resume=True)
        assert r.wait() == 0, f"{where}\n{r.stderr}"
    assert_same_run(reference.path, run)


# ----------------------------------------------------------------------------- SIGTERM / SIGINT
def test_sigterm_and_sigint_checkpoint_and_stop_then_resume_is_exact(tmp_path: Path, reference: Reference) -> None:
    run = tmp_path / "run"

    # SIGTERM in the middle of step 5 (a step whose next forward would be fused with its backward)
    p = Run(tmp_path, run, pause="step:5")
    p.wait_paused()
    p.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # let the handler run while the process waits
    p.release()
    assert p.wait() == 143, p.stderr
    err = p.stderr
    assert "SIGTERM" in err and f"mona-sfl train --resume {run}" in err and "Traceback" not in err
    assert ckpt_step(run) == 5 and loss_steps(run) == [1, 2, 3, 4, 5]

    # SIGINT during the sync of step 8
    p = Run(tmp_path, run, resume=True, pause="sync:8")
    p.wait_paused()
    p.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.release()
    assert p.wait() == 130, p.stderr
    assert "SIGINT" in p.stderr and f"mona-sfl train --resume {run}" in p.stderr
    assert ckpt_step(run) == 8 and loss_steps(run)[-1] == 8

    p = Run(tmp_path, run, resume=True)
    assert p.wait() == 0, p.stderr
    assert_same_run(reference.path, run)


# ----------------------------------------------------------------------------- Ray
@pytest.mark.slow
def test_ray_sigkill_and_sigterm_then_resume_matches_local(tmp_path: Path, reference: Reference) -> None:
    """Client state lives in Ray actors; a resume must take it from the checkpoint. SIGTERM also
    stops the actors and the private Ray instance the run started."""
    pytest.importorskip("ray")
    run = tmp_path / "run"
    started: list[tuple[int, str]] = []
    try:
        p = Run(tmp_path, run, pause="step:5", extra=RAY)
        p.wait_paused()
        started += p.children
        assert p.children, "a Ray run should have started Ray processes"
        p.kill()
        assert ckpt_step(run) == 3
        # the actors die with the driver, but Ray's dashboard and runtime-env agents may linger
        end_leftovers(p.children)

        p = Run(tmp_path, run, resume=True, pause="sync:8")
        p.wait_paused()
        started += p.children
        p.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        p.release()
        assert p.wait() == 143, p.stderr
        assert f"mona-sfl train --resume {run}" in p.stderr
        assert ckpt_step(run) == 8
        assert still_running(p.children) == [], "SIGTERM should end the Ray processes the run started"

        p = Run(tmp_path, run, resume=True)
        assert p.wait() == 0, p.stderr
        assert_same_run(reference.path, run, same_runtime=False)
    finally:
        end_leftovers(started)


# ----------------------------------------------------------------------------- in-process pieces
def test_checkpoint_minutes_cadence_resume_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A time-based cadence (here: due at every step) changes when state is saved, not the run."""
    full = tmp_path / "full"
    Trainer(schema_config(TINY), full, progress=False).run()

    cfg = schema_config(TINY + ["train.checkpoint_every=0", "train.checkpoint_minutes=1e-9"])
    part = tmp_path / "part"
    with crash_in_server_step(monkeypatch, 5):  # dies in step 5
        Trainer(cfg, part, progress=False).run()
    assert ckpt_step(part) == 4  # the time cadence checkpointed step 4 (not a multiple of anything else)
    t = Trainer.resume(part, progress=False)
    t.run(resumed=True)
    assert read_metrics(part / "metrics.jsonl") == read_metrics(full / "metrics.jsonl")
    a, b = load_checkpoint(full), load_checkpoint(part)
    for k in ("server", "global_online", "clients", "torch_rng", "metrics_records"):  # one process: one torch_rng
        assert_same(a[k], b[k], k)


def test_checkpoint_minutes_is_validated() -> None:
    with pytest.raises(ConfigError, match="train.checkpoint_minutes"):
        schema_config(["train.checkpoint_minutes=-1"])
    assert schema_config(["train.checkpoint_minutes=2.5"]).train.checkpoint_minutes == 2.5


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, {"global_step": 1, "x": torch.ones(3)})
    save_checkpoint(tmp_path, {"global_step": 2, "x": torch.ones(3)})
    before = (tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "checkpoint.prev.pt").read_bytes()

    def broken(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, {"global_step": 3})
    assert ((tmp_path / "checkpoint.pt").read_bytes(), (tmp_path / "checkpoint.prev.pt").read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    assert ckpt_step(tmp_path) == 2 and ckpt_step(tmp_path, "checkpoint.prev.pt") == 1


def test_torn_metrics_line_is_skipped_and_truncated(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step":1,"loss":1.0}\n{"step":2,"loss":2.0}\n{"step":3,"lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    log = MetricsLog(path)  # appending after a torn line: the new record gets its own line
    assert log.count == 2
    log.write({"step": 3, "loss": 3.0})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3] and log.count == 3
    truncate_metrics(path, last_step=3, keep=2)  # what the checkpoint counted
    assert path.read_text() == '{"step":1,"loss":1.0}\n{"step":2,"loss":2.0}\n'
    path.write_text('{"step":1,"loss":1.0}\n{"step":2,"loss":2.0}\n{"step":3,"lo')
    truncate_metrics(path, last_step=1)  # a checkpoint without a count: by step
    assert path.read_text() == '{"step":1,"loss":1.0}\n'
