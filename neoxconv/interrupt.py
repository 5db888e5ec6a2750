"""Ctrl-C that lands between writes: the first SIGINT is deferred to the next safe point."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class InterruptGuard:
    """Within ``deferred_sigint()``, a first Ctrl-C sets a flag that ``check()`` turns into KeyboardInterrupt
    at a point where no file is half-open; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_sigint() -> Iterator[InterruptGuard]:
    guard = InterruptGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return

    def handler(signum, frame):
        if guard.requested:
            raise KeyboardInterrupt
        guard.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield guard
    finally:
        signal.signal(signal.SIGINT, previous)
