"""``flower-supernode`` with its polling intervals settable from the outside.

Flower 1.42's SuperNode main loop (``flwr/supernode/start_client_internal.py``) has two fixed
sleeps that dominate a deployed split-learning step, where every training step is one
message round trip per node:

* ``time.sleep(3)`` after a pull from the SuperLink that found no message (the node asks
  for its next message right after it pushed a reply, before the ServerApp can have sent the
  next step's message, so every step waits up to 3 s);
* ``time.sleep(0.5)`` between looks for the ClientApp's reply (every step waits up to 0.5 s
  after the ClientApp finished) and for a reply's content in the object store.

Flower reads neither from a flag or an environment variable. ``python -m
mona_sfl.runtime.flower.supernode ARGS`` (the same ``ARGS`` as ``flower-supernode``) runs
Flower's own ``flower_supernode()`` with those two sleeps shortened to
``MONA_SFL_SUPERNODE_POLL_S`` (default 0.05 s) and ``MONA_SFL_SUPERNODE_REPLY_POLL_S``
(default 0.01 s): only the sleeps of that one module are changed (its module-level ``time``
is replaced by a :class:`PollClock`), nothing else of Flower. Each idle poll is one HTTP
request to the SuperLink (20 per second per node at 0.05 s). Other Flower versions are run
unchanged, with a warning: the patch is checked against the 1.42 source it was written for.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from types import ModuleType
from typing import Any

IDLE_ENV = "MONA_SFL_SUPERNODE_POLL_S"
REPLY_ENV = "MONA_SFL_SUPERNODE_REPLY_POLL_S"
DEFAULT_IDLE_S = 0.05
DEFAULT_REPLY_S = 0.01
FLOWER_IDLE_S = 3.0  # the sleeps of flwr 1.42's start_client_internal, as written there
FLOWER_REPLY_S = 0.5


def interval(env: str, default: float) -> float:
    """A poll interval from the environment: seconds in [0.001, 60]; ValueError naming the variable otherwise."""
    raw = os.environ.get(env, "")
    if not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r} is not a number of seconds") from None
    if not (math.isfinite(value) and 0.001 <= value <= 60.0):
        raise ValueError(f"{env}={raw!r} must be between 0.001 and 60 seconds")
    return value


class PollClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: its two poll sleeps shortened.

    ``sleep(3)`` becomes ``sleep(idle_s)`` and ``sleep(0.5)`` becomes ``sleep(reply_s)``; any
    other duration and every other attribute are the real ``time`` module's.
    """

    def __init__(self, idle_s: float, reply_s: float, clock: ModuleType = time) -> None:
        self.idle_s = idle_s
        self.reply_s = reply_s
        self._time = clock

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_S:
            seconds = self.idle_s
        elif seconds == FLOWER_REPLY_S:
            seconds = self.reply_s
        self._time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._time, name)


def patch(idle_s: float, reply_s: float) -> bool:
    """Shorten the SuperNode loop's poll sleeps in this process; False (nothing changed) on a Flower it does not know."""
    import inspect

    import flwr
    from flwr.supernode import start_client_internal as sci

    try:
        source = inspect.getsource(sci)
    except OSError:
        source = ""
    expected = getattr(flwr, "__version__", "").startswith("1.42.") and "time.sleep(3)" in source and "time.sleep(0.5)" in source
    if not expected:
        warnings.warn(
            f"flwr {getattr(flwr, '__version__', '?')}: its SuperNode loop is not the one this patch was written for "
            "(flwr 1.42); running it with Flower's own poll intervals", RuntimeWarning, stacklevel=2,
        )
        return False
    sci.time = PollClock(idle_s, reply_s)  # type: ignore[assignment]
    return True


def main(argv: list[str] | None = None) -> None:
    """``flower-supernode ARGS`` with the poll intervals of :data:`IDLE_ENV` / :data:`REPLY_ENV`."""
    try:
        idle_s, reply_s = interval(IDLE_ENV, DEFAULT_IDLE_S), interval(REPLY_ENV, DEFAULT_REPLY_S)
    except ValueError as e:
        print(f"mona-sfl supernode: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    patch(idle_s, reply_s)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()


if __name__ == "__main__":
    main()


__all__ = ["PollClock", "patch", "interval", "main", "IDLE_ENV", "REPLY_ENV"]
