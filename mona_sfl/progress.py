"""Progress of long work on stderr: a tqdm bar on a terminal, periodic plain lines otherwise.

:class:`Meter` is the one progress display of the package (training steps, decoding an image
folder, the attack's decoder epochs). Disabled, it prints nothing. On a terminal it draws a
tqdm bar; elsewhere (a log file, a pipe, CI) it prints a line about every 5% of the work and
at least every 30 s, and one at the end. It imports tqdm only when a bar is drawn.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

#: Plain lines: one about every this share of the total, and at least every ``LINE_SECONDS``.
LINE_SHARE = 0.05
LINE_SECONDS = 30.0


class Meter:
    """``Meter(total, desc, unit, enabled)``; ``update(done, **postfix)`` with the count done so far; ``close()``.

    Thread-safe: workers may call :meth:`advance` (add to the count) concurrently.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = max(0, int(total))
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self._lock = threading.Lock()
        self._bar: Any = None
        self._every = max(1, int(self.total * LINE_SHARE))
        self._printed = 0
        self._last = time.perf_counter()
        self._closed = False
        if enabled and _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, done: int, **postfix: Any) -> None:
        """Set the count done so far; ``postfix`` (name=value) is shown after it."""
        if not self.enabled:
            return
        with self._lock:
            self.done = int(done)
            self._show(postfix)

    def advance(self, n: int = 1) -> None:
        """Add ``n`` to the count done."""
        if not self.enabled:
            return
        with self._lock:
            self.done += int(n)
            self._show({})

    def _show(self, postfix: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.n = self.done
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.refresh()
            return
        now = time.perf_counter()
        due = self.done - self._printed >= self._every or now - self._last >= LINE_SECONDS or self.done >= self.total
        if due and self.done != self._printed:
            self._printed, self._last = self.done, now
            self.stream.write(self.line(postfix) + "\n")
            self.stream.flush()

    def line(self, postfix: dict[str, Any] | None = None) -> str:
        """The plain progress line: ``desc done/total unit (pct%) name value ...``."""
        pct = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f" {k} {v}" for k, v in (postfix or {}).items())
        return f"{self.desc} {self.done}/{self.total} {self.unit}{pct}{extra}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["LINE_SECONDS", "LINE_SHARE", "Meter"]
