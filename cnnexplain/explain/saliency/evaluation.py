"""``saliency `evaluate```: score every method's maps with the seeds' evaluations.

A registry of metrics (:data:`METRICS`, name -> :class:`Metric`); each one turns a method's
maps (:class:`~cnnexplain.explain.saliency.runner.MethodResult`) into a few columns of
``evaluation.csv`` by calling the pure functions of :mod:`cnnexplain.metrics`:

==================  ==========================================  =======================================
metric              columns                                     source
==================  ==========================================  =======================================
pointing            pointing_game, pointing_game_mask           seed 003 sec. 5.2 (box / object mask)
energy              pointing_energy_10 ... pointing_energy_90   seed 003 fig. 4 (energy thresholds)
ablation            ablation_drop, ablation_drop_random         seed 003 sec. 5.2 (max point vs random)
deletion            deletion_auc                                seed 002 local faithfulness (lower=better)
insertion           insertion_auc                               Petsiuk et al. 2018 (higher=better)
localization        localization_iou, localization_error        seed 002 (15% of max, largest segment)
occlusion-rank      occlusion_spearman                          seed 002 (rank correlation w/ occlusion)
sanity              sanity_spearman_top, sanity_spearman_all,   seed 002 (cascading randomization)
                    sanity_pass
discriminativeness  class_map_correlation, own_object_mass      seed 003 sec. 3.1 (two-object images)
==================  ==========================================  =======================================

Ground truth of a pair (image i, class c): the main object's box and mask when ``c`` is the
image's label, the second object's when ``c`` is its second label; pairs whose class is not in
the image (e.g. a wrong prediction with ``target`` pred``) are left out of the pointing, energy
and localization metrics (``pairs_with_truth`` counts the others). Deletion, insertion,
ablation, occlusion rank and sanity use every pair. Means ignore undefined values (a constant
map has no rank correlation). The ablation's "dataset mean" (seed 003) is the per-position mean
of the loaded images (the split as limited by ``limit``), in model-input space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from cnnexplain.config.saliency import EvalOptions
from cnnexplain.errors import UsageError, close_matches
from cnnexplain.explain.saliency.runner import Explainer, MethodResult
from cnnexplain.metrics import discriminativeness as D
from cnnexplain.metrics import faithfulness as F
from cnnexplain.metrics import localization as L
from cnnexplain.metrics import sanity as S

SANITY_PASS = 0.5
"""A method passes the sanity check when the mean Spearman correlation between its maps on the
original and on the fully randomized network is below this value."""


@dataclass
class EvalData:
    """What the metrics share: the explainer (model, images, cache), the ground truth, the
    explained pairs, options, and lazily computed occlusion maps."""

    explainer: Explainer
    labels: torch.Tensor
    truth: dict
    image_index: torch.Tensor
    targets: torch.Tensor
    options: EvalOptions = field(default_factory=EvalOptions)
    sanity_rows: list = field(default_factory=list)
    _occlusion: MethodResult | None = None
    _truth_cache: tuple | None = None

    @property
    def images(self) -> torch.Tensor:
        return self.explainer.images

    def pair_truth(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(valid [M] bool, boxes [M, 4], masks [M, H, W])`` of each pair's target object."""
        if self._truth_cache is None:
            idx = self.image_index.numpy()
            t = self.targets.numpy()
            lab = self.labels.numpy()[idx]
            box = self.truth["box"].numpy()[idx].astype(np.float64)
            mask = self.truth["mask"].numpy()[idx]
            main = t == lab
            valid = main.copy()
            if "second_label" in self.truth:
                sec = self.truth["second_label"].numpy()[idx]
                second = (~main) & (sec >= 0) & (t == sec)
                valid |= second
                box = np.where(second[:, None], self.truth["second_box"].numpy()[idx], box)
                mask = np.where(second[:, None, None], self.truth["second_mask"].numpy()[idx], mask)
            self._truth_cache = (valid, box, mask)
        return self._truth_cache

    def occlusion(self) -> MethodResult:
        if self._occlusion is None:
            self._occlusion = self.explainer.run("occlusion", self.image_index, self.targets,
                                                 description="occlusion (reference)")
        return self._occlusion

    def device_targets(self, sel) -> torch.Tensor:
        return self.targets[sel].to(self.explainer.device)

    def device_images(self, sel) -> torch.Tensor:
        return self.images[self.image_index[sel]].to(self.explainer.device)


def _mean(a) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else float("nan")


def _pointing(data: EvalData, res: MethodResult) -> dict:
    valid, boxes, masks = data.pair_truth()
    if not valid.any():
        return {"pointing_game": float("nan"), "pointing_game_mask": float("nan"),
                "pointing_game_random": float("nan")}
    maps = res.maps[valid]
    return {"pointing_game": _mean(L.pointing_game(maps, boxes=boxes[valid])),
            "pointing_game_mask": _mean(L.pointing_game(maps, masks=masks[valid])),
            "pointing_game_random": _mean(L.box_fraction(boxes[valid], maps.shape[-2:]))}


def _energy(data: EvalData, res: MethodResult) -> dict:
    valid, boxes, _ = data.pair_truth()
    cols = [f"pointing_energy_{int(round(100 * t))}" for t in L.ENERGY_THRESHOLDS]
    if not valid.any():
        return {c: float("nan") for c in cols}
    hits = L.energy_pointing_game(res.maps[valid], boxes[valid])
    return {c: _mean(hits[:, k]) for k, c in enumerate(cols)}


def _localization(data: EvalData, res: MethodResult) -> dict:
    valid, boxes, _ = data.pair_truth()
    if not valid.any():
        return {"localization_iou": float("nan"), "localization_error": float("nan")}
    iou, _ = L.localization(res.maps[valid], boxes[valid])
    return {"localization_iou": _mean(iou), "localization_error": L.localization_error(iou)}


def _curve(mode: str) -> Callable:
    def metric(data: EvalData, res: MethodResult) -> dict:
        ex = data.explainer
        sel = slice(None)
        curves = F.perturbation_curve(F.probability_score(ex.model), data.device_images(sel),
                                      res.maps, data.device_targets(sel), mode=mode,
                                      steps=data.options.deletion_steps, batch_size=ex.batch_size * 4)
        return {f"{mode}_auc": _mean(F.curve_auc(curves))}
    return metric


def _ablation(data: EvalData, res: MethodResult) -> dict:
    ex = data.explainer
    h, w = data.images.shape[-2:]
    patch = data.options.ablation_patch or max(3, min(h, w) // 8)
    mean_image = data.images.mean(dim=0)
    drop, rand = F.ablation_drop(F.logit_score(ex.model), data.device_images(slice(None)),
                                 res.maps, data.device_targets(slice(None)), mean_image, patch,
                                 generator=np.random.default_rng(data.options.seed),
                                 batch_size=ex.batch_size * 4)
    return {"ablation_drop": _mean(drop), "ablation_drop_random": _mean(rand)}


def _occlusion_rank(data: EvalData, res: MethodResult) -> dict:
    occ = data.occlusion()
    return {"occlusion_spearman": _mean(F.occlusion_rank_correlation(res.maps, occ.maps))}


def _sanity(data: EvalData, res: MethodResult) -> dict:
    ex = data.explainer
    k = min(len(data.image_index), data.options.sanity_limit)
    idx, tgt = data.image_index[:k], data.targets[:k]
    opts = data.options

    def explain(model, step):
        return ex.run(res.method, idx, tgt, model=model,
                      extra={"sanity_step": step, "sanity_steps": opts.sanity_steps,
                             "sanity_seed": opts.seed},
                      description=f"{res.method} sanity {step}/{opts.sanity_steps}").maps

    example = data.images[idx[:1]].to(ex.device)
    rows = S.sanity_check(ex.model, explain, example, steps=opts.sanity_steps, seed=opts.seed,
                          original=res.maps[:k])
    for r in rows:
        data.sanity_rows.append({"method": res.method, **r})
    top, last = rows[0]["spearman"], rows[-1]["spearman"]
    return {"sanity_spearman_top": top, "sanity_spearman_all": last,
            "sanity_pass": float(last < SANITY_PASS) if np.isfinite(last) else float("nan")}


def _discriminativeness(data: EvalData, res: MethodResult) -> dict:
    nan = {"class_map_correlation": float("nan"), "own_object_mass": float("nan")}
    if "second_label" not in data.truth:
        return nan
    lab = data.labels
    sec = data.truth["second_label"]
    two = torch.nonzero((sec >= 0) & (sec != lab)).flatten()
    if two.numel() == 0:
        return nan
    ex = data.explainer
    a = ex.run(res.method, two, lab[two], description=f"{res.method} class A").maps
    b = ex.run(res.method, two, sec[two], description=f"{res.method} class B").maps
    own = np.concatenate([D.mass_on_object(a, data.truth["mask"][two].numpy()),
                          D.mass_on_object(b, data.truth["second_mask"][two].numpy())])
    return {"class_map_correlation": _mean(D.class_map_correlation(a, b)),
            "own_object_mass": _mean(own)}


@dataclass(frozen=True)
class Metric:
    """``columns``: what it adds to evaluation.csv; ``needs_truth``: uses boxes / masks;
    ``fn(data, result) -> {column: value}``."""

    name: str
    description: str
    columns: tuple[str, ...]
    fn: Callable[[EvalData, MethodResult], dict]
    needs_truth: bool = True


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("pointing", "pointing game: max point in the box / on the object (seed 003), and "
           "the hit rate of a uniformly random point (the box's share of the image)",
           ("pointing_game", "pointing_game_mask", "pointing_game_random"), _pointing),
    Metric("energy", "energy pointing game at 10..90% of the map's energy (seed 003)",
           tuple(f"pointing_energy_{int(round(100 * t))}" for t in L.ENERGY_THRESHOLDS), _energy),
    Metric("ablation", "logit drop when the max point's patch becomes the dataset mean, vs a "
           "random patch (seed 003)", ("ablation_drop", "ablation_drop_random"), _ablation, False),
    Metric("deletion", "deletion curve AUC of the class probability (seed 002; lower = better)",
           ("deletion_auc",), _curve("deletion"), False),
    Metric("insertion", "insertion curve AUC from a blurred image (higher = better)",
           ("insertion_auc",), _curve("insertion"), False),
    Metric("localization", "IoU of the largest segment above 15% of max with the box; error = "
           "IoU < 0.5 (seed 002)", ("localization_iou", "localization_error"), _localization),
    Metric("occlusion-rank", "Spearman correlation with the occlusion map (seed 002)",
           ("occlusion_spearman",), _occlusion_rank, False),
    Metric("sanity", "cascading weight randomization, Spearman with the original maps; pass "
           f"when below {SANITY_PASS} after full randomization (seed 002)",
           ("sanity_spearman_top", "sanity_spearman_all", "sanity_pass"), _sanity, False),
    Metric("discriminativeness", "correlation of the maps for the two classes of two-object "
           "images, and the share of each map on its own object (seed 003)",
           ("class_map_correlation", "own_object_mass"), _discriminativeness),
]}

HEADLINE = ("pointing_game", "localization_error", "deletion_auc", "class_map_correlation",
            "sanity_spearman_all")
"""The columns run.json's summary reports per method (when computed)."""


def parse_metrics(text: str | None) -> list[str]:
    """``"all"`` / None -> every metric; else a comma list of names (validated)."""
    if text is None or str(text).strip().lower() == "all":
        return list(METRICS)
    names = [p.strip() for p in str(text).split(",") if p.strip()]
    for n in names:
        if n not in METRICS:
            raise UsageError(f"unknown `metrics` entry {n!r}{close_matches(n, METRICS)}",
                             f"choose from {', '.join(METRICS)} or all")
    return names


def evaluate(data: EvalData, results: list[MethodResult], metrics: list[str], progress=None):
    """``(evaluation rows [{method, metric columns...}], sanity rows)``."""
    from cnnexplain.progress import silent

    rows = []
    valid, _, _ = data.pair_truth()
    with (progress or silent())(total=len(results) * len(metrics), description="evaluating") as task:
        for res in results:
            row = {"method": res.method, "pairs": len(res.maps),
                   "pairs_with_truth": int(valid.sum())}
            for name in metrics:
                row.update(METRICS[name].fn(data, res))
                task.advance(1)
            rows.append(row)
    return rows, data.sanity_rows
