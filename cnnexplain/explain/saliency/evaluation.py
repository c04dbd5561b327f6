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
from cnnexplain.metrics import axiomatic as A
from cnnexplain.metrics import complexity as C
from cnnexplain.metrics import discriminativeness as D
from cnnexplain.metrics import faithfulness as F
from cnnexplain.metrics import faithfulness_correlation as FC
from cnnexplain.metrics import infidelity as INF
from cnnexplain.metrics import irof as IROF
from cnnexplain.metrics import removal as RM
from cnnexplain.metrics import road as ROAD
from cnnexplain.metrics import localization as L
from cnnexplain.metrics import randomization as Rz
from cnnexplain.metrics import robustness as Rb
from cnnexplain.metrics import sanity as S
from cnnexplain.metrics.preprocess import prepare, prepared

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
    predictions: torch.Tensor | None = None
    sanity_rows: list = field(default_factory=list)
    curves: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
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

    def add_curve(self, method: str, name: str, x, y) -> None:
        """Keep a per-pair curve ``y [M, K]`` over ``x [K]`` (its meaning: :data:`CURVES`)."""
        self.curves.setdefault(method, {})[name] = (np.asarray(x, dtype=np.float64),
                                                    np.asarray(y, dtype=np.float64))

    def pair_labels(self) -> torch.Tensor:
        """``[M]`` the label of each pair's image (-1 without one)."""
        return self.labels[self.image_index]

    def pair_correct(self) -> np.ndarray:
        """``[M]`` bool: the model's top-1 class of the pair's image is the image's label."""
        if self.predictions is None:
            from cnnexplain.explain.saliency.inputs import predictions

            ex = self.explainer
            self.predictions = predictions(ex.model, self.images, ex.device,
                                           ex.batch_size).argmax(dim=1).cpu()
        return (self.predictions[self.image_index] == self.pair_labels()).numpy()

    @property
    def num_classes(self) -> int:
        if "num_classes" not in self.shared:
            ex = self.explainer
            with torch.no_grad():
                self.shared["num_classes"] = int(ex.model(self.images[:1].to(ex.device)).shape[1])
        return self.shared["num_classes"]

    def explain_fn(self, method: str):
        """``explain(x [n, 3, H, W], t [n]) -> maps [n, H, W]`` with ``method`` (the run's
        options, layer and clusters), for the metrics that re-explain perturbed inputs. Random
        methods draw per position in the chunk, not per image id."""
        from cnnexplain.explain.saliency.base import get_method

        ex = self.explainer
        m = get_method(method)

        def explain(x, t):
            return m.attribute(ex.model, x, t, layer=ex.layer, context=ex.context).map.float()
        return explain

    def generator(self, salt: str) -> torch.Generator:
        """A CPU generator seeded by the run's seed and ``salt`` (the same draws for every
        method, so that methods are compared on the same perturbations)."""
        import zlib

        return torch.Generator().manual_seed(int(self.options.seed) * 1_000_003
                                             + zlib.crc32(salt.encode()))

    def device_targets(self, sel) -> torch.Tensor:
        return self.targets[sel].to(self.explainer.device)

    def device_images(self, sel) -> torch.Tensor:
        return self.images[self.image_index[sel]].to(self.explainer.device)


CURVES = {
    "deletion": ("fraction of pixels deleted", "probability"),
    "insertion": ("fraction of pixels inserted", "probability"),
    "region-perturbation-morf": ("blocks removed, most relevant first", "probability drop"),
    "region-perturbation-lerf": ("blocks removed, least relevant first", "probability drop"),
    "pixel-flipping-morf": ("fraction of pixels removed, most relevant first", "probability"),
    "pixel-flipping-lerf": ("fraction of pixels removed, least relevant first", "probability"),
    "road-morf": ("fraction imputed, most relevant first", "probability"),
    "road-lerf": ("fraction imputed, least relevant first", "probability"),
}
"""Curve name -> (x axis, y axis) of the curves in ``evaluation_curves.h5``."""


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
        return {c: float("nan") for c in cols + ["pointing_energy_mean"]}
    hits = L.energy_pointing_game(res.maps[valid], boxes[valid])
    out = {c: _mean(hits[:, k]) for k, c in enumerate(cols)}
    out["pointing_energy_mean"] = _mean(hits)
    return out


def _localization(data: EvalData, res: MethodResult) -> dict:
    """IoU over the pairs whose class is in the image; the error by ``localization_criterion``:
    ``ilsvrc`` over the pairs that explain the image's label or its top-1 class (an error when
    the top-1 class is wrong or the IoU with the label's box is below 0.5), ``iou`` over the
    pairs with truth (IoU < 0.5)."""
    valid, boxes, _ = data.pair_truth()
    out = {"localization_iou": float("nan"), "localization_error": float("nan")}
    if valid.any():
        iou, _ = L.localization(res.maps[valid], boxes[valid])
        out["localization_iou"] = _mean(iou)
        out["localization_error"] = L.localization_error(iou)
    if data.options.localization_criterion == "ilsvrc":
        labels = data.pair_labels().numpy()
        correct = data.pair_correct()
        own = data.targets.numpy() == labels  # maps of the image's label
        top1 = data.predictions[data.image_index].numpy() == data.targets.numpy()
        keep = (labels >= 0) & (own | top1)
        if not keep.any():
            out["localization_error"] = float("nan")
        else:
            iou = np.zeros(int(keep.sum()))
            ok = keep & own  # a wrong top-1 class is an error whatever the box
            if ok.any():
                lab_box = data.truth["box"].numpy()[data.image_index.numpy()].astype(np.float64)
                iou_ok, _ = L.localization(res.maps[ok], lab_box[ok])
                iou[ok[keep]] = iou_ok
            out["localization_error"] = L.localization_error(iou, correct=correct[keep])
    return out


def _deletion(data: EvalData, res: MethodResult) -> dict:
    """Deletion curve of seed 002 by default: pixels replaced by random values (the same
    seeded random image for every method), the *true* class's probability."""
    ex, o = data.explainer, data.options
    images = data.device_images(slice(None))
    targets = data.targets
    if o.deletion_class == "label":
        lab = data.pair_labels()
        targets = torch.where(lab >= 0, lab, targets)
    baseline = o.deletion_baseline
    if baseline == "random":
        gen = torch.Generator().manual_seed(int(o.seed))
        baseline = F.baseline_images(images, "random", gen, ex.context.preprocessing.normalize)
    curves = F.perturbation_curve(F.probability_score(ex.model), images, res.maps,
                                  targets.to(ex.device), mode="deletion", steps=o.deletion_steps,
                                  baseline=baseline, batch_size=ex.batch_size * 4)
    data.add_curve(res.method, "deletion", np.linspace(0, 1, curves.shape[1]), curves)
    auc = _mean(F.curve_auc(curves))
    return {"deletion_auc": auc}


def _insertion(data: EvalData, res: MethodResult) -> dict:
    ex = data.explainer
    sel = slice(None)
    curves = F.perturbation_curve(F.probability_score(ex.model), data.device_images(sel),
                                  res.maps, data.device_targets(sel), mode="insertion",
                                  steps=data.options.deletion_steps, batch_size=ex.batch_size * 4)
    data.add_curve(res.method, "insertion", np.linspace(0, 1, curves.shape[1]), curves)
    auc = _mean(F.curve_auc(curves))
    return {"insertion_auc": auc}


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


def _removal_baseline(data: EvalData, images: torch.Tensor):
    """The value removed pixels take in the removal metrics (``removal_baseline``): the same
    seeded random image for every method when random."""
    kind = data.options.removal_baseline
    if kind == "random":
        return F.baseline_images(images, "random", data.generator("removal-baseline"),
                                 data.explainer.context.preprocessing.normalize)
    return kind


def _region_perturbation(data: EvalData, res: MethodResult) -> dict:
    """AOPC of region perturbation in both orders (probabilities, Quantus's default softmax)."""
    ex, o = data.explainer, data.options
    x = data.device_images(slice(None))
    c = RM.region_perturbation(F.probability_score(ex.model), x, res.maps,
                               data.device_targets(slice(None)), patch_size=o.region_patch,
                               regions=o.regions, baseline=_removal_baseline(data, x),
                               batch_size=ex.batch_size * 4)
    k = np.arange(c.morf.shape[1])
    data.add_curve(res.method, "region-perturbation-morf", k, c.drop_morf)
    data.add_curve(res.method, "region-perturbation-lerf", k, c.drop_lerf)
    return {"region_perturbation_morf": _mean(c.aopc_morf),
            "region_perturbation_lerf": _mean(c.aopc_lerf),
            "region_perturbation_srg": _mean(c.srg)}


def _pixel_flipping(data: EvalData, res: MethodResult) -> dict:
    """Pixel flipping in both orders and the symmetric relevance gain from the same curves
    (computed once for both metrics)."""
    key = ("pixel-flipping", res.method)
    if key not in data.shared:
        ex, o = data.explainer, data.options
        x = data.device_images(slice(None))
        h, w = x.shape[-2:]
        per_step = max(1, -(-h * w // o.flip_steps))
        c = RM.pixel_flipping(F.probability_score(ex.model), x, res.maps,
                              data.device_targets(slice(None)), pixels_per_step=per_step,
                              baseline=_removal_baseline(data, x), batch_size=ex.batch_size * 4)
        frac = np.minimum(np.arange(c.morf.shape[1]) * per_step, h * w) / (h * w)
        data.add_curve(res.method, "pixel-flipping-morf", frac, c.morf)
        data.add_curve(res.method, "pixel-flipping-lerf", frac, c.lerf)
        data.shared[key] = {"pixel_flipping_morf": _mean(c.aopc_morf),
                            "pixel_flipping_lerf": _mean(c.aopc_lerf),
                            "symmetric_relevance_gain": _mean(c.srg)}
    return data.shared[key]


def _road(data: EvalData, res: MethodResult) -> dict:
    ex, o = data.explainer, data.options
    x = data.device_images(slice(None))
    pct = np.arange(o.road_step, 100, o.road_step)
    c = ROAD.road(ex.model, x, res.maps, data.device_targets(slice(None)), percentages=pct,
                  noise=o.road_noise, generator=data.generator("road"),
                  batch_size=ex.batch_size * 4)
    data.add_curve(res.method, "road-morf", pct / 100.0, c.probability_morf)
    data.add_curve(res.method, "road-lerf", pct / 100.0, c.probability_lerf)
    return {"road": _mean(c.gap), "road_morf": _mean(c.area_morf), "road_lerf": _mean(c.area_lerf),
            "road_accuracy_morf": _mean(c.accuracy_morf), "road_accuracy_lerf": _mean(c.accuracy_lerf)}


def _irof(data: EvalData, res: MethodResult) -> dict:
    ex, o = data.explainer, data.options
    key = "irof-segments"
    if key not in data.shared:
        data.shared[key] = IROF.default_segments(data.images[data.image_index], o.irof_segments)
    x = data.device_images(slice(None))
    return {"irof": _mean(IROF.irof(F.probability_score(ex.model), x, res.maps,
                                    data.device_targets(slice(None)), segments=data.shared[key],
                                    baseline=_removal_baseline(data, x),
                                    batch_size=ex.batch_size * 4))}


def _infidelity(data: EvalData, res: MethodResult) -> dict:
    ex, o = data.explainer, data.options
    x = data.device_images(slice(None))
    patch = o.infidelity_patch or max(1, min(x.shape[-2:]) // 8)
    return {"infidelity": _mean(INF.infidelity(F.logit_score(ex.model), x, res.maps,
                                               data.device_targets(slice(None)),
                                               patch_sizes=(patch,),
                                               baseline=_removal_baseline(data, x),
                                               batch_size=ex.batch_size * 4))}


def _faithfulness_correlation(data: EvalData, res: MethodResult) -> dict:
    ex, o = data.explainer, data.options
    x = data.device_images(slice(None))
    key = "faithfulness-subsets"
    h, w = x.shape[-2:]
    if key not in data.shared:  # the same subsets for every method
        size = o.faithfulness_subset or max(1, h * w // 16)  # checked by the plan
        data.shared[key] = FC.random_subsets(len(x), o.faithfulness_runs, h * w, size,
                                             data.generator("faithfulness"))
    return {"faithfulness_correlation": _mean(FC.faithfulness_correlation(
        F.logit_score(ex.model), x, res.maps, data.device_targets(slice(None)),
        subsets=data.shared[key], baseline=_removal_baseline(data, x),
        batch_size=ex.batch_size * 4))}


def _sensitivity(data: EvalData, res: MethodResult) -> dict:
    """Max- and average-sensitivity from one set of uniform draws (the maps as given, Quantus's
    default ``normalise=False``); computed once for both metrics."""
    o, ex = data.options, data.explainer
    key = ("sensitivity", res.method)
    if key not in data.shared:
        x, t = data.device_images(slice(None)), data.device_targets(slice(None))
        maps = torch.as_tensor(res.maps, device=ex.device)
        noise = Rb.uniform_noise(x, o.robustness_samples, o.sensitivity_radius,
                                 data.generator("sensitivity"))
        dist, _ = Rb.perturbation_distances(data.explain_fn(res.method), x, maps, t, noise,
                                            ex.batch_size)
        mx, avg = Rb.sensitivity_scores(maps, dist)
        data.shared[key] = {"max_sensitivity": _mean(mx), "avg_sensitivity": _mean(avg)}
    return data.shared[key]


def _lipschitz(data: EvalData, res: MethodResult) -> dict:
    """The local Lipschitz estimate on Gaussian draws, the given and the new maps normalised
    per sample (Quantus's default ``normalise=True``)."""
    o, ex = data.options, data.explainer
    x, t = data.device_images(slice(None)), data.device_targets(slice(None))
    maps = prepare(torch.as_tensor(res.maps, device=ex.device), True, False)
    noise = Rb.gaussian_noise(x, o.robustness_samples, o.lipschitz_std, data.generator("lipschitz"))
    dist, dx = Rb.perturbation_distances(prepared(data.explain_fn(res.method), True, False), x,
                                         maps, t, noise, ex.batch_size)
    return {"local_lipschitz": _mean(Rb.lipschitz_scores(dist, dx))}


def _sparseness(data: EvalData, res: MethodResult) -> dict:
    return {"sparseness": _mean(C.sparseness(prepare(res.maps, True, True)))}


def _complexity(data: EvalData, res: MethodResult) -> dict:
    return {"complexity": _mean(C.complexity(prepare(res.maps, True, True)))}


def _relevance(kind: str) -> Callable:
    fn = L.relevance_mass_accuracy if kind == "mass" else L.relevance_rank_accuracy

    def metric(data: EvalData, res: MethodResult) -> dict:
        valid, _, masks = data.pair_truth()
        if not valid.any():
            return {f"relevance_{kind}": float("nan")}
        return {f"relevance_{kind}": _mean(fn(prepare(res.maps[valid], True, False),
                                              masks[valid]))}
    return metric


def _random_logit(data: EvalData, res: MethodResult) -> dict:
    ex = data.explainer
    if data.num_classes < 2:
        return {"random_logit": float("nan")}
    t = data.device_targets(slice(None))
    other = Rz.other_classes(t, data.num_classes, data.generator("random-logit"))
    sim = Rz.random_logit(prepared(data.explain_fn(res.method), True, False),
                          data.device_images(slice(None)), prepare(res.maps, True, False), t,
                          data.num_classes, other_targets=other, batch_size=ex.batch_size)
    return {"random_logit": _mean(sim)}


def _completeness(data: EvalData, res: MethodResult) -> dict:
    """Relative conservation error of the raw map against the target logit: reference
    ``baseline``, f(x) - f(x0) with x0 the zero (mean-colour) image, integrated gradients'
    baseline; ``zero``, f(x) itself (LRP's conservation)."""
    ex, o = data.explainer, data.options
    x = data.device_images(slice(None))
    rel, ab = A.completeness(F.logit_score(ex.model), x, res.maps,
                             data.device_targets(slice(None)), baseline_images=torch.zeros_like(x),
                             reference=o.completeness_reference, batch_size=ex.batch_size * 4)
    return {"completeness": _mean(rel), "completeness_abs_error": _mean(ab),
            "completeness_pass": _mean(A.is_complete(rel, ab))}


@dataclass(frozen=True)
class Metric:
    """One evaluation metric.

    ``score``: the column that *is* the metric (copied to a column named after the metric,
    ``-`` written ``_``, so ``evaluation.csv`` has one column per metric; the others are
    details); ``higher_is_better``: its direction (None: not a ranking of methods);
    ``needs_truth``: uses boxes / masks; ``default``: in the default set;
    ``fn(data, result) -> {column: value}``; its Quantus equivalent is :data:`QUANTUS`."""

    name: str
    description: str
    citation: str
    columns: tuple[str, ...]
    fn: Callable[[EvalData, MethodResult], dict]
    score: str
    higher_is_better: bool | None
    needs_truth: bool = True
    default: bool = True

    @property
    def column(self) -> str:
        return self.name.replace("-", "_")

    def describe(self) -> dict:
        return {"metric": self.name, "column": self.column, "description": self.description,
                "citation": self.citation, "better": {True: "higher", False: "lower",
                                                      None: "-"}[self.higher_is_better],
                "needs": "ground truth" if self.needs_truth else "-",
                "default": self.default, "quantus": QUANTUS.get(self.name, "-"),
                "details": [c for c in self.columns if c != self.column]}


METRICS: dict[str, Metric] = {m.name: m for m in [
    Metric("pointing", "pointing game: max point in the box / on the object, and the hit rate "
           "of a uniformly random point (the box's share of the image)",
           "Zhang et al. 2018; Gu et al. 2018 (CLRP) sec. 5.2",
           ("pointing_game", "pointing_game_mask", "pointing_game_random"), _pointing,
           "pointing_game", True),
    Metric("energy", "energy pointing game at 10..90% of the map's energy (score: mean hit "
           "rate over the nine thresholds)", "Gu et al. 2018 (CLRP) fig. 4",
           tuple(f"pointing_energy_{int(round(100 * t))}" for t in L.ENERGY_THRESHOLDS), _energy,
           "pointing_energy_mean", True),
    Metric("ablation", "logit drop when the max point's patch becomes the dataset mean, vs a "
           "random patch", "Gu et al. 2018 (CLRP) sec. 5.2",
           ("ablation_drop", "ablation_drop_random"), _ablation, "ablation_drop", True, False),
    Metric("deletion", "deletion curve AUC of the class probability: pixels in map order "
           "replaced by `deletion_baseline`, the `deletion_class`'s probability",
           "Samek et al. 2016; Petsiuk et al. 2018", ("deletion_auc",), _deletion,
           "deletion_auc", False, False),
    Metric("insertion", "insertion curve AUC from a blurred image", "Petsiuk et al. 2018",
           ("insertion_auc",), _insertion, "insertion_auc", True, False),
    Metric("localization", "IoU of the largest segment above 15% of max with the box; error: "
           "IoU < 0.5, and by `localization_criterion` a wrong top-1 class",
           "Selvaraju et al. 2017; Russakovsky et al. 2015 (ILSVRC)",
           ("localization_iou", "localization_error"), _localization, "localization_error",
           False),
    Metric("occlusion-rank", "Spearman correlation with the occlusion map",
           "Selvaraju et al. 2017", ("occlusion_spearman",), _occlusion_rank,
           "occlusion_spearman", True, False, False),
    Metric("sanity", "cascading weight randomization, Spearman with the original maps; pass "
           f"when below {SANITY_PASS} after full randomization", "Adebayo et al. 2018",
           ("sanity_spearman_top", "sanity_spearman_all", "sanity_pass"), _sanity,
           "sanity_spearman_all", False, False, False),
    Metric("discriminativeness", "correlation of the maps for the two classes of two-object "
           "images, and the share of each map on its own object", "Gu et al. 2018 (CLRP) sec. 3.1",
           ("class_map_correlation", "own_object_mass"), _discriminativeness,
           "class_map_correlation", False),
    Metric("faithfulness-correlation", "Pearson correlation, over `faithfulness_runs` random "
           "pixel subsets set to `removal_baseline`, of the subset's summed map and the logit's "
           "drop", "Bhatt et al. 2020 (IJCAI)", ("faithfulness_correlation",),
           _faithfulness_correlation, "faithfulness_correlation", True, False),
    Metric("region-perturbation", "AOPC (mean probability drop over k = 0..`regions` removed "
           "blocks of `region_patch` px) most relevant first; details: least relevant first "
           "(lower = better) and their difference", "Samek et al. 2017 (IEEE TNNLS)",
           ("region_perturbation_morf", "region_perturbation_lerf", "region_perturbation_srg"),
           _region_perturbation, "region_perturbation_morf", True, False),
    Metric("pixel-flipping", "AOPC of pixel flipping (`flip_steps` steps) most relevant first; "
           "detail: least relevant first", "Bach et al. 2015 (PLoS ONE)",
           ("pixel_flipping_morf", "pixel_flipping_lerf"), _pixel_flipping,
           "pixel_flipping_morf", True, False),
    Metric("symmetric-relevance-gain", "mean over the pixel-flipping steps of the probability "
           "with the least relevant pixels removed minus with the most relevant removed",
           "Blücher et al. 2024 (TMLR)", ("symmetric_relevance_gain",), _pixel_flipping,
           "symmetric_relevance_gain", True, False),
    Metric("road", "ROAD: mean probability with the least relevant minus the most relevant "
           "p% of pixels imputed (noisy linear imputation; p = `road_step`, 2 `road_step`, ...); "
           "details: each order's mean probability and accuracy", "Rong et al. 2022 (ICML)",
           ("road_morf", "road_lerf", "road_accuracy_morf", "road_accuracy_lerf"), _road,
           "road", True, False),
    Metric("irof", "area over the curve of the probability ratio as `irof_segments` SLIC "
           "superpixels are removed most relevant first", "Rieger & Hansen 2020",
           ("irof",), _irof, "irof", True, False, False),
    Metric("infidelity", "mean squared gap between the map's predicted and the logit's actual "
           "change as `infidelity_patch` blocks are removed in raster order",
           "Yeh et al. 2019 (NeurIPS)", ("infidelity",), _infidelity, "infidelity", False,
           False, False),
    Metric("max-sensitivity", "largest relative change ||a - a'|| / ||a|| of the map over "
           "`robustness_samples` inputs with uniform noise of radius `sensitivity_radius`",
           "Yeh et al. 2019 (NeurIPS)", ("max_sensitivity",), _sensitivity, "max_sensitivity",
           False, False, False),
    Metric("avg-sensitivity", "mean relative change of the map over the same noisy inputs",
           "Yeh et al. 2019 (NeurIPS)", ("avg_sensitivity",), _sensitivity, "avg_sensitivity",
           False, False, False),
    Metric("local-lipschitz", "largest ||a - a'|| / ||x - x'|| over `robustness_samples` "
           "inputs with Gaussian noise of sd `lipschitz_std` (maps normalised by their max)",
           "Alvarez-Melis & Jaakkola 2018", ("local_lipschitz",), _lipschitz, "local_lipschitz",
           False, False, False),
    Metric("sparseness", "Gini index of |map| (1: one pixel holds everything)",
           "Chalasani et al. 2020 (ICML)", ("sparseness",), _sparseness, "sparseness", True,
           False),
    Metric("complexity", "entropy of |map| / sum |map| (nats; lower = simpler)",
           "Bhatt et al. 2020 (IJCAI)", ("complexity",), _complexity, "complexity", False, False),
    Metric("relevance-mass", "share of the map's sum on the object mask (signed)",
           "Arras et al. 2022 (Information Fusion)", ("relevance_mass",), _relevance("mass"),
           "relevance_mass", True),
    Metric("relevance-rank", "share of the K top-ranked pixels on the mask (K = mask size)",
           "Arras et al. 2022 (Information Fusion)", ("relevance_rank",), _relevance("rank"),
           "relevance_rank", True),
    Metric("random-logit", "SSIM between the map and the map of a random other class (lower = "
           "more class-specific)", "Sixt et al. 2020 (ICML)", ("random_logit",), _random_logit,
           "random_logit", False, False),
    Metric("completeness", "relative error of sum(map) against the logit's change from "
           "`completeness_reference` (0: the map conserves the output)",
           "Sundararajan et al. 2017; Bach et al. 2015",
           ("completeness", "completeness_abs_error", "completeness_pass"), _completeness,
           "completeness", False, False),
]}

QUANTUS = {
    "pointing": "PointingGame on the object mask = the detail column pointing_game_mask "
                "(the metric's own column uses the box)",
    "faithfulness-correlation": "FaithfulnessCorrelation(nr_runs=faithfulness_runs, "
                                "subset_size=C x faithfulness_subset, perturb_baseline=0.0 for "
                                "mean) with pixel subsets (all channels) instead of channel "
                                "elements, own draws",
    "region-perturbation": "RegionPerturbation(patch_size=region_patch, "
                           "regions_evaluation=regions, order=morf/lerf, perturb_baseline=0.0); "
                           "AOPC = sum(curve) / (L + 1)",
    "pixel-flipping": "PixelFlipping(features_in_step=C x pixels per step, "
                      "perturb_baseline=0.0) curves with the unperturbed point; AOPC as above",
    "symmetric-relevance-gain": "SymmetricRelevanceGain (Quantus PR #374, unreleased)",
    "road": "ROAD(noise=road_noise) on pixels (Quantus 0.6.0 crashes for 3 channels); both "
            "orders; own draws",
    "irof": "IROF(perturb_baseline=0.0) with cnnexplain's SLIC segments, not skimage's",
    "infidelity": "Infidelity(perturb_patch_sizes=[infidelity_patch], perturb_baseline=0.0)",
    "max-sensitivity": "MaxSensitivity(nr_samples=robustness_samples, "
                       "lower_bound=sensitivity_radius, normalise=False), own draws",
    "avg-sensitivity": "AvgSensitivity(nr_samples=robustness_samples, "
                       "lower_bound=sensitivity_radius, normalise=False), own draws",
    "local-lipschitz": "LocalLipschitzEstimate(nr_samples=robustness_samples, "
                       "perturb_std=lipschitz_std), per-sample normalisation, own draws",
    "sparseness": "Sparseness(abs=True, normalise=True), per-sample normalisation",
    "complexity": "Complexity(abs=True, normalise=True), per-sample normalisation",
    "relevance-mass": "RelevanceMassAccuracy(abs=False, normalise=True)",
    "relevance-rank": "RelevanceRankAccuracy(abs=False, normalise=True)",
    "random-logit": "RandomLogit(num_classes=C, similarity_func=ssim), per-sample "
                    "normalisation, own draws",
    "completeness": "Completeness returns an exact-equality bool; here the relative error "
                    "(completeness_pass: within 1e-3)",
    "sanity": "like MPRT (cascading, top down, Spearman), with cnnexplain's layer groups",
}
"""How each metric relates to Quantus 0.6.0 (the test-only oracle): the settings under which
Quantus computes the same value. Quantus normalises over the whole batch by default; where a
metric normalises, cnnexplain does it per sample (Quantus with ``normalise_axes=[1, 2, 3]``)."""

HEADLINE = ("pointing_game", "localization_error", "deletion_auc", "class_map_correlation",
            "sanity_spearman_all")
"""The columns run.json's summary reports per method (when computed)."""


def parse_metrics(text: str | None) -> list[str]:
    """``"default"`` / None -> the default set; ``"all"`` -> every metric; else a comma list
    of names (validated; ``default`` and ``all`` may appear in it)."""
    names: list[str] = []
    for p in (q.strip() for q in str(text or "default").split(",")):
        if not p:
            continue
        if p.lower() == "all":
            names += list(METRICS)
        elif p.lower() == "default":
            names += default_metrics()
        elif p in METRICS:
            names.append(p)
        else:
            raise UsageError(f"unknown `metrics` entry {p!r}{close_matches(p, METRICS)}",
                             "choose from the list of metrics, or default, or all")
    if not names:
        raise UsageError("`metrics` is empty", "pass e.g. `metrics=default` or all")
    return list(dict.fromkeys(names))


def default_metrics() -> list[str]:
    """The default set: every metric that needs no extra explanation runs per image beyond
    one or two (the robustness metrics, sanity and occlusion rank are opt-in)."""
    return [n for n, m in METRICS.items() if m.default]


@dataclass
class Evaluation:
    """What :func:`evaluate` computed: ``rows`` (one per method: ``method``, ``pairs``,
    ``pairs_with_truth``, then per metric its column and its detail columns), the sanity rows,
    ``curves`` (method -> curve name -> ``[M, K]``), the methods' ranks per metric and the
    metrics' rank agreement (Kendall's tau-b; :mod:`cnnexplain.metrics.agreement`)."""

    rows: list[dict]
    sanity: list[dict]
    curves: dict
    ranks: object
    agreement: object


def evaluate(data: EvalData, results: list[MethodResult], metrics: list[str],
             progress=None) -> Evaluation:
    """Score every method's maps with every metric of ``metrics``."""
    import pandas as pd

    from cnnexplain.metrics.agreement import method_ranks, rank_agreement
    from cnnexplain.progress import silent

    rows = []
    valid, _, _ = data.pair_truth()
    with (progress or silent())(total=len(results) * len(metrics), description="evaluating") as task:
        for res in results:
            row = {"method": res.method, "pairs": len(res.maps),
                   "pairs_with_truth": int(valid.sum())}
            for name in metrics:
                metric = METRICS[name]
                values = metric.fn(data, res)
                row[metric.column] = values.get(metric.score, float("nan"))
                row.update({k: v for k, v in values.items() if k != metric.column})
                task.advance(1)
            rows.append(row)
    table = pd.DataFrame(rows).set_index("method")
    directions = {METRICS[n].column: METRICS[n].higher_is_better for n in metrics
                  if METRICS[n].higher_is_better is not None}
    ranks = method_ranks(table, directions)
    return Evaluation(rows, data.sanity_rows, data.curves, ranks, rank_agreement(ranks))
