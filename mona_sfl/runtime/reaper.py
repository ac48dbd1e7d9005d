"""End the processes of a local Ray instance with the process that started it, also after SIGKILL.

``ray.init(address="local")`` starts the GCS, the raylet, the dashboard, a log monitor and the
raylet's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``). The GCS and the raylet
share the driver's fate, but when the driver is killed (SIGKILL, the OOM killer) the two
agents stay for up to 90 s: they ask the dead GCS for its logs before exiting.

:class:`Reaper` is a small watcher process (this file run as a script: standard library only,
in its own session, so a Ctrl-C or a signal to the driver's process group does not stop it).
The driver sends it the Ray processes it started (its descendants whose command line is one of
Ray's: ``ray::...`` or a program under the ``ray`` package) through a pipe. When that pipe
closes (the driver ended, in any way, or :meth:`Reaper.close` after ``ray.shutdown()``), the
watcher sends SIGTERM to every recorded process that still lives, and SIGKILL to those left
after :data:`GRACE_S`. A process is recorded by pid and start time, so a pid reused by another
program is never signalled; processes of other Ray instances (another user's ``ray start``,
another run) are never recorded. Linux only (``/proc``); elsewhere it does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("mona_sfl.runtime.reaper")

GRACE_S = 2.0  # SIGTERM, then SIGKILL after this long
PROC = "/proc"


def start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot), or None when it is gone or a zombie."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):  # exited, not yet waited for by its new parent
        return None
    return fields[19].decode()  # field 22 of stat(5); fields[0] is field 3


def _parents() -> dict[int, int]:
    out: dict[int, int] = {}
    for name in os.listdir(PROC):
        if not name.isdigit():
            continue
        try:
            with open(f"{PROC}/{name}/stat", "rb") as f:
                out[int(name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return out


def _argv(pid: int) -> list[str]:
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def ray_descendants(root: int, ray_dir: str) -> dict[int, str]:
    """``{pid: start time}`` of the descendants of ``root`` that are Ray processes: a title
    ``ray::...`` (workers, agents) or a program under ``ray_dir`` (the installed ``ray`` package)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    prefix = os.path.join(ray_dir, "")
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        argv = _argv(pid)
        if argv and (argv[0].startswith("ray::") or any(a.startswith(prefix) for a in argv[:3])):
            st = start_time(pid)
            if st is not None:
                found[pid] = st
    return found


class Reaper:
    """The watcher of one local Ray instance started by this process (see the module)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._sent: set[int] = set()
        if not os.path.isdir(PROC):
            return
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", os.path.abspath(__file__)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        except OSError as e:  # Ray still runs; only a SIGKILL of this process would leave its agents behind
            log.warning("cannot start the watcher of the local Ray instance (%s): its agents may outlive a killed run", e)

    def record(self) -> None:
        """Send the Ray processes this process has started so far (call after ``ray.init`` and after actors start)."""
        if self._proc is None or self._proc.stdin is None:
            return
        import ray

        found = ray_descendants(os.getpid(), os.path.dirname(os.path.abspath(ray.__file__)))
        lines = "".join(f"{pid} {st}\n" for pid, st in found.items() if pid not in self._sent)
        if not lines:
            return
        try:
            self._proc.stdin.write(lines.encode())
            self._proc.stdin.flush()
        except OSError:  # the watcher is gone: nothing to do about it here
            return
        self._sent.update(found)

    def close(self) -> None:
        """After ``ray.shutdown()``: the watcher ends what is left of the instance, then exits."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        try:
            if proc.stdin is not None:
                proc.stdin.close()
        except OSError:
            pass
        proc.wait()


def reap(procs: dict[int, str], grace_s: float = GRACE_S) -> None:
    """SIGTERM to each ``pid`` that still runs with the recorded start time; SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
        alive = [pid for pid, st in procs.items() if start_time(pid) == st]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [pid for pid in alive if start_time(pid) == procs[pid]]


def _watch() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    procs: dict[int, str] = {}
    for line in sys.stdin.buffer:  # until the driver closes the pipe or dies
        pid, _, st = line.decode().strip().partition(" ")
        if pid.isdigit() and st:
            procs[int(pid)] = st
    reap(procs)


if __name__ == "__main__":
    _watch()
