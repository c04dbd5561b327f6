"""Rich progress bars for every long loop: shown on stderr, quiet with ``quiet`` and
automatically when stdout is not a terminal."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from cnnexplain.interrupt import check as _check_interrupt


class _NullTask:
    def advance(self, n: float = 1) -> None:
        _check_interrupt()

    def update(self, **fields) -> None:
        pass


class _Task:
    def __init__(self, progress: Progress, task_id):
        self._progress = progress
        self._id = task_id

    def advance(self, n: float = 1) -> None:
        _check_interrupt()
        self._progress.advance(self._id, n)

    def update(self, **fields) -> None:
        """Show live figures next to the bar, e.g. ``update(loss=0.31, acc=0.9)``."""
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
        self._progress.update(self._id, info=text)


class ProgressFactory:
    """``with progress(total=N, description="...") as task: task.advance(k)``.

    Nested calls share one live display. ``enabled=None`` decides from stdout being a terminal.
    """

    def __init__(self, enabled: bool | None = None, console: Console | None = None):
        if enabled is None:
            enabled = sys.stdout.isatty()
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._live: Progress | None = None
        self._depth = 0

    @contextlib.contextmanager
    def __call__(self, total: float | None = None, description: str = "") -> Iterator:
        if not self.enabled:
            yield _NullTask()
            return
        if self._live is None:
            self._live = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                  TextColumn("{task.fields[info]}"), console=self.console,
                                  transient=False)
            self._live.start()
        self._depth += 1
        task_id = self._live.add_task(description, total=total, info="")
        try:
            yield _Task(self._live, task_id)
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._live.stop()
                self._live = None

    def track(self, iterable: Iterable, description: str = "", total: float | None = None):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        with self(total=total, description=description) as task:
            for item in iterable:
                yield item
                task.advance(1)


def silent() -> ProgressFactory:
    return ProgressFactory(enabled=False)
