"""Class discriminativeness of saliency maps (seed ``003_0c687514e405e536.txt``, sec. 3.1 and
5.1): on images that contain two objects of different classes A and B, explain A and B and
correlate the two maps. A class-discriminative method gives different maps (low correlation);
the paper finds LRP's maps for different classes "almost identical" (correlation near 1), while
CLRP and Grad-CAM separate the classes.

Shapes: ``maps_a``, ``maps_b`` ``[N, H, W]`` (maps of the same images for the two classes).
"""

from __future__ import annotations

import numpy as np

from cnnexplain.metrics.faithfulness import pearson_rows, spearman_rows

CORRELATIONS = {"pearson": pearson_rows, "spearman": spearman_rows}


def class_map_correlation(maps_a, maps_b, kind: str = "pearson") -> np.ndarray:
    """Per-image correlation ``[N]`` between the maps for class A and class B (NaN where a map
    is constant, e.g. an all-zero CLRP map)."""
    if kind not in CORRELATIONS:
        raise ValueError(f"kind must be one of {sorted(CORRELATIONS)}, got {kind!r}")
    a = np.asarray(maps_a, dtype=np.float64)
    b = np.asarray(maps_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps_a {list(a.shape)} and maps_b {list(b.shape)} differ in shape")
    return CORRELATIONS[kind](a, b)


def mass_on_object(maps, masks) -> np.ndarray:
    """Fraction ``[N]`` of each map's positive mass on the given object masks ``[N, H, W]``
    (NaN for a map without positive mass): how much of the explanation of a class lands on the
    object of that class."""
    m = np.clip(np.asarray(maps, dtype=np.float64), 0, None)
    k = np.asarray(masks) != 0
    total = m.reshape(len(m), -1).sum(axis=1)
    on = (m * k).reshape(len(m), -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, on / np.where(total > 0, total, 1.0), np.nan)
