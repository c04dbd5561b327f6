"""``cnnexplain data synth`` (export the synthetic world) and ``cnnexplain data inspect``."""

from __future__ import annotations

import json
import sys

import typer
from rich.table import Table

from cnnexplain.cli.common import run_job, stdout_console
from cnnexplain.cli.declare import command
from cnnexplain.cli.main import app
from cnnexplain.config.data import InspectOptions, SynthOptions

data_app = typer.Typer(help="Generate the synthetic world on disk and inspect datasets.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

SYNTH_HELP = """Write the synthetic world to --out as a Broden directory, an ImageFolder
train/val tree, or TCAV concept folders (<concept>/ and random_<i>/).

Example: cnnexplain data synth --format broden --num-images 500 --out data/broden

Writes are staged: a killed export leaves nothing that looks complete."""

INSPECT_HELP = """Summarise any supported dataset: counts per class / concept, image sizes.

Example: cnnexplain data inspect synthetic:n=600,res=32"""


def synth(options: SynthOptions):
    from cnnexplain.jobs import synth as job

    run_job(job, options, lambda output, term: term.print(
        f"wrote the {output.summary['format']} export of {output.summary['world']} to "
        f"{output.summary['path']}"))
    return 0


def inspect(options: InspectOptions):
    from cnnexplain.config.fields import check
    from cnnexplain.data.files import FilePolicy
    from cnnexplain.data.inspect import inspect_dataset

    check(options)
    rows = inspect_dataset(options.target, FilePolicy.of(options.files))
    if options.json_output:
        sys.stdout.write(json.dumps(rows, default=str) + "\n")
        return 0
    table = Table(title=f"dataset {options.target}")
    for col in ("group", "name", "count", "detail"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r.get("group", "")), str(r.get("name", "")),
                      "" if r.get("count") is None else str(r["count"]), str(r.get("detail", "")))
    stdout_console().print(table)
    return 0


command(data_app, "synth", SynthOptions, synth, help=SYNTH_HELP)
command(data_app, "inspect", InspectOptions, inspect, help=INSPECT_HELP)
