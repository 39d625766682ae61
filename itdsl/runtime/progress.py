"""A progress line on stderr for compiles that take more than a second (`settings.progress`).

Nothing is printed for a compile that finishes within the second (a warm cache loads every
kernel in milliseconds). After it, one line says what is being compiled; on a terminal the
line is rewritten as each kernel is done, elsewhere (a log) one more line ends it.
"""

from __future__ import annotations

import sys
import threading
import time

from ..settings import progress

DELAY = 1.0  # seconds before the first line


class Progress:
    """`with Progress(what, total) as p: ... p.step()` after each of `total` items."""

    def __init__(self, what: str, total: int, stream=None):
        self.what, self.total, self.done = what, total, 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.shown = False
        self._dead = False  # the stream failed: nothing more is written
        self._lock = threading.Lock()
        self._timer = threading.Timer(DELAY, self._show) if progress() else None
        tty = getattr(self.stream, "isatty", None)
        self.tty = bool(tty and tty())

    def __enter__(self) -> Progress:
        if self._timer is not None:
            self._timer.daemon = True
            self._timer.start()
        return self

    def _line(self) -> str:
        return (f"itdsl: compiling {self.what}: {self.done} of {self.total} kernels, "
                f"{time.perf_counter() - self.start:.1f} s")

    def _write(self, text: str) -> None:
        """Write to the stream; a stream that fails (a closed pipe, a full disk) ends the
        progress line, never the compile."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # (ValueError: a closed file)
            self.shown = False
            self.tty = False
            if self._timer is not None:
                self._timer.cancel()
            self._dead = True

    def _show(self) -> None:
        with self._lock:
            if self.done >= self.total or self._dead:
                return
            self.shown = True
            self._write(("\r" + self._line()) if self.tty else self._line() + "\n")

    def step(self) -> None:
        with self._lock:
            self.done += 1
            if self.shown and self.tty:
                self._write("\r" + self._line())

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self.shown:
                end = "" if exc[0] is None else " (stopped by an error)"
                self._write(("\r" if self.tty else "") + self._line() + end + "\n")
