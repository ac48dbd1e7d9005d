"""Flower 1.42's fixed polling, settable from the outside (deployment).

A deployed split-learning step is one message round trip per node, and Flower 1.42 polls at
fixed intervals that nothing in its command lines or environment sets:

* the SuperNode main loop (``flwr/supernode/start_client_internal.py``) sleeps 3 s
  (``time.sleep(3)``) after a pull from the SuperLink that found no message: the node asks
  for its next message right after it pushed a reply, before the ServerApp can have sent the
  next step's message, so every step waited up to 3 s;
* the same loop sleeps 0.5 s between looks for the ClientApp's reply;
* pulling a message's objects (``flwr/supercore/inflatable/inflatable_utils.py``
  ``pull_objects``: the SuperNode from the SuperLink, the ClientApp from the SuperNode, the
  ServerApp's ``HttpGrid`` from the SuperLink) waits 1 s, then 2 s, 4 s ... (cap 10 s) when
  an object is not there yet. It often is not: the SuperNode makes a message visible to its
  ClientApp before it has pulled the message's objects, and a reply is visible to the
  ServerApp before its objects are pushed.

:func:`apply` changes these in the calling process: the SuperNode loop's module-level
``time`` is replaced by a :class:`PollClock` (``sleep(3)`` -> :data:`IDLE_ENV`,
``sleep(0.5)`` -> :data:`REPLY_ENV`) and the keyword defaults ``initial_backoff`` /
``backoff_cap`` of ``pull_objects`` and ``pull_and_inflate_object_from_tree`` are set to
:data:`BACKOFF_ENV` / :data:`BACKOFF_CAP_ENV`. Nothing else of Flower changes. Each idle
poll is one HTTP request (20 per second per SuperNode at 0.05 s). A Flower other than 1.42
is left alone, with a warning: the patch is checked against the source it was written for.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from types import ModuleType
from typing import Any

IDLE_ENV = "MONA_SFL_SUPERNODE_POLL_S"
REPLY_ENV = "MONA_SFL_SUPERNODE_REPLY_POLL_S"
BACKOFF_ENV = "MONA_SFL_PULL_BACKOFF_S"
BACKOFF_CAP_ENV = "MONA_SFL_PULL_BACKOFF_CAP_S"
DEFAULT_IDLE_S = 0.05
DEFAULT_REPLY_S = 0.01
DEFAULT_BACKOFF_S = 0.01
DEFAULT_BACKOFF_CAP_S = 0.2
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


def _known_flower(module: ModuleType, *needles: str) -> bool:
    import inspect

    import flwr

    try:
        source = inspect.getsource(module)
    except OSError:
        source = ""
    if getattr(flwr, "__version__", "").startswith("1.42.") and all(n in source for n in needles):
        return True
    warnings.warn(
        f"flwr {getattr(flwr, '__version__', '?')}: {module.__name__} is not the code this patch was written for "
        "(flwr 1.42); it keeps Flower's own poll intervals", RuntimeWarning, stacklevel=3,
    )
    return False


def patch_supernode_loop(idle_s: float, reply_s: float) -> bool:
    """Shorten the SuperNode loop's poll sleeps in this process; False (nothing changed) on a Flower it does not know."""
    from flwr.supernode import start_client_internal as sci

    if not _known_flower(sci, "time.sleep(3)", "time.sleep(0.5)"):
        return False
    sci.time = PollClock(idle_s, reply_s)  # type: ignore[assignment]
    return True


def patch_object_pulls(initial_s: float, cap_s: float) -> bool:
    """The back-off of Flower's object pulls in this process: ``initial_s``, doubling up to ``cap_s``."""
    from flwr.supercore.inflatable import inflatable_utils as iu

    if not _known_flower(iu, "initial_backoff", "backoff_cap"):
        return False
    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        kw = fn.__kwdefaults__
        if kw is None or "initial_backoff" not in kw or "backoff_cap" not in kw:
            return False
        kw["initial_backoff"], kw["backoff_cap"] = initial_s, max(cap_s, initial_s)
    return True


def apply(*, supernode: bool = False) -> dict[str, float]:
    """Both patches (the SuperNode loop only with ``supernode``) with the intervals of the environment.

    Returns the intervals applied; raises ValueError for a bad environment value (before changing anything).
    """
    values = {"backoff_s": interval(BACKOFF_ENV, DEFAULT_BACKOFF_S), "backoff_cap_s": interval(BACKOFF_CAP_ENV, DEFAULT_BACKOFF_CAP_S)}
    if supernode:
        values.update(idle_s=interval(IDLE_ENV, DEFAULT_IDLE_S), reply_s=interval(REPLY_ENV, DEFAULT_REPLY_S))
    patch_object_pulls(values["backoff_s"], values["backoff_cap_s"])
    if supernode:
        patch_supernode_loop(values["idle_s"], values["reply_s"])
    return values


__all__ = ["PollClock", "apply", "interval", "patch_object_pulls", "patch_supernode_loop",
           "IDLE_ENV", "REPLY_ENV", "BACKOFF_ENV", "BACKOFF_CAP_ENV"]
