"""Network Dissection (Bau et al. 2017): unit thresholds, IoU tallies, labels and the report."""

from cnnexplain.explain.dissect.labels import (
                                               DEFAULT_IOU_THRESHOLD,
                                               IOU_MODES,
                                               ConceptSpace,
                                               UnitLabels,
                                               cluster_rows,
                                               detector_summary,
                                               iou,
                                               label_units,
)
from cnnexplain.explain.dissect.quantiles import RadixSketch, TopCandidates
from cnnexplain.explain.dissect.report import write_dissection
from cnnexplain.explain.dissect.run import (
                                               QUANTILE_MODES,
                                               VARIANTS,
                                               DissectConfig,
                                               DissectionResult,
                                               LayerResult,
                                               check_memory,
                                               dissect,
                                               image_loader,
                                               plan_layers,
                                               rotate_maps,
                                               rotation_matrix,
)
from cnnexplain.explain.dissect.tally import Tally, accumulate_tallies

__all__ = ["DEFAULT_IOU_THRESHOLD", "IOU_MODES", "QUANTILE_MODES", "VARIANTS", "ConceptSpace",
           "DissectConfig", "DissectionResult", "LayerResult", "RadixSketch", "Tally",
           "TopCandidates", "UnitLabels", "accumulate_tallies", "check_memory", "cluster_rows",
           "detector_summary", "dissect", "image_loader", "iou", "label_units", "plan_layers",
           "rotate_maps", "rotation_matrix", "write_dissection"]
