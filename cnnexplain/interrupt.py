"""Ctrl-C that cannot be lost.

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be. If that is
inside code that catches every exception and carries on (measured: an interrupt that lands
while torch imports its lazily loaded internals, about 2.5 s into a command, is swallowed there
and the command runs on), the user's Ctrl-C is lost. While the CLI runs, :func:`installed` puts
a handler in place that also *records* the interrupt, and :func:`check` (called by every
progress-bar step, :mod:`cnnexplain.progress`) raises it again, so the command stops at the
next step of its current loop. An interrupt that lands in a finalizer or weakref callback
(where Python can only print it as "Exception ignored in ...") is recorded the same way, and
that traceback is not printed: the command still ends with its one line.
"""

from __future__ import annotations

import contextlib
import signal
import sys
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


def _quiet_recorded_interrupts(previous):
    """An unraisable-exception hook that drops a KeyboardInterrupt :func:`check` will raise
    again (recorded by :func:`_handler`) and passes everything else to ``previous``."""

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and _pending.is_set():
            return
        previous(unraisable)

    return hook


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Record SIGINT while the block runs (main thread only; elsewhere a no-op); the previous
    handler, unraisable-exception hook and a clear record are restored on exit."""
    _pending.clear()
    try:
        previous = signal.signal(signal.SIGINT, _handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_recorded_interrupts(previous_hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook
        _pending.clear()
