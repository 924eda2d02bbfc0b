"""Progress of the phases a user waits through before round 1 (standard library only).

On a terminal a counted phase redraws one line (done, total, rate, ETA); written to a
file or a pipe it prints a line at most every 10% or 15 s, so logs stay readable
(no carriage returns). A phase names itself when it starts and gives its time when it
ends, if it took `quiet_seconds` or more.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import IO


class Progress:
    def __init__(self, stream: IO[str] | None = None, *, enabled: bool = True, quiet_seconds: float = 2.0):
        self._stream = stream or sys.stdout
        self._enabled = enabled
        self._quiet_seconds = quiet_seconds
        self._interactive = bool(getattr(self._stream, "isatty", lambda: False)())

    def line(self, text: str) -> None:
        if self._enabled:
            print(text, file=self._stream, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """`name ...` now; when done, `name: 2.3 s` if it took `quiet_seconds` or more.

        On a terminal the final line replaces the first (and a quick phase leaves none).
        """
        began = time.monotonic()
        if self._enabled:
            print(f"{name} ...", end="\r" if self._interactive else "\n", file=self._stream, flush=True)
        yield
        seconds = time.monotonic() - began
        if not self._enabled:
            return
        text = f"{name}: {seconds:.1f} s" if seconds >= self._quiet_seconds else ""
        if self._interactive:
            print(f"\r\033[K{text}", end="\n" if text else "", file=self._stream, flush=True)
        elif text:
            print(text, file=self._stream, flush=True)

    def counter(self, name: str, unit: str) -> Counter:
        return Counter(self, name, unit)


class Counter:
    """Called with (done, total); draws `name: done/total unit (rate/s, ETA)`."""

    def __init__(self, progress: Progress, name: str, unit: str):
        self._progress = progress
        self._name = name
        self._unit = unit
        self._began = time.monotonic()
        self._last_print = 0.0
        self._last_fraction = 0.0

    def __call__(self, done: int, total: int) -> None:
        p = self._progress
        if not p._enabled:
            return
        now = time.monotonic()
        elapsed = now - self._began
        fraction = done / total if total else 1.0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_text = f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s" if eta != float("inf") else "ETA ?"
        width = 24
        bar = "#" * int(width * fraction) + "." * (width - int(width * fraction))
        text = f"{self._name}: [{bar}] {done:,}/{total:,} {self._unit} ({rate:,.0f}/s, {eta_text})"
        finished = done >= total
        if p._interactive:
            if finished or now - self._last_print >= 0.2:
                print(f"\r\033[K{text}", end="\n" if finished else "", file=p._stream, flush=True)
                self._last_print = now
        elif finished or fraction - self._last_fraction >= 0.1 or now - self._last_print >= 15:
            print(text, file=p._stream, flush=True)
            self._last_print, self._last_fraction = now, fraction
