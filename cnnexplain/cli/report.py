"""``cnnexplain report RUN_DIR [RUN_DIR ...]``: options, one job, tables."""

from __future__ import annotations

from rich.table import Table

from cnnexplain.cli.common import run_job
from cnnexplain.cli.declare import command
from cnnexplain.cli.main import app
from cnnexplain.config.report import ReportOptions

HELP = """Turn run directories into one report: Rich tables, summary.csv and index.html.

Example: cnnexplain report runs/std runs/picnn --out runs

Writes report/summary.csv (one row per run) and report/index.html: training curves, gate
heatmaps, entanglement side by side, saliency grids, dissection bars and top concepts, TCAV bars
with significance. Missing sections are simply left out. --out defaults to the run directory
(one run) or the runs' common parent."""


def report(options: ReportOptions):
    from cnnexplain.jobs import report as job

    run_job(job, options, render)
    return 0


def render(output, term) -> None:
    rep = output.result
    table = Table(title="runs")
    show = rep.summary.drop(columns=["path"], errors="ignore")
    show = show[[c for c in show.columns if show[c].notna().any()]]
    for c in show.columns:
        table.add_column(str(c), overflow="fold")
    for _, row in show.iterrows():
        table.add_row(*[_fmt(v) for v in row])
    term.print(table)
    if rep.metrics is not None:
        mt = Table(title="entanglement")
        mt.add_column("metric")
        for c in rep.metrics.columns:
            mt.add_column(str(c))
        for metric, row in rep.metrics.iterrows():
            mt.add_row(str(metric), *[_fmt(v) for v in row])
        term.print(mt)
    term.print(f"report: {rep.index}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if v != v else f"{v:.4g}"
    return "" if v is None else str(v)


command(app, "report", ReportOptions, report, help=HELP)
