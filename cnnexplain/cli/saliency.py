"""``cnnexplain saliency``: options, one job, the table."""

from __future__ import annotations

import json
import sys

from rich.table import Table

from cnnexplain.cli.common import run_job
from cnnexplain.cli.declare import command, eager_flag, render as render_fields
from cnnexplain.cli.main import app
from cnnexplain.config.fields import declared
from cnnexplain.config.saliency import SAL, SaliencyOptions

HELP = """Explain a model's decisions pixel by pixel (19 methods: gradients, SmoothGrad,
integrated gradients, occlusion, LIME, CAM and Grad-CAM variants, LRP and CLRP) and score the
explanations.

Example: cnnexplain saliency --checkpoint runs/std/best.pt --methods gradcam,lrp-zplus --evaluate

Inputs (one of): --dataset SPEC [--split --limit] (default: the checkpoint's data, else
synthetic), --images FILES_OR_DIR, --inputs FILE.npy (already preprocessed). --evaluate scores
every method (--metrics default|all|NAMES; --list-metrics lists them with their citations and
Quantus equivalents): localization on ground-truth boxes and masks (pointing game, energy,
localization, relevance mass / rank), faithfulness (deletion / insertion, ablation,
faithfulness correlation, region perturbation, pixel flipping, symmetric relevance gain, ROAD,
IROF, infidelity), robustness (sensitivity, local Lipschitz), complexity, random logit,
completeness, sanity check, discriminativeness. Writes OUT/saliency/maps.h5, overlays/,
grid.png, evaluation.csv (one column per metric), evaluation_curves.h5, metric_ranks.csv,
metric_agreement.csv and sanity.csv; maps are cached. --list-methods lists the methods with
their citations."""


def _list_methods(values: dict) -> None:
    from rich.console import Console

    from cnnexplain.explain.saliency import METHODS

    rows = [m.describe() for m in METHODS.values()]
    fields = {d.name: d for d in declared(SaliencyOptions)}
    if values.get("json_output"):
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    table = Table(title="Saliency methods")
    for col in ("method", "kind", "needs", "description", "citation"):
        table.add_column(col, overflow="fold")
    for m in METHODS.values():
        needs = [n for n, flag in (("layer", m.needs_layer), ("GAP head", m.needs_gap),
                                   ("gate", m.needs_gate)) if flag]
        if m.name.startswith(("lrp", "clrp")):
            needs.append("LRP canonizer")
        table.add_row(m.name, m.kind, ", ".join(needs) or "-",
                      render_fields(m.description, fields), m.citation)
    Console(soft_wrap=False).print(table)


def _list_metrics(values: dict) -> None:
    from rich.console import Console

    from cnnexplain.explain.saliency.evaluation import METRICS

    rows = [m.describe() for m in METRICS.values()]
    if values.get("json_output"):
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    fields = {d.name: d for d in declared(SaliencyOptions)}
    table = Table(title="Evaluation metrics (evaluation.csv: one column per metric, named as "
                        "the metric with - written _)")
    for col in ("metric", "better", "default", "needs", "description", "citation", "Quantus"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["metric"], r["better"], "yes" if r["default"] else "-", r["needs"],
                      render_fields(r["description"], fields), r["citation"],
                      render_fields(r["quantus"], fields))
    Console(soft_wrap=False).print(table)


def saliency(options: SaliencyOptions):
    from cnnexplain.jobs import saliency as job

    run_job(job, options, render)
    return 0


COLUMNS = {"pointing_game": "point", "pointing_energy_50": "E50", "localization_error": "loc err",
           "deletion_auc": "del", "insertion_auc": "ins", "ablation_drop": "abl",
           "occlusion_spearman": "occ rho", "sanity_spearman_all": "sanity rho",
           "class_map_correlation": "AB rho"}
"""evaluation.csv column -> short table header (the CSV has every column)."""


def render(output, term) -> None:
    plan, outcome = output.plan, output.result
    ev = outcome.evaluation.set_index("method") if outcome.evaluation is not None else None
    cols = [c for c in COLUMNS if ev is not None and c in ev.columns]
    table = Table(title=f"saliency: {len(outcome.image_index)} pairs, target {plan.target.text}, "
                        f"layer {plan.layer}")
    table.add_column("method", no_wrap=True)
    table.add_column("ms/img", justify="right")
    table.add_column("cached")
    for c in cols:
        table.add_column(COLUMNS[c], justify="right")
    for r in outcome.results:
        row = [r.method, f"{r.ms_per_image:.1f}", "yes" if r.cached else "no"]
        for c in cols:
            v = ev.loc[r.method, c]
            row.append("-" if v != v else f"{v:.2f}")
        table.add_row(*row)
    term.print(table)


command(app, "saliency", SaliencyOptions, saliency, help=HELP,
        extra=[eager_flag("list_methods", "--list-methods",
                          "List the methods with one-line descriptions and exit.", panel=SAL),
               eager_flag("list_metrics", "--list-metrics",
                          "List the evaluation metrics (direction, default set, citation) and "
                          "exit.", panel="Evaluation")],
        eager={"list_methods": _list_methods, "list_metrics": _list_metrics})
