"""Saliency over a set of inputs: :func:`plan` checks a job against the loaded model and the
inputs (methods apply, the layer suits them, the target fits; nothing is computed),
:func:`execute` computes the maps of every method and their evaluation. The ``saliency`` job
(:mod:`cnnexplain.jobs.saliency`) writes the files."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.explain.saliency.base import (
    METHODS,
    Context,
    MethodOptions,
    ModelInfo,
    get_method,
)
from cnnexplain.explain.saliency.evaluation import (
    HEADLINE,
    EvalData,
    EvalOptions,
    evaluate,
)
from cnnexplain.explain.saliency.inputs import ImageSet, TargetSpec, predictions
from cnnexplain.explain.saliency.runner import Explainer, MethodResult
from cnnexplain.models.layers import ONE_BY_ONE_FIX, get_module, one_by_one


def parse_methods(text: str | None) -> list[str] | None:
    """``"all"`` -> None (every applicable method); else the validated list of names."""
    if text is None or str(text).strip().lower() == "all":
        return None
    names = [p.strip() for p in str(text).split(",") if p.strip()]
    if not names:
        raise UsageError("`methods` is empty", "pass e.g. `methods=gradient,gradcam` or all")
    for n in names:
        get_method(n)
    return list(dict.fromkeys(names))


def model_info(loaded, clusters) -> ModelInfo:
    return ModelInfo(backbone=loaded.backbone, gap=bool(loaded.spec.gap),
                     gated=clusters is not None, model_type=type(loaded.model),
                     num_classes=int(loaded.num_classes))


def select_methods(requested: list[str] | None, info: ModelInfo) -> tuple[list[str], list[str]]:
    """``(methods to run, skipped)``: explicit names must all apply (else a one-line
    UsageError naming the problem and the fix); ``all`` keeps those that apply."""
    if requested is None:
        run = [n for n, m in METHODS.items() if m.problem(info) is None]
        return run, [n for n in METHODS if n not in run]
    for n in requested:
        problem = METHODS[n].problem(info)
        if problem is not None:
            raise UsageError(*problem)
    return requested, []


def probe_layer(model, layer: str, example: torch.Tensor, methods: list[str], clusters) -> tuple:
    """Check, with one forward pass of one image, that ``layer`` outputs one 4-D tensor once per
    forward pass (what the layer methods need) and that a gate's clusters fit it."""
    if not any(METHODS[n].kind == "layer" for n in methods):
        return ()
    module = get_module(model, layer)
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, o: seen.append(o))
    try:
        with torch.no_grad():
            model(example)
    finally:
        handle.remove()
    users = [n for n in methods if METHODS[n].kind == "layer"]
    if len(seen) != 1:
        raise UsageError(f"layer {layer!r} runs {len(seen)} times per forward pass, so its output "
                         f"is ambiguous for {users[0]}",
                         "choose a layer that runs exactly once, e.g. its parent block")
    out = seen[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"{users[0]} needs a convolutional layer with output [B, C, h, w]; "
                         f"{layer!r} outputs {shape}",
                         "pass `layer` naming a conv block, e.g. the backbone's default layer")
    gated = [n for n in methods if METHODS[n].needs_gate]
    if gated and clusters is not None and clusters.shape[1] != out.shape[1]:
        raise UsageError(f"the gate's clusters cover {clusters.shape[1]} channels but layer "
                         f"{layer!r} has {out.shape[1]}",
                         "leave out `layer` so that gated-cam explains the gated layer")
    return tuple(out.shape[1:])


def check_eval_sizes(options: EvalOptions, metrics: list[str], h: int, w: int) -> None:
    """The evaluation's sizes fit the images (checked before anything is computed)."""
    sizes = {"faithfulness-correlation": ("faithfulness_subset", h * w - 1, "pixels"),
             "region-perturbation": ("region_patch", min(h, w), "px"),
             "infidelity": ("infidelity_patch", min(h, w), "px")}
    for metric, (name, most, unit) in sizes.items():
        value = getattr(options, name)
        if metric in metrics and value is not None and value > most:
            raise UsageError(f"`{name}` is {value} but the {h}x{w} images allow at most "
                             f"{most} {unit}", f"pass `{name}` of at most {most}, or leave it "
                             "out for the default")


@dataclass
class Plan:
    """A validated ``saliency`` job."""

    loaded: object
    images: ImageSet
    methods: list[str]
    skipped: list[str]
    layer: str
    target: TargetSpec
    context: Context
    batch_size: int
    device: object
    evaluate: bool = False
    metrics: list[str] = field(default_factory=list)
    eval_options: EvalOptions = field(default_factory=EvalOptions)
    overlays: int = 8
    notices: list[str] = field(default_factory=list)


def plan(loaded, images: ImageSet, requested: list[str] | None, target: TargetSpec,
         layer: str | None, options: MethodOptions, batch_size: int, device, seed: int = 0,
         evaluate: bool = False, metrics: list[str] | None = None,
         eval_options: EvalOptions | None = None, overlays: int = 8) -> Plan:
    """Check the whole job against the loaded model and inputs (nothing computed or
    written): methods apply to the model, the layer exists and suits them, the target fits the
    model and the inputs, the inputs are large enough, evaluation has ground truth.
    ``requested``: method names (:func:`parse_methods`; None: every applicable one);
    ``options`` / ``eval_options``: validated options."""
    from cnnexplain.models.gates import class_clusters, gate_matrix, gate_threshold

    eval_options = eval_options or EvalOptions()
    layer = layer or loaded.layer
    get_module(loaded.model, layer)
    notices: list[str] = []

    matrix = gate_matrix(loaded)
    clusters = None
    if matrix is not None:
        threshold = options.gate_threshold
        if threshold is None:
            threshold = gate_threshold(loaded)
        clusters = class_clusters(matrix, threshold)
        empty = [loaded.class_name(c) for c in range(clusters.shape[0]) if not clusters[c].any()]
        if empty:
            notices.append(f"at gate threshold {threshold} the cluster of class(es) "
                           f"{', '.join(empty[:5])} is empty: gated-cam is zero for them")
    info = model_info(loaded, clusters)
    methods, skipped = select_methods(requested, info)
    if skipped:
        notices.append(f"`methods=all`: skipping {', '.join(skipped)} (not applicable to "
                       f"{info.label}; see the list of methods)")
    if evaluate and images.truth is None:
        raise UsageError(f"`evaluate` needs ground-truth boxes or masks, and {images.source} "
                         "has none", "evaluate on `dataset=synthetic[...]` (its images carry "
                         "masks and boxes), or leave out `evaluate=true`")
    target.check(int(loaded.num_classes), images.has_labels)
    h, w = images.size
    if evaluate:
        check_eval_sizes(eval_options, metrics or [], h, w)
    min_size = loaded.spec.min_size
    if min(h, w) < min_size:
        raise UsageError(f"{loaded.backbone} needs inputs of at least {min_size} px, these are "
                         f"{h}x{w}", f"pass `resize={max(min_size, 64)}` (or a dataset with "
                         "larger images)")
    example = images.images[:1].to(device)
    shape = probe_layer(loaded.model, layer, example, methods, clusters)
    if shape and shape[1] * shape[2] == 1:
        layer_methods = [n for n in methods if METHODS[n].kind == "layer"]
        problem = one_by_one(layer, (h, w), layer_methods[0])
        if requested is not None:
            raise UsageError(problem, ONE_BY_ONE_FIX)
        methods = [n for n in methods if n not in layer_methods]
        skipped += layer_methods
        notices.append(f"{problem}: skipping {', '.join(layer_methods)}")
    context = Context(options=options, preprocessing=loaded.preprocessing,
                      classifier=loaded.spec.classifier, clusters=clusters, seed=int(seed),
                      backbone=loaded.backbone)
    return Plan(loaded=loaded, images=images, methods=methods, skipped=skipped, layer=layer,
                target=target, context=context, batch_size=int(batch_size), device=device,
                evaluate=bool(evaluate), metrics=list(metrics or []),
                eval_options=eval_options, overlays=int(overlays), notices=notices)


@dataclass
class Outcome:
    """What :func:`execute` computed: the explained pairs, one :class:`MethodResult` per method,
    evaluation rows (method x metric), sanity rows (method x step), the evaluation's curves
    (method -> name -> ``[M, K]``), the methods' ranks per metric and the metrics' rank
    agreement."""

    image_index: torch.Tensor
    targets: torch.Tensor
    rank: torch.Tensor
    results: list[MethodResult]
    evaluation: pd.DataFrame | None = None
    sanity: pd.DataFrame | None = None
    curves: dict = field(default_factory=dict)
    ranks: pd.DataFrame | None = None
    agreement: pd.DataFrame | None = None

    def summary(self) -> dict:
        methods = {}
        ev = self.evaluation.set_index("method") if self.evaluation is not None else None
        for r in self.results:
            d = {"ms_per_image": round(r.ms_per_image, 3), "cached": bool(r.cached)}
            if ev is not None and r.method in ev.index:
                for col in HEADLINE:
                    if col in ev.columns:
                        v = float(ev.loc[r.method, col])
                        d[col] = None if not np.isfinite(v) else round(v, 4)
            methods[r.method] = d
        return {"pairs": int(len(self.image_index)), "methods": methods}


def execute(p: Plan, cache=None, progress=None) -> Outcome:
    """Predictions (for pred / topk targets), maps for every method (cached), evaluation."""
    loaded = p.loaded
    # the model's outputs are always checked before any map is computed or cached
    logits = predictions(loaded.model, p.images.images, p.device, p.batch_size, progress)
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).any(dim=1).sum())
        raise CnnexplainError(f"the model outputs NaN or Inf for {bad} of {len(logits)} images",
                              "check the checkpoint (a diverged training run?) and the inputs; "
                              "nothing was written")
    image_index, targets, rank = p.target.resolve(logits, p.images.labels, len(p.images))
    explainer = Explainer(model=loaded.model, images=p.images.images, context=p.context,
                          device=p.device, batch_size=p.batch_size, layer=p.layer,
                          model_fingerprint=loaded.fingerprint,
                          inputs_fingerprint=p.images.fingerprint, target_text=p.target.text,
                          cache=cache, progress=progress)
    results = [explainer.run(name, image_index, targets) for name in p.methods]
    for r in results:
        if not np.isfinite(r.maps).all():
            raise CnnexplainError(f"{r.method} produced NaN or Inf values",
                                  "check the model and the inputs (re-run with `no_cache=true`)")
    outcome = Outcome(image_index, targets, rank, results)
    if p.evaluate:
        labels = p.images.labels if p.images.labels is not None else torch.full(
            (len(p.images),), -1, dtype=torch.long)
        data = EvalData(explainer=explainer, labels=labels, truth=p.images.truth,
                        image_index=image_index, targets=targets, options=p.eval_options,
                        predictions=logits.argmax(dim=1).cpu())
        ev = evaluate(data, results, p.metrics, progress)
        outcome.evaluation = pd.DataFrame(ev.rows)
        outcome.sanity = pd.DataFrame(ev.sanity) if ev.sanity else None
        outcome.curves = ev.curves
        outcome.ranks = ev.ranks.reset_index()
        outcome.agreement = ev.agreement.rename_axis("metric").reset_index()
    return outcome


def display_images(p: Plan) -> np.ndarray:
    """``[N, H, W, 3]`` in [0, 1] for the PNGs (inputs denormalized with the model's
    preprocessing)."""
    img = p.loaded.preprocessing.denormalize(p.images.images).clamp(0, 1)
    return img.permute(0, 2, 3, 1).numpy()
