"""Ctrl-C that cannot be lost.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be. If that is
inside code that catches every exception and carries on (measured: an interrupt that lands
while torch imports its lazily loaded internals, about 2.5 s into a command, is swallowed there
and the command runs on), the user's Ctrl-C is lost. While the CLI runs, :func:`installed` puts
a handler in place that also *records* the interrupt, and :func:`check` (called by every
progress-bar step, :mod:`cnnexplain.progress`) raises it again, so the command stops at the
next step of its current loop.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_pending = threading.Event()


def _handler(signum, frame) -> None:
    _pending.set()
    raise KeyboardInterrupt


def check() -> None:
    """Raise ``KeyboardInterrupt`` when a Ctrl-C was recorded under :func:`installed`."""
    if _pending.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Record SIGINT while the block runs (main thread only; elsewhere a no-op); the previous
    handler and a clear record are restored on exit."""
    _pending.clear()
    try:
        previous = signal.signal(signal.SIGINT, _handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending.clear()
