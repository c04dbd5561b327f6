"""Ctrl-C cannot be lost: an interrupt swallowed by code that catches everything (as torch's
lazy imports can) is raised again at the next progress-bar step (cnnexplain.interrupt)."""

import os
import signal
import sys

import pytest

from cnnexplain import interrupt
from cnnexplain.progress import ProgressFactory, silent


def _swallowed_sigint():
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    except BaseException:  # noqa: BLE001 -- what the library code we guard against does
        pass


@pytest.mark.parametrize("factory", [silent, lambda: ProgressFactory(enabled=True)])
def test_a_swallowed_interrupt_stops_the_next_progress_step(factory):
    before = signal.getsignal(signal.SIGINT)
    with interrupt.installed():
        with factory()(total=3, description="loop") as task:
            task.advance(1)  # nothing recorded yet: no effect
            _swallowed_sigint()
            with pytest.raises(KeyboardInterrupt):
                task.advance(1)
    assert signal.getsignal(signal.SIGINT) is before
    interrupt.check()  # the record is cleared on exit: no raise


def test_without_the_cli_handler_nothing_is_recorded():
    with silent()(total=1) as task:
        task.advance(1)
    interrupt.check()


def test_an_interrupt_in_a_finalizer_is_recorded_without_a_traceback(monkeypatch):
    """SIGINT that lands in a weakref callback or __del__ (seen under load: inside
    WeakValueDictionary's remove) cannot propagate; Python would print "Exception ignored in"
    and a traceback. Under the CLI's handler it is recorded and raised at the next step, and
    not reported; other unraisable exceptions still reach the previous hook."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_type))

    class Interrupted:
        def __del__(self):
            interrupt._handler(signal.SIGINT, None)

    class Broken:
        def __del__(self):
            raise ValueError("a real bug in a finalizer")

    with interrupt.installed():
        obj = Interrupted()
        del obj
        assert reported == []
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
    with interrupt.installed():
        obj = Broken()
        del obj
        assert reported == [ValueError]
    assert sys.unraisablehook is not None and reported == [ValueError]
