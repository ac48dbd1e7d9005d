"""Clean stops on SIGINT / SIGTERM, and the test-only pause points.

``mona-sfl train`` runs inside :func:`stop_on_signals`. The first SIGINT or SIGTERM only sets a
flag; the engine sees it at the next point where the state is consistent (after the current
step's client backward, or after an epoch end and its evaluation), writes a checkpoint and
raises :class:`TrainingStopped`. The CLI then prints how to resume and exits with 128 + the
signal number (130 for SIGINT, 143 for SIGTERM). A second signal raises ``KeyboardInterrupt``
at once; the last checkpoint written is kept.

This module imports neither torch nor any runtime.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# One process, one stop request: the handlers run in the main thread, the trainer may run in
# another one (Flower's simulation runs the ServerApp in a thread).
_state: dict[str, int | None] = {"signum": None, "forced": None}
_active_run: list[str] = []  # the run folder being trained, for the CLI's messages
_armed: list[bool] = []  # non-empty inside stop_on_signals()


class TrainingStopped(Exception):
    """A stop signal was honoured: a checkpoint of step ``step`` is in ``run_dir``."""

    def __init__(self, signum: int, step: int, run_dir: str | Path) -> None:
        self.signum = int(signum)
        self.step = int(step)
        self.run_dir = Path(run_dir)
        super().__init__(f"stopped by {signal_name(self.signum)} at step {self.step}; the checkpoint in {self.run_dir} holds the run's state")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def stop_requested() -> int | None:
    """The signal number of a pending stop request, or None."""
    return _state["signum"]


def forced_signal() -> int | None:
    """The signal that forced an immediate stop (the second one), or None."""
    return _state["forced"]


def set_active_run(run_dir: str | Path | None) -> None:
    """Record the run folder being trained (the CLI names it when it tells how to resume)."""
    _active_run[:] = [] if run_dir is None else [str(run_dir)]


def active_run() -> str | None:
    return _active_run[0] if _active_run else None


def interrupted_exit(run_dir: str | Path | None = None) -> tuple[int, str]:
    """Exit code and message for an interrupt that came before a new checkpoint (a second signal,
    or a KeyboardInterrupt outside :func:`stop_on_signals`)."""
    signum = forced_signal() or signal.SIGINT
    run = run_dir or active_run()
    text = f"mona-sfl: interrupted ({signal_name(signum)})"
    if run and any((Path(run) / n).exists() for n in ("checkpoint.pt", "checkpoint.prev.pt")):
        text += f"; the last checkpoint is kept: continue with `mona-sfl train --resume {run}`"
    return 128 + int(signum), text


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Ask a running trainer to checkpoint and stop (what the first signal does)."""
    _state["signum"] = int(signum)


def _handler(signum: int, frame: object) -> None:
    if _state["signum"] is not None:
        _state["forced"] = signum
        raise KeyboardInterrupt(f"second {signal_name(signum)}")
    _state["signum"] = signum
    # os.write: print() could re-enter a stderr write the main thread was in the middle of
    msg = (
        f"\nmona-sfl: {signal_name(signum)} received: finishing the current step, writing a checkpoint and stopping "
        f"(send it again to stop at once, keeping the previous checkpoint)\n"
    )
    try:
        os.write(2, msg.encode())
    except OSError:
        pass


def rearm() -> None:
    """Install the stop handlers again (main thread, inside :func:`stop_on_signals` only).

    ``ray.init`` replaces the SIGTERM handler (a C-level one that aborts the process, and a
    Python one that exits); the trainer calls this once its runtime is up so that SIGTERM stops
    cleanly again. Elsewhere than in the main thread it does nothing: under Flower's simulation
    the trainer runs in another thread, so ``train_with_flower`` starts Ray in the main thread
    itself, before the engine (which reuses it), and calls this there.
    """
    if _armed and threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _handler)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT / SIGTERM into stop requests for the duration (main thread only; else a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["signum"] = _state["forced"] = None
    _active_run.clear()
    previous = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    _armed.append(True)
    try:
        yield
    finally:
        _armed.pop()
        for s, h in previous.items():
            signal.signal(s, h)
        _state["signum"] = None


# --------------------------------------------------------------------------- test hook

PAUSE_AT = "MONA_SFL_TEST_PAUSE_AT"
PAUSE_FILE = "MONA_SFL_TEST_PAUSE_FILE"


def pause_wanted(point: str, step: int) -> bool:
    """Whether the test hook asks to pause at ``point`` of global step ``step`` (see :func:`pause_point`)."""
    spec = os.environ.get(PAUSE_AT)
    return bool(spec) and f"{point}:{step}" in spec.split(",")


def pause_point(point: str, step: int) -> None:
    """Test-only hook; does nothing unless the environment variable MONA_SFL_TEST_PAUSE_AT is set.

    ``MONA_SFL_TEST_PAUSE_AT=POINT:STEP[,POINT:STEP...]`` makes the process stop at that point of
    that global step, write the file named by ``MONA_SFL_TEST_PAUSE_FILE`` ("POINT:STEP PID") and
    wait until that file is deleted, so that a test can kill or signal it at a known moment.
    Points: ``step`` (server step done, client backward not yet), ``sync`` (fronts gathered, the
    average not yet loaded), ``checkpoint_write`` (new checkpoint complete in its temporary file,
    not yet renamed), ``checkpoint_renamed`` (new checkpoint in place, nothing logged after it),
    ``metrics_write`` (half of the step's metrics line written and flushed).
    """
    if not pause_wanted(point, step):
        return
    marker = os.environ.get(PAUSE_FILE)
    if not marker:
        raise RuntimeError(f"{PAUSE_AT} is set but {PAUSE_FILE} is not")
    tmp = f"{marker}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{point}:{step} {os.getpid()}\n")
    os.replace(tmp, marker)
    while os.path.exists(marker):
        time.sleep(0.01)


__all__ = ["TrainingStopped", "stop_on_signals", "set_active_run", "active_run", "interrupted_exit", "rearm", "stop_requested", "forced_signal", "request_stop", "signal_name", "pause_point", "pause_wanted"]
