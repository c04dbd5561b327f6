"""Build the report: collect each run, write report/summary.csv, PNG plots and index.html
(atomically, index.html last), and return what was written for the terminal tables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd

from cnnexplain import __version__
from cnnexplain.io import write_bytes, write_csv, write_text
from cnnexplain.layout import RunLayout
from cnnexplain.report import html as H
from cnnexplain.report import plots
from cnnexplain.report import verdicts as V
from cnnexplain.report.collect import RunResults, collect
from cnnexplain.report.summary import metric_matrix, summary_frame


@dataclass
class Report:
    runs: list[RunResults]
    summary: pd.DataFrame
    metrics: pd.DataFrame | None
    index: Path
    files: list[Path]
    checks: list = None


def _dissect_matrix(runs: list[RunResults]) -> pd.DataFrame | None:
    cols = {}
    for r in runs:
        d = r.dissect_summary
        if d is not None and {"category", "detector_units"} <= set(d.columns):
            if "layer" in d:
                d = d[d["layer"] == d["layer"].iloc[-1]]
            d = d[d["category"].astype(str) != "all"]
            cols[r.name] = d.set_index("category")["detector_units"]
    return pd.DataFrame(cols) if cols else None


def collect_runs(run_dirs: list[Path], notice: Callable[[str], None] = lambda m: None
                 ) -> list[RunResults]:
    """Read every run directory; run names made unique for the report's columns."""
    runs = [collect(d, notice) for d in run_dirs]
    names = [r.name for r in runs]
    for i, r in enumerate(runs):
        if names.count(r.name) > 1:
            r.name = f"{r.name}#{i + 1}"
    return runs


def build_report(runs: list[RunResults], out: Path, progress=None) -> Report:
    """The collected ``runs`` -> ``out/report/{summary.csv, index.html, *.png}``."""
    layout = RunLayout(out)
    rdir = layout.report
    files: list[Path] = []

    def save_png(name: str, data: bytes | None) -> bytes | None:
        if data is not None:
            write_bytes(rdir / name, data)
            files.append(rdir / name)
        return data

    summary = summary_frame(runs)
    write_csv(layout.report_summary, summary)
    files.append(layout.report_summary)
    metrics = metric_matrix(runs)
    checks = V.verdicts(runs)
    write_csv(layout.report_checks, V.frame(checks))
    files.append(layout.report_checks)

    def said(section: str) -> str:
        return H.verdicts([v for v in checks if v.section == section])

    sections: list[tuple[str, str, str]] = []
    show = summary.drop(columns=["path"], errors="ignore")
    sections.append(("checks", "What you should see", H.verdicts(checks, with_section=True) +
                     "<p class=\"muted\">Each check compares a result with what a working "
                     "method shows on these runs (report/checks.csv); a check that is not seen "
                     "means the pictures below are not evidence.</p>"))
    sections.append(("summary", "Summary", H.table(show) +
                     "<p class=\"muted\">One row per run; the same table is report/summary.csv.</p>"))
    if metrics is not None:
        chart = save_png("entanglement.png", plots.grouped_bars(
            metrics.loc[[m for m in metrics.index if str(m).upper().startswith(("ACC", "MIS"))]]
            if any(str(m).upper().startswith(("ACC", "MIS")) for m in metrics.index) else metrics,
            "entanglement metrics by run", "value"))
        heat = ""
        for r in runs:
            if r.entanglement_ablation is not None:
                png = save_png(f"ablation-{_slug(r.name)}.png", plots.ablation_heatmap(
                    r.entanglement_ablation, f"{r.name}: accuracy with a cluster removed"))
                heat += H.img(png, r.name + " cluster ablation")
        sections.append(("entanglement", "Channel-class entanglement", said("entanglement") +
                         H.table(metrics.reset_index().rename(columns={"index": "metric"})) +
                         H.img(chart, "entanglement metrics by run") +
                         (f"<h3>Removing one class's cluster (row) on each class's images "
                          f"(column)</h3><p class=\"muted\">A class-specific model darkens "
                          f"only the diagonal: removing a class's channels removes that class "
                          f"and no other.</p><div class=\"row\">{heat}</div>" if heat else "")))
    train_body = ""
    for r in runs:
        if r.train_log is None and r.gate_png is None:
            continue
        curves = save_png(f"training-{_slug(r.name)}.png",
                          plots.training_curves(r.train_log, f"{r.name}: training"))
        train_body += (f"<h3>{H.esc(r.name)}</h3><div class=\"row\">"
                       f"{H.img(curves, r.name + ' training curves')}"
                       f"{H.img(r.gate_png, r.name + ' gate matrix')}</div>")
    sections.append(("training", "Training", said("training") + train_body))
    sal = ""
    for r in runs:
        if r.saliency_eval is None and r.saliency_grid is None:
            continue
        sal += (f"<h3>{H.esc(r.name)}</h3>{H.table(r.saliency_eval)}"
                f"{H.img(r.saliency_grid, r.name + ' saliency grid')}")
        curves = save_png(f"saliency-curves-{_slug(r.name)}.png", plots.evaluation_curves(
            r.saliency_curves, f"{r.name}: evaluation curves (mean over pairs)"))
        if curves:
            sal += H.img(curves, r.name + " evaluation curves")
        if r.saliency_ranks is not None and len(r.saliency_ranks):
            heat = save_png(f"saliency-agreement-{_slug(r.name)}.png", plots.agreement_heatmap(
                r.saliency_agreement, "rank agreement of the metrics (Kendall's tau-b)"))
            sal += ("<h4>How the metrics rank the methods (1 = best)</h4><p class=\"muted\">"
                    "Each column ranks the methods by one metric in its own direction; the "
                    "heatmap is the agreement of two metrics' rankings (Kendall's tau-b; -1: "
                    "reversed). Metrics disagree (Hedström et al. 2023, MetaQuantus; Tomsett et "
                    "al. 2020): trust what several agree on.</p>"
                    f"{H.table(r.saliency_ranks)}{H.img(heat, r.name + ' metric agreement')}")
    if sal:
        sal = (said("saliency") + "<p class=\"muted\">Green box: the explained class's object; "
               "white cross: the map's maximum (the pointing game's point). For a gated model, "
               "gated-cam is Grad-CAM from the class's own channel cluster and "
               "gated-cam-complement from all other channels (Guo et al. 2024, fig. 7).</p>" + sal)
    sections.append(("saliency", "Saliency", sal))
    dis = ""
    dmatrix = _dissect_matrix(runs)
    if dmatrix is not None and len(runs) > 1:
        dis += H.img(save_png("dissection.png", plots.grouped_bars(
            dmatrix, "detector units per category", "units")), "detectors per category by run")
    for r in runs:
        if r.dissect_summary is None and r.dissect_tally is None:
            continue
        top = None
        if r.dissect_tally is not None and "score" in r.dissect_tally:
            keep = [c for c in ("unit", "category", "label", "score") if c in r.dissect_tally]
            top = r.dissect_tally.sort_values("score", ascending=False)[keep].head(20)
        dis += (f"<h3>{H.esc(r.name)}</h3><div class=\"row\">"
                + "".join(H.img(p, r.name + " detectors") for p in r.dissect_pngs)
                + f"</div>{H.table(r.dissect_summary)}<h3>Top units</h3>{H.table(top)}"
                + (f"<h3>Concepts per class cluster</h3>{H.table(r.dissect_clusters)}"
                   if r.dissect_clusters is not None else ""))
    if dis:
        dis = said("dissection") + dis
    sections.append(("dissection", "Network Dissection", dis))
    tc = ""
    for r in runs:
        if r.tcav is None:
            continue
        tc += (f"<h3>{H.esc(r.name)}</h3>{H.img(r.tcav_png, r.name + ' TCAV scores')}"
               f"{_tcav_note(r.tcav)}{H.table(r.tcav, highlight_significant=True)}")
    if tc:
        tc = said("tcav") + tc
    sections.append(("tcav", "TCAV", tc))
    vis = ""
    for r in runs:
        if r.visualize_index is None:
            continue
        keep = [c for c in ("layer", "unit", "direction", "objective", "objective_value",
                            "top_example_objective", "dissect_label", "dissect_iou")
                if c in r.visualize_index]
        rows = r.visualize_index[keep].drop_duplicates(subset=[c for c in ("unit", "direction")
                                                               if c in keep])
        vis += (f"<h3>{H.esc(r.name)}</h3>{H.img(r.visualize_grid, r.name + ' visualization')}"
                f"{H.table(rows.head(40))}")
    if vis:
        vis = ("<p class=\"muted\">Per unit: images optimized to maximize (or minimize) it "
               "(Olah, Mordvintsev and Schubert 2017, Feature Visualization), then its top "
               "dataset examples with its map over them; objective_value is what the optimized "
               "image reaches, top_example_objective the same objective on the best dataset "
               "image, dissect_label the unit's Network Dissection label (Bau et al. 2017) "
               "where a dissect run of the same model is in the run directory. Each run's "
               "visualize/index.html has every image and the bottom examples.</p>" + vis)
    sections.append(("visualization", "Feature visualization", vis))
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = H.page("cnnexplain report", f"{len(runs)} run(s): {', '.join(r.name for r in runs)} "
                  f"- cnnexplain {__version__} - {stamp}", sections)
    index = layout.report_index
    write_text(index, page)
    files.append(index)
    return Report(runs=runs, summary=summary, metrics=metrics, index=index, files=files,
                  checks=checks)


TCAV_TESTS = {"ttest": "the TCAV paper's t-test (Kim et al. 2018) of the concept's scores "
                       "against random-vs-random scores, p_ttest_bonferroni (p_ttest when "
                       "the bonferroni column is False)",
              "calibrated": "the calibrated score test and CAV test, p_value and cav_p_value "
                            "both"}
TCAV_INPUTS = {"all": "every class-input image, of every class",
               "class": "the target class's images only"}


def _tcav_note(frame: pd.DataFrame) -> str:
    """One line saying which test decided ``significant`` and which inputs I+ / I- used
    (tables written before these columns existed: nothing)."""
    parts = []
    if "significance" in frame and frame["significance"].nunique() == 1:
        test = str(frame["significance"].iloc[0])
        parts.append(f"significant: {TCAV_TESTS.get(test, test)} below alpha")
    if "intervention_inputs" in frame and frame["intervention_inputs"].nunique() == 1:
        inputs = str(frame["intervention_inputs"].iloc[0])
        parts.append(f"I+ / I- over {TCAV_INPUTS.get(inputs, inputs)}")
    return f"<p>{H.esc('; '.join(parts))}.</p>" if parts else ""


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60] or "run"
