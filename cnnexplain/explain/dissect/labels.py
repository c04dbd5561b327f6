"""Network Dissection, the labels: the concept numbering, IoU, unit labels and detector counts.

Network Dissection (Bau, Zhou, Khosla, Oliva, Torralba, "Network Dissection: Quantifying
Interpretability of Deep Visual Representations", CVPR 2017; seed
``001_67e86decce6b6927.txt`` section 7.1.2; seed ``000_d60c53f3ec4d0e03.txt`` "unit
interpretability") labels every unit (channel) ``k`` of a layer with the Broden concept ``c`` its
thresholded activation map overlaps best. Everything here is pure tensor code, vectorized over
units and concepts (no Python loop over either); the reference implementations' behaviour is
summarized in ../shared/reference/broden-and-dissection.md. The counts (``truth``,
``intersection``, ``activation_original``, ``activation_lite``) are defined and tallied in
:mod:`cnnexplain.explain.dissect.tally`.

IoU (:func:`iou`), with ``g = cat(c)``
--------------------------------------
- ``original`` (Bau et al. 2017, NetDissect ``makeresult.py``; default)::

      IoU_{k,c} = intersection / (activation_original[k, g] + truth[c] - intersection)
                = sum_{x: g present} |M_k & L_c| / sum_{x: g present} |M_k | L_c|

- ``lite`` (NetDissect-Lite ``feature_operation.py``: ``tally_units_cat`` counts a unit's
  activation in an image only if ``tally_cat > 0``, i.e. if the mask hits a label of the
  category)::

      IoU_{k,c} = intersection / (activation_lite[k, g] + truth[c] - intersection)

  ``activation_lite <= activation_original``, so Lite's IoU is never smaller; they differ exactly
  for the (unit, concept) pairs where some image has ``g`` present and a non-empty ``M_k`` that
  touches no label of ``g``. A zero denominator gives IoU 0 (the references add 1e-10/1e-20).
  Lite's own code also reuses a stale ``tally_cat`` for images without pixel labels and counts a
  label twice where two layers carry it; neither bug is reproduced.

Labels (:func:`label_units`)
----------------------------
Per unit and category, the best concept (highest IoU; ties: the lower label number, i.e. the
more frequent label); the unit's label is the best of those (ties: the earlier category;
NetDissect-Lite's ``argsort()[::-1]`` takes the later one, which only matters at equal IoU, e.g.
units with IoU 0 everywhere). A unit
is a *detector* when that IoU exceeds the detection threshold (0.04 in the paper). Per category:
detector units and unique concepts among their labels (:func:`detector_summary`, the book
chapter's headline statistic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IOU_MODES = {
    "original": "Bau et al. 2017 / NetDissect: a unit's activation counts in every image where "
                "the concept's category is present",
    "lite": "NetDissect-Lite: a unit's activation counts only in images where its mask touches a "
            "label of the concept's category",
}
DEFAULT_IOU_THRESHOLD = 0.04


# ---------------------------------------------------------------------------------------------
# Concepts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptSpace:
    """The label numbering of a Broden dataset.

    ``label_category``: int64 ``[NL]`` (NL = largest label number + 1): index into
    ``categories`` of each number's primary category, -1 for 0, unused numbers and labels of
    other categories. ``names``: ``[NL]`` label names. Concepts are the numbers with a category.
    """

    categories: tuple[str, ...]
    label_category: np.ndarray
    names: tuple[str, ...]

    @classmethod
    def from_dataset(cls, dataset) -> "ConceptSpace":
        """From a :class:`~cnnexplain.data.broden.BrodenDataset` (``categories``,
        ``label_names``, ``category_of``)."""
        cats = tuple(dataset.categories)
        names = tuple(dataset.label_names)
        lc = np.full(len(names), -1, dtype=np.int64)
        index = {c: i for i, c in enumerate(cats)}
        for n in range(1, len(names)):
            try:
                lc[n] = index.get(dataset.category_of(n), -1)
            except KeyError:
                lc[n] = -1
        return cls(cats, lc, names)

    @property
    def size(self) -> int:
        return len(self.label_category)

    @property
    def numbers(self) -> np.ndarray:
        """int64 ``[NC]`` the concept numbers, ascending."""
        return np.flatnonzero(self.label_category >= 0)

    def category_name(self, number: int) -> str:
        g = int(self.label_category[number])
        return self.categories[g] if g >= 0 else ""


# ---------------------------------------------------------------------------------------------
# IoU and labels
# ---------------------------------------------------------------------------------------------


def iou(intersection: np.ndarray, truth: np.ndarray, activation_cat: np.ndarray,
        label_category: np.ndarray) -> np.ndarray:
    """float64 ``[K, NL]``: ``I / (A[k, cat(c)] + G[c] - I)`` (module docstring), 0 where the
    denominator is 0 or ``c`` is not a concept. ``activation_cat`` is ``activation_original``
    (IoU mode ``original``) or ``activation_lite`` (``lite``), see :func:`activation_for`."""
    inter = np.asarray(intersection, dtype=np.int64)
    lc = np.asarray(label_category)
    valid = lc >= 0
    act = np.zeros_like(inter)
    act[:, valid] = np.asarray(activation_cat, dtype=np.int64)[:, lc[valid]]
    denom = act + np.asarray(truth, dtype=np.int64)[None, :] - inter
    out = np.zeros(inter.shape, dtype=np.float64)
    ok = (denom > 0) & valid[None, :]
    out[ok] = inter[ok] / denom[ok]
    return out


def activation_for(tally: dict, mode: str) -> np.ndarray:
    """The ``[K, G]`` activation counts an IoU mode divides by."""
    if mode not in IOU_MODES:
        raise ValueError(f"unknown IoU mode {mode!r}")
    return tally["activation_original" if mode == "original" else "activation_lite"]


@dataclass
class UnitLabels:
    """Per unit ``k``: ``best[k, g]`` concept number of the best concept in category ``g`` (-1
    when the category has no concept), ``best_iou[k, g]``; ``category[k]`` the best category,
    ``label[k]`` its concept number, ``score[k]`` its IoU."""

    best: np.ndarray
    best_iou: np.ndarray
    category: np.ndarray
    label: np.ndarray
    score: np.ndarray
    extra: dict = field(default_factory=dict)

    def detectors(self, threshold: float) -> np.ndarray:
        """bool ``[K]``: units whose label's IoU exceeds ``threshold``."""
        return self.score > threshold


def label_units(iou_matrix: np.ndarray, label_category: np.ndarray, n_categories: int
                ) -> UnitLabels:
    """Best concept per unit and category, and overall (module docstring), from the
    ``[K, NL]`` IoU matrix of :func:`iou`."""
    m = np.asarray(iou_matrix, dtype=np.float64)
    lc = np.asarray(label_category)
    k = m.shape[0]
    best = np.full((k, n_categories), -1, dtype=np.int64)
    best_iou = np.zeros((k, n_categories), dtype=np.float64)
    for g in range(n_categories):  # categories only (a handful); vectorized over units
        cols = np.flatnonzero(lc == g)
        if cols.size:
            j = np.argmax(m[:, cols], axis=1)
            best[:, g] = cols[j]
            best_iou[:, g] = m[np.arange(k), cols[j]]
    cat = np.argmax(best_iou, axis=1) if n_categories else np.zeros(k, dtype=np.int64)
    label = best[np.arange(k), cat] if n_categories else np.full(k, -1)
    score = best_iou[np.arange(k), cat] if n_categories else np.zeros(k)
    return UnitLabels(best, best_iou, cat.astype(np.int64), label.astype(np.int64),
                      score.astype(np.float64))


def detector_summary(labels: UnitLabels, categories: tuple[str, ...] | list[str],
                     threshold: float) -> list[dict]:
    """Per category: ``{"category", "detector_units", "unique_concepts"}`` where detector units
    are the units labelled with a concept of that category at IoU > ``threshold`` and unique
    concepts the distinct labels among them; plus a final ``"all"`` row."""
    det = labels.detectors(threshold)
    rows = []
    for g, name in enumerate(categories):
        sel = det & (labels.category == g)
        rows.append({"category": name, "detector_units": int(sel.sum()),
                     "unique_concepts": int(np.unique(labels.label[sel]).size)})
    rows.append({"category": "all", "detector_units": int(det.sum()),
                 "unique_concepts": int(np.unique(labels.label[det]).size)})
    return rows


def compare_detectors(base: UnitLabels, other: UnitLabels, categories: tuple[str, ...] | list[str],
                      threshold: float, suffix: str = "rotated") -> list[dict]:
    """:func:`detector_summary` of two views of one layer side by side, per category and
    ``"all"``: ``detector_units``, ``unique_concepts`` of ``base`` and the same with
    ``_<suffix>`` of ``other`` (Bau et al. 2017 section 3.2: the unrotated layer against its
    random rotation)."""
    rows = []
    for a, b in zip(detector_summary(base, categories, threshold),
                    detector_summary(other, categories, threshold)):
        rows.append({"category": a["category"], "detector_units": a["detector_units"],
                     "unique_concepts": a["unique_concepts"],
                     f"detector_units_{suffix}": b["detector_units"],
                     f"unique_concepts_{suffix}": b["unique_concepts"]})
    return rows


def tally_rows(labels: UnitLabels, tally: dict, mode: str, space: ConceptSpace) -> list[dict]:
    """NetDissect-Lite's ``tally.csv`` rows: ``unit`` (1-based), ``category``, ``label``,
    ``score``, then per category ``<cat>-label, -truth, -activation, -intersect, -iou``; units
    sorted by score, descending (ties: lower unit first)."""
    act = activation_for(tally, mode)
    truth, inter = tally["truth"], tally["intersection"]
    order = np.argsort(-labels.score, kind="stable")
    rows = []
    for u in order:
        g = int(labels.category[u])
        lab = int(labels.label[u])
        row = {"unit": int(u) + 1,
               "category": space.categories[g] if space.categories else "",
               "label": space.names[lab] if lab >= 0 else "",
               "score": float(labels.score[u])}
        for gi, cat in enumerate(space.categories):
            c = int(labels.best[u, gi])
            row[f"{cat}-label"] = space.names[c] if c >= 0 else ""
            row[f"{cat}-truth"] = int(truth[c]) if c >= 0 else 0
            row[f"{cat}-activation"] = int(act[u, gi])
            row[f"{cat}-intersect"] = int(inter[u, c]) if c >= 0 else 0
            row[f"{cat}-iou"] = float(labels.best_iou[u, gi])
        rows.append(row)
    return rows


def tally_columns(categories) -> list[str]:
    """The header of ``tally.csv`` (NetDissect-Lite's ``csv_fields``)."""
    cols = ["unit", "category", "label", "score"]
    for c in categories:
        cols += [f"{c}-label", f"{c}-truth", f"{c}-activation", f"{c}-intersect", f"{c}-iou"]
    return cols


def cluster_rows(labels: UnitLabels, clusters: np.ndarray, class_names: list[str],
                 space: ConceptSpace, threshold: float) -> list[dict]:
    """Concepts detected by each class's channel cluster (seed 004's class-specific filter
    clusters; seed 000's W). ``clusters``: bool ``[C, K]`` (:func:`cnnexplain.models.gates.
    class_clusters`). Per class: cluster size, detector units in it, their labels (unique,
    by decreasing best IoU) and the 1-based detector units."""
    det = labels.detectors(threshold)
    rows = []
    for c in range(clusters.shape[0]):
        units = np.flatnonzero(clusters[c])
        dunits = units[det[units]]
        order = dunits[np.argsort(-labels.score[dunits], kind="stable")]
        concepts: list[str] = []
        for u in order:
            cat = space.categories[int(labels.category[u])]
            name = f"{space.names[int(labels.label[u])]} ({cat})"
            if name not in concepts:
                concepts.append(name)
        rows.append({"class": c, "class_name": class_names[c] if c < len(class_names) else str(c),
                     "channels": int(units.size), "detectors": int(dunits.size),
                     "unique_concepts": len(concepts), "concepts": "; ".join(concepts),
                     "units": ";".join(str(int(u) + 1) for u in order)})
    return rows
