"""``cnnexplain report RUN_DIR [RUN_DIR ...]``: tables, summary.csv and one HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cnnexplain.cli import options as O
from cnnexplain.cli.common import start_run
from cnnexplain.cli.main import app
from cnnexplain.errors import UsageError


def _default_out(dirs: list[Path]) -> Path:
    """The run directory itself for one run; the runs' common parent for several."""
    if len(dirs) == 1:
        return dirs[0]
    import os

    return Path(os.path.commonpath([str(d.resolve()) for d in dirs]))


@app.command("report")
def report(run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (from train-gated, "
                                                           "evaluate-entanglement, saliency, dissect, tcav).",
                                                           show_default=False)],
           out: O.Out = None, quiet: O.Quiet = False, json_output: O.Json = False,
           recipe: O.Recipe = None):
    """Turn run directories into one report: Rich tables, summary.csv and index.html.

    Writes report/summary.csv (one row per run) and report/index.html: training curves, gate heatmaps, entanglement side by side, saliency grids,
    dissection bars and top concepts, TCAV bars with significance. Missing sections are simply
    left out. --out defaults to the run directory (one run) or the runs' common parent."""
    for d in run_dirs:
        if not d.is_dir():
            raise UsageError(f"run directory {d} does not exist" if not d.exists()
                             else f"{d} is a file, not a run directory",
                             "pass directories written with --out by other cnnexplain commands")
    if out is None:
        out = _default_out(run_dirs)
    locals_ = dict(locals())
    run = start_run("report", locals_)
    from cnnexplain.report.build import build_report

    rep = build_report(run_dirs, run.out, notice=run.notice)
    for r in rep.runs:
        if not r.sections:
            run.notice(f"{r.path} holds no cnnexplain results yet")
    table = Table(title="runs")
    show = rep.summary.drop(columns=["path"], errors="ignore")
    show = show[[c for c in show.columns if show[c].notna().any()]]
    for c in show.columns:
        table.add_column(str(c), overflow="fold")
    for _, row in show.iterrows():
        table.add_row(*[_fmt(v) for v in row])
    run.print(table)
    if rep.metrics is not None:
        mt = Table(title="entanglement")
        mt.add_column("metric")
        for c in rep.metrics.columns:
            mt.add_column(str(c))
        for metric, row in rep.metrics.iterrows():
            mt.add_row(str(metric), *[_fmt(v) for v in row])
        run.print(mt)
    run.print(f"report: {rep.index}")
    run.finish(summary={"index": str(rep.index), "runs": [str(d) for d in run_dirs],
                        "sections": {r.name: r.sections for r in rep.runs}},
               results=rep.files)
    return 0


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if v != v else f"{v:.4g}"
    return "" if v is None else str(v)
