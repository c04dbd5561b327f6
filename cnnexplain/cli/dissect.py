"""``cnnexplain dissect``: options, one job, tables."""

from __future__ import annotations

import numpy as np
from rich.markup import escape
from rich.table import Table

from cnnexplain.cli.common import run_job
from cnnexplain.cli.declare import command, eager_flag, printer
from cnnexplain.cli.main import app
from cnnexplain.config.dissect import DissectOptions

HELP = """Label every unit (channel) of one or more layers with the human concept it detects, as
Network Dissection does (Bau et al. 2017), and count detector units and unique concepts per
Broden category.

Example: cnnexplain dissect --checkpoint runs/std/best.pt --broden data/broden --layer layer3,layer4

Outputs in --out/dissect: tally.csv, summary.csv, iou.h5, index.html (bar graphs, per-unit
labels and top-image strips) and, for a gated checkpoint, clusters.csv; --negative and
--rotate SEED add the lowest activations' labels and a random-rotation control. --help-methods
explains thresholds, IoU modes, the views and the cache; torchrun shards the images."""

METHODS = "\n\n".join([
    "Label every unit (channel) of one or more layers with the human concept it detects, as "
    "Network Dissection does (Bau et al. 2017), and count detector units and unique concepts "
    "per Broden category.",
    "Per unit k, the threshold T_k is the top --quantile of all its activations over the "
    "dataset at feature resolution (exact by default; --quantile-mode sketch: constant memory, "
    "one extra read, error bounded by the count of the final histogram bucket, stored in "
    "iou.h5). Per image the map is resized bilinearly (align_corners=False, like "
    "NetDissect-Lite) to the mask size and binarized at > T_k. IoU_k,c = sum |M_k & L_c| / "
    "sum |M_k | L_c| over the images where c's category is present (--iou-mode original, the "
    "paper's), or with a unit's activation counted only where its mask touches that category "
    "(--iou-mode lite, NetDissect-Lite's; never smaller). A unit whose best IoU exceeds "
    "--iou-threshold is a detector.",
    "Broden images are not resized (unless --resize); the normalization defaults to the "
    "model's recorded preprocessing, else ImageNet's. The reference code used (RGB - "
    "\\[124.69, 118.69, 109.54]) / 57.12, i.e. --mean 0.489,0.465,0.430 --std "
    "0.224,0.224,0.224.",
    "--negative also labels every unit by its lowest activations, which Network Dissection "
    "leaves out: the threshold is the bottom --quantile of the unit's activations and the mask "
    "is where the upsampled map is below it (the same code run on the negated maps). Written "
    "beside the positive outputs (tally_negative.csv, summary_negative.csv, iou_negative.h5, a "
    "section of index.html); the positive files do not change.",
    "--rotate SEED also dissects each layer after a random orthogonal rotation of its channels "
    "(Bau et al. 2017, section 3.2): Q from the QR decomposition of a seeded Gaussian K x K "
    "matrix (signs fixed by R's diagonal), maps A' = Q A over the channels, then thresholds "
    "and IoU exactly as for the layer itself. The rotated layer is as discriminative as the "
    "original, so fewer unique detectors there show that interpretability is axis-aligned. "
    "rotation.csv (and --json: unique_concepts against unique_concepts_rotated) compares the "
    "two; tally_rotated.csv, summary_rotated.csv and iou_rotated.h5 (with Q) hold the rest. "
    "Both views come from the same forward pass and stored maps.",
    "All --layer values come from one forward pass; their maps are kept in the HDF5 cache (a "
    "private temporary file with --no-cache), so a repeated run reads them back. --recompute "
    "runs the forward pass again for the tally instead of storing the maps.",
    "Outputs in --out/dissect: tally.csv (NetDissect-Lite's columns; with several layers the "
    "last layer's, plus <layer>/tally.csv for each), summary.csv, iou.h5 (units x concepts IoU "
    "in both modes, thresholds, counts), index.html (bar graphs, per-unit labels and top-image "
    "strips) and, for a gated checkpoint, clusters.csv (the concepts of each class's channel "
    "cluster). Distributed: torchrun --nproc_per_node=N -m cnnexplain dissect ... shards the "
    "images and gives the single-process result.",
])


def dissect(options: DissectOptions):
    from cnnexplain.jobs import dissect as job

    run_job(job, options, render)
    return 0


def render(output, term) -> None:
    result, clusters = output.result
    _print_tables(term, result, clusters)


def _print_tables(term, result, clusters) -> None:
    cfg = result.config
    for name, lr in result.layers.items():
        rows = lr.summary_rows(result.space.categories, cfg.iou_threshold)
        table = Table(title=f"{escape(name)}: {lr.units} units, detectors at IoU > "
                            f"{cfg.iou_threshold} ({cfg.iou_mode})")
        table.add_column("category")
        table.add_column("detector units", justify="right")
        table.add_column("unique concepts", justify="right")
        table.add_column("top concepts (units)")
        det = lr.labels.detectors(cfg.iou_threshold)
        for g, r in enumerate(rows):
            sel = det if g == len(rows) - 1 else det & (lr.labels.category == g)
            labels, counts = np.unique(lr.labels.label[sel], return_counts=True)
            best = sorted(zip(counts, labels), key=lambda t: (-t[0], t[1]))[:4]
            text = ", ".join(f"{result.space.names[int(lab)]} ({int(c)})" for c, lab in best)
            table.add_row(escape(r["category"]), str(r["detector_units"]),
                          str(r["unique_concepts"]), escape(text))
        term.print(table)
    if clusters:
        table = Table(title="concepts detected by each class's channel cluster")
        for col in ("class", "channels", "detectors", "concepts"):
            table.add_column(col)
        for r in clusters:
            table.add_row(escape(str(r["class_name"])), str(r["channels"]), str(r["detectors"]),
                          escape(r["concepts"]))
        term.print(table)


command(app, "dissect", DissectOptions, dissect, help=HELP,
        extra=[eager_flag("help_methods", "--help-methods",
                          "Explain thresholds, IoU modes and outputs, and exit.")],
        eager={"help_methods": printer(METHODS)})
