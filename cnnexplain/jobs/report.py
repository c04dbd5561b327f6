"""``report``: one HTML page, summary.csv and tables from any set of run directories."""

from __future__ import annotations

from dataclasses import dataclass

from cnnexplain.config.report import ReportOptions
from cnnexplain.jobs.base import Output, Session

COMMAND = "report"


@dataclass
class Plan:
    options: ReportOptions


def plan(options: ReportOptions, session: Session) -> Plan:
    return Plan(options)


def run(plan: Plan, session: Session):
    """Everything each run directory holds (:mod:`cnnexplain.report.collect`)."""
    from cnnexplain.report.build import collect_runs

    runs = collect_runs(plan.options.run_dirs, session.notice)
    for r in runs:
        if not r.sections:
            session.notice(f"{r.path} holds no cnnexplain results yet")
    return runs


def write(plan: Plan, runs, session: Session) -> Output:
    """report/index.html, summary.csv and the PNGs."""
    from cnnexplain.report.build import build_report

    rep = build_report(runs, session.out, progress=session.progress)
    summary = {"index": str(rep.index), "runs": [str(d) for d in plan.options.run_dirs],
               "sections": {r.name: r.sections for r in rep.runs}}
    return Output(summary=summary, paths=rep.files, result=rep)
