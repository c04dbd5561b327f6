"""Localization metrics of saliency maps against boxes and masks (pure numpy/scipy functions).

Shapes: ``maps`` float ``[N, H, W]`` (larger = more important; only the positive part counts
where a metric speaks of energy or thresholds), ``boxes`` float ``[N, 4]`` as ``(x0, y0, x1,
y1)`` in pixels with exclusive ends (pixel ``(r, c)`` is inside iff ``x0 <= c < x1`` and
``y0 <= r < y1``; the synthetic world's convention), ``masks`` ``[N, H, W]`` (nonzero = object).

- Pointing game (Zhang et al. 2016, as used in seed ``003_0c687514e405e536.txt`` sec. 5.2): a
  hit when the map's maximum lies in the target object's box (or mask).
- Energy pointing game (seed 003, sec. 5.2, fig. 4): keep the smallest set of highest pixels
  that holds a fraction ``p`` of the map's energy (sum of its positive values); a hit when all
  kept pixels lie in the box. Thresholds 10%, 20%, ..., 90%.
- Localization (Selvaraju et al. 2017, seed ``002_d3d71848a193426f.txt``, "Interpretability via
  Localization"): binarize at 15% of the map's maximum, take the largest connected segment
  (4-connectivity), its bounding box, and the IoU with the true box; the localization error is
  the fraction with IoU < 0.5 or, the ILSVRC criterion, a wrong top-1 class.
- Relevance mass accuracy and relevance rank accuracy (Arras, Osman, Samek, "CLEVR-XAI: A
  benchmark dataset for the ground truth evaluation of neural network explanations",
  Information Fusion 81, 2022; Quantus ``RelevanceMassAccuracy`` / ``RelevanceRankAccuracy``):
  the share of the map's sum that falls on the mask, and the share of the ``K = |mask|``
  highest-ranked pixels that lie on it. NaN for an empty mask.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

ENERGY_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))
"""Seed 003's energy fractions, 10% ... 90%."""


def _as_maps(maps) -> np.ndarray:
    m = np.asarray(maps, dtype=np.float64)
    if m.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {list(m.shape)}")
    return m


def max_points(maps) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [N], cols [N])`` of each map's maximum (first one in row-major order on ties)."""
    m = _as_maps(maps)
    flat = m.reshape(m.shape[0], -1).argmax(axis=1)
    return flat // m.shape[2], flat % m.shape[2]


def in_box(rows, cols, boxes) -> np.ndarray:
    """bool ``[N]``: pixel ``(rows[i], cols[i])`` inside ``boxes[i]`` (exclusive ends)."""
    b = np.asarray(boxes, dtype=np.float64)
    r = np.asarray(rows)
    c = np.asarray(cols)
    return (c >= b[:, 0]) & (c < b[:, 2]) & (r >= b[:, 1]) & (r < b[:, 3])


def pointing_game(maps, boxes=None, masks=None) -> np.ndarray:
    """bool ``[N]``: the maximum point lies in the box (``boxes``) or on the object
    (``masks``; give exactly one of the two)."""
    if (boxes is None) == (masks is None):
        raise ValueError("give exactly one of boxes and masks")
    rows, cols = max_points(maps)
    if boxes is not None:
        return in_box(rows, cols, boxes)
    mk = np.asarray(masks)
    return mk[np.arange(mk.shape[0]), rows, cols] != 0


def box_fraction(boxes, size: tuple[int, int]) -> np.ndarray:
    """``[N]``: the share of an ``H x W`` image that each box ``(x0, y0, x1, y1)`` (end
    exclusive) covers, the probability that a uniformly random point hits it (the pointing
    game's random baseline)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h, w = int(size[0]), int(size[1])
    area = np.clip(b[:, 2] - b[:, 0], 0, w) * np.clip(b[:, 3] - b[:, 1], 0, h)
    return area / float(h * w)


def energy_sets(maps, fraction: float) -> np.ndarray:
    """bool ``[N, H, W]``: the smallest set of highest pixels whose positive values sum to at
    least ``fraction`` of the map's energy (empty where the map has no positive value)."""
    m = np.clip(_as_maps(maps), 0.0, None)
    n, h, w = m.shape
    flat = m.reshape(n, -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    sorted_vals = np.take_along_axis(flat, order, axis=1)
    cum = np.cumsum(sorted_vals, axis=1)
    total = cum[:, -1:]
    # number of pixels needed: first index where cum >= fraction * total, plus one
    need = (cum < fraction * total - 1e-12 * np.maximum(total, 1e-300)).sum(axis=1) + 1
    need = np.where(total[:, 0] > 0, need, 0)
    keep_sorted = np.arange(h * w)[None, :] < need[:, None]
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return keep.reshape(n, h, w)


def box_masks(boxes, height: int, width: int) -> np.ndarray:
    """bool ``[N, H, W]`` of the pixels inside each box."""
    b = np.asarray(boxes, dtype=np.float64)
    rr = np.arange(height)[None, :, None]
    cc = np.arange(width)[None, None, :]
    return ((cc >= b[:, 0, None, None]) & (cc < b[:, 2, None, None])
            & (rr >= b[:, 1, None, None]) & (rr < b[:, 3, None, None]))


def energy_pointing_game(maps, boxes, thresholds=ENERGY_THRESHOLDS) -> np.ndarray:
    """bool ``[N, T]``: for each energy fraction, whether every kept pixel lies in the box
    (a map without positive energy misses)."""
    m = _as_maps(maps)
    inside = box_masks(boxes, m.shape[1], m.shape[2])
    out = np.zeros((m.shape[0], len(thresholds)), dtype=bool)
    for t, frac in enumerate(thresholds):
        keep = energy_sets(m, float(frac))
        nonempty = keep.reshape(m.shape[0], -1).any(axis=1)
        outside = (keep & ~inside).reshape(m.shape[0], -1).any(axis=1)
        out[:, t] = nonempty & ~outside
    return out


def largest_segment_box(binary) -> np.ndarray:
    """``(x0, y0, x1, y1)`` (exclusive ends) of the largest 4-connected segment of a bool
    ``[H, W]`` image; all zeros when it is empty. Ties go to the segment found first."""
    labels, count = ndimage.label(np.asarray(binary, dtype=bool))
    if count == 0:
        return np.zeros(4)
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    rows, cols = np.nonzero(labels == biggest)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=np.float64)


def box_iou(a, b) -> np.ndarray:
    """IoU ``[N]`` of boxes ``[N, 4]`` (pixel areas, exclusive ends; 0 when both are empty)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def localization(maps, boxes, threshold: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """``(iou [N], predicted boxes [N, 4])``: binarize each map at ``threshold`` times its
    maximum (a map whose maximum is not positive predicts an empty box), box the largest
    connected segment, compare with ``boxes``."""
    m = _as_maps(maps)
    pred = np.zeros((m.shape[0], 4))
    for i, mp in enumerate(m):
        top = mp.max()
        if top > 0:
            pred[i] = largest_segment_box(mp >= threshold * top)
    return box_iou(pred, boxes), pred


def localization_error(iou, cutoff: float = 0.5, correct=None) -> float:
    """Fraction of maps whose box IoU is below ``cutoff``; with ``correct`` (bool ``[N]``,
    the model's top-1 prediction is the image's label) an image also counts as an error when
    it is misclassified, the ILSVRC localization criterion (Russakovsky et al. 2015) that seed
    002 names: a localization is right only when the class *and* the box are."""
    iou = np.asarray(iou, dtype=np.float64)
    if not iou.size:
        return float("nan")
    wrong = iou < cutoff
    if correct is not None:
        wrong = wrong | ~np.asarray(correct, dtype=bool)
    return float(wrong.mean())


def _maps_and_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    m = maps.detach().cpu().numpy() if hasattr(maps, "detach") else np.asarray(maps)
    if m.ndim != 3:
        raise ValueError(f"maps must be [N, H, W], got shape {list(m.shape)}")
    if not np.issubdtype(m.dtype, np.floating):
        m = m.astype(np.float64)
    s = masks.detach().cpu().numpy() if hasattr(masks, "detach") else np.asarray(masks)
    s = s.reshape(m.shape).astype(bool)
    return m.reshape(m.shape[0], -1), s.reshape(m.shape[0], -1)


def relevance_mass_accuracy(maps, masks) -> np.ndarray:
    """float64 ``[N]``: ``sum(a on the mask) / sum(a)`` (Arras, Osman, Samek, Information Fusion
    2022; Quantus ``RelevanceMassAccuracy`` with the maps as given; its defaults ``abs=False,
    normalise=True`` do not change this ratio). Negative values count with their sign, as in
    the paper and Quantus, so the ratio can leave [0, 1] (take the positive part or ``abs``
    first). NaN for an empty mask (and inf / NaN for a map that sums to 0). ``masks``
    ``[N, H, W]``, nonzero = object; torch or numpy."""
    m, s = _maps_and_masks(maps, masks)
    m = m.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (m * s).sum(axis=1) / m.sum(axis=1)
    out[s.sum(axis=1) == 0] = np.nan
    return out


def relevance_rank_accuracy(maps, masks) -> np.ndarray:
    """float64 ``[N]``: with ``K = |mask|``, the fraction of the ``K`` highest-ranked pixels that
    lie on the mask (Arras, Osman, Samek, Information Fusion 2022; Quantus
    ``RelevanceRankAccuracy``). NaN for an empty mask.

    Ties: the ranking is ``np.argsort(-a)`` with numpy's default (unstable) sort on the map's
    own dtype (float32 stays float32), exactly Quantus's call; so where tied values straddle the
    K-th rank, which of them count is numpy's choice (it may depend on the numpy version and
    CPU), and matches Quantus only on the same installation. A map equal to the mask ranks its
    K ones first and scores 1."""
    m, s = _maps_and_masks(maps, masks)
    k = s.sum(axis=1)
    order = np.argsort(-m, axis=-1)
    top = np.arange(m.shape[1])[None, :] < k[:, None]
    hits = (np.take_along_axis(s, order, axis=1) & top).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = hits / k.astype(np.float64)
    out[k == 0] = np.nan
    return out
