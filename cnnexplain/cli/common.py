"""What every command does around its one job: validate the options, open the session, show
progress and notices, print the result (a table, or one JSON line with --json)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape

from cnnexplain.progress import ProgressFactory
from cnnexplain.runtime import Dist

# ---------------------------------------------------------------------------------------------
# The one way a command runs its job: validate, open the session, execute, print
# ---------------------------------------------------------------------------------------------

LOG_WIDTH = 200
"""Columns of tables written to a file or pipe (Rich would cut them to 80)."""


def stdout_console() -> Console:
    """Rich console on stdout; off a terminal (a log, a pipe) tables get ``LOG_WIDTH`` columns
    unless ``COLUMNS`` says otherwise, so no column is cut to an ellipsis."""
    import os

    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console(soft_wrap=False)
    return Console(soft_wrap=False, width=LOG_WIDTH)


@dataclass
class Terminal:
    """What a command shows: human output on stdout (none under --json), notices on stderr,
    progress bars on stderr (none with --quiet, under --json, off a terminal, on rank > 0)."""

    quiet: bool = False
    json: bool = False
    fields: dict = field(default_factory=dict)
    """The command's declared options: notices name them in backquotes, printed as flags."""
    console: Console = field(default_factory=lambda: stdout_console())
    err: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True))

    @classmethod
    def of(cls, options) -> "Terminal":
        from cnnexplain.config.fields import declared

        run = getattr(options, "run", None)
        return cls(quiet=bool(getattr(run, "quiet", False)),
                   json=bool(getattr(run, "json_output", False)),
                   fields={d.name: d for d in declared(options) if d.opt.cli})

    def notice(self, message: str) -> None:
        from cnnexplain.cli.declare import render

        if not self.quiet:
            self.err.print(f"[yellow]note:[/] {escape(render(message, self.fields))}",
                           soft_wrap=True, highlight=False)

    def print(self, *renderables) -> None:
        if not self.json:
            for r in renderables:
                self.console.print(r)

    def progress(self, dist: Dist) -> ProgressFactory:
        show = None if not self.quiet else False
        if self.json or not dist.is_main:
            show = False
        return ProgressFactory(enabled=show, console=self.err)


def run_job(job, options, render=None):
    """Run ``job`` with ``options`` as the CLI does: validate (before anything else), open
    the session, execute (plan, run, write, run.json), print the --json summary or call
    ``render(output, terminal)``, then raise the job's verdict if it has one."""
    from cnnexplain.jobs.base import Session, execute, validate

    validate(options)
    term = Terminal.of(options)
    session = Session.open(job.COMMAND, getattr(options, "run", None),
                           getattr(options, "compute", None), notice=term.notice)
    session.progress = term.progress(session.dist)
    output = execute(job, options, session)
    if session.dist.is_main:
        if term.json:
            sys.stdout.write(json.dumps({"command": job.COMMAND, "out": str(session.out),
                                         **output.entry["summary"]}, indent=None) + "\n")
            sys.stdout.flush()
        elif render is not None:
            render(output, term)
    if output.failure is not None:
        raise output.failure
    return output
