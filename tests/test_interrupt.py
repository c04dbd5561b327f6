"""Ctrl-C cannot be lost: an interrupt swallowed by code that catches everything (as torch's
lazy imports can) is raised again at the next progress-bar step (cnnexplain.interrupt)."""

import os
import signal

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
