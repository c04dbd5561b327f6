"""The run directory's layout: the one place that knows every output file's name.

Every command writes under ``out DIR`` and records itself in ``DIR/run.json``; the writers
and :mod:`cnnexplain.report.collect` both ask :class:`RunLayout` where a file goes::

    run.json                      every command's options, model, data, summary
    checkpoint.pt, best.pt        train-gated: last epoch (resumable), best validation epoch
    train_log.csv, gate.png       train-gated: one row per epoch; the gate's heatmap
    entanglement.csv              evaluate-entanglement: one row per metric
    entanglement_per_class.csv    ... one row per class; features.h5 with `save_features`
    saliency/                     maps.h5, evaluation.csv, evaluation_curves.h5,
                                  metric_ranks.csv, metric_agreement.csv, sanity.csv,
                                  overlays/, grid.png
    dissect/                      tally.csv, summary.csv, iou.h5, clusters.csv, index.html;
                                  with `negative` / `rotate` also tally_<view>.csv,
                                  summary_<view>.csv, iou_<view>.h5 and rotation.csv
    tcav/                         tcav.csv, runs.csv, tcav.png
    visualize/                    index.csv, index.html, grid.png, images/, examples/
    report/                       index.html, summary.csv, checks.csv and the report's PNGs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "run.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
TRAIN_LOG = "train_log.csv"
GATE_PNG = "gate.png"
ENTANGLEMENT = "entanglement.csv"
ENTANGLEMENT_PER_CLASS = "entanglement_per_class.csv"
ENTANGLEMENT_ABLATION = "entanglement_ablation.csv"
FEATURES = "features.h5"
SALIENCY = "saliency"
DISSECT = "dissect"
TCAV = "tcav"
VISUALIZE = "visualize"
REPORT = "report"


@dataclass(frozen=True)
class RunLayout:
    """Paths of a run directory's files (nothing is created here)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # -- every command ---------------------------------------------------------------------
    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    # -- train-gated -----------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT

    @property
    def best(self) -> Path:
        return self.root / BEST

    @property
    def train_log(self) -> Path:
        return self.root / TRAIN_LOG

    @property
    def gate_png(self) -> Path:
        return self.root / GATE_PNG

    # -- evaluate-entanglement -------------------------------------------------------------
    @property
    def entanglement(self) -> Path:
        return self.root / ENTANGLEMENT

    @property
    def entanglement_per_class(self) -> Path:
        return self.root / ENTANGLEMENT_PER_CLASS

    @property
    def entanglement_ablation(self) -> Path:
        """C x C: accuracy on each class (column) with each class's cluster removed (row)."""
        return self.root / ENTANGLEMENT_ABLATION

    @property
    def features(self) -> Path:
        return self.root / FEATURES

    # -- saliency --------------------------------------------------------------------------
    @property
    def saliency(self) -> Path:
        return self.root / SALIENCY

    @property
    def saliency_maps(self) -> Path:
        return self.saliency / "maps.h5"

    @property
    def saliency_evaluation(self) -> Path:
        return self.saliency / "evaluation.csv"

    @property
    def saliency_curves(self) -> Path:
        return self.saliency / "evaluation_curves.h5"

    @property
    def saliency_ranks(self) -> Path:
        return self.saliency / "metric_ranks.csv"

    @property
    def saliency_agreement(self) -> Path:
        return self.saliency / "metric_agreement.csv"

    @property
    def saliency_sanity(self) -> Path:
        return self.saliency / "sanity.csv"

    @property
    def saliency_overlays(self) -> Path:
        return self.saliency / "overlays"

    @property
    def saliency_grid(self) -> Path:
        return self.saliency / "grid.png"

    # -- dissect ---------------------------------------------------------------------------
    @property
    def dissect(self) -> Path:
        return self.root / DISSECT

    def dissect_tally(self, layer: str | None = None, view: str | None = None) -> Path:
        """``dissect/tally.csv`` (the last layer's), or ``dissect/<layer>/tally.csv``; for a
        view other than the positive one (``negative``, ``rotated``) ``tally_<view>.csv``."""
        name = f"tally_{view}.csv" if view else "tally.csv"
        return (self.dissect / layer / name) if layer else self.dissect / name

    def dissect_view_summary(self, view: str) -> Path:
        """``dissect/summary_<view>.csv``: summary.csv's rows for the ``negative`` or
        ``rotated`` view."""
        return self.dissect / f"summary_{view}.csv"

    def dissect_view_iou(self, view: str) -> Path:
        """``dissect/iou_<view>.h5``: iou.h5 for the ``negative`` or ``rotated`` view."""
        return self.dissect / f"iou_{view}.h5"

    @property
    def dissect_rotation(self) -> Path:
        """Unique detectors per layer and category, unrotated and rotated (`rotate`)."""
        return self.dissect / "rotation.csv"

    @property
    def dissect_summary(self) -> Path:
        return self.dissect / "summary.csv"

    @property
    def dissect_iou(self) -> Path:
        return self.dissect / "iou.h5"

    @property
    def dissect_clusters(self) -> Path:
        return self.dissect / "clusters.csv"

    @property
    def dissect_index(self) -> Path:
        return self.dissect / "index.html"

    def dissect_detectors(self, number: int | str = "*", view: str | None = None) -> Path:
        """``dissect/detectors-<n>.png``: the bar graph of the n-th layer (``*``: a glob);
        ``<view>-detectors-<n>.png`` for another view (outside the glob)."""
        return self.dissect / (f"{view}-detectors-{number}.png" if view else
                               f"detectors-{number}.png")

    # -- tcav ------------------------------------------------------------------------------
    @property
    def tcav(self) -> Path:
        return self.root / TCAV

    @property
    def tcav_table(self) -> Path:
        return self.tcav / "tcav.csv"

    @property
    def tcav_runs(self) -> Path:
        return self.tcav / "runs.csv"

    @property
    def tcav_plot(self) -> Path:
        return self.tcav / "tcav.png"

    # -- visualize -------------------------------------------------------------------------
    @property
    def visualize(self) -> Path:
        return self.root / VISUALIZE

    @property
    def visualize_index(self) -> Path:
        """One row per optimized image: unit, direction, objective reached, its best dataset
        example's, the PNG (relative to this file)."""
        return self.visualize / "index.csv"

    @property
    def visualize_html(self) -> Path:
        return self.visualize / "index.html"

    @property
    def visualize_grid(self) -> Path:
        return self.visualize / "grid.png"

    @property
    def visualize_images(self) -> Path:
        """The optimized images, one PNG each at the image's own resolution."""
        return self.visualize / "images"

    @property
    def visualize_examples(self) -> Path:
        """Per unit, ``<unit>-top.png`` and ``<unit>-bottom.png``: dataset examples with the
        unit's map over them."""
        return self.visualize / "examples"

    # -- report ----------------------------------------------------------------------------
    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def report_index(self) -> Path:
        return self.report / "index.html"

    @property
    def report_summary(self) -> Path:
        return self.report / "summary.csv"

    @property
    def report_checks(self) -> Path:
        """One row per check: what the user should see, whether it was seen, the figures."""
        return self.report / "checks.csv"
