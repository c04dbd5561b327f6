"""``saliency``: pixel-level explanations with every method of the seeds, for any backbone,
batched, on CPU or GPU, scored with the seeds' evaluations."""

from __future__ import annotations

import dataclasses

from cnnexplain.config.saliency import SaliencyOptions
from cnnexplain.jobs.base import Output, Session
from cnnexplain.jobs.resolve import file_policy, resolve

COMMAND = "saliency"


def plan(options: SaliencyOptions, session: Session):
    """Parse methods, target and metrics, load the model and the inputs, and check the job
    against both (:func:`cnnexplain.explain.saliency.pipeline.plan`)."""
    from cnnexplain.explain.saliency import pipeline
    from cnnexplain.explain.saliency.evaluation import parse_metrics
    from cnnexplain.explain.saliency.gradients import SmoothGrad
    from cnnexplain.explain.saliency.inputs import TargetSpec, from_images, from_npy, from_opened

    o, data = options, options.data
    metric_names = parse_metrics(o.metrics) if o.evaluate else []
    requested = pipeline.parse_methods(o.methods)
    if requested and "smoothgrad" in requested:
        SmoothGrad.base_method(o.method_options.smoothgrad_base)
    target = TargetSpec.parse(o.target)
    sources = data.sources()
    from_data = not sources or sources[0] == "dataset"
    files = file_policy(o.files)
    resolved = resolve(o.model, o.prep, data if from_data else None, device=session.device,
                       seed=session.seed, files=files)
    loaded = resolved.loaded
    if data.inputs is not None:
        images = from_npy(data.inputs, min_size=1)
    elif data.image_items():
        images = from_images(data.image_items(), loaded.preprocessing, session.progress,
                             files=files)
    else:
        images = from_opened(resolved.data, data.split, loaded.preprocessing,
                             batch_size=max(data.batch_size, 32), progress=session.progress)
    eval_options = dataclasses.replace(o.eval_options, seed=session.seed)
    p = pipeline.plan(loaded, images, requested, target, o.model.layer, o.method_options,
                      data.batch_size, session.device, seed=session.seed, evaluate=o.evaluate,
                      metrics=metric_names, eval_options=eval_options, overlays=o.overlays)
    for note in p.notices:
        session.notice(note)
    return p


def run(plan, session: Session):
    """Maps for every method (cached), then their evaluation."""
    from cnnexplain.explain.saliency import pipeline

    outcome = pipeline.execute(plan, cache=session.cache, progress=session.progress)
    ev = outcome.evaluation
    if ev is not None and len(ev) and int(ev["pairs_with_truth"].iloc[0]) == 0:
        session.notice(f"no explained class is present in its image (`target={plan.target.text}`), "
                       "so the pointing, energy and localization metrics are undefined; use "
                       "`target=label`")
    return outcome


def write(plan, outcome, session: Session) -> Output:
    """saliency/maps.h5, evaluation.csv (with metric_ranks.csv, metric_agreement.csv and
    evaluation_curves.h5), sanity.csv, overlays and the grid (atomically)."""
    import torch

    from cnnexplain.explain.saliency.outputs import write_curves_h5, write_maps_h5, write_pngs
    from cnnexplain.explain.saliency.pipeline import display_images
    from cnnexplain.io import write_csv

    layout = session.layout
    p, o = plan, outcome
    labels = (p.images.labels[o.image_index] if p.images.labels is not None
              else torch.full((len(o.image_index),), -1, dtype=torch.long))
    names = [p.images.names[int(i)] for i in o.image_index]
    attrs = {"target": p.target.text, "source": p.images.source,
             "model_json": p.loaded.describe(), "methods_json": p.methods,
             "preprocessing_json": p.loaded.preprocessing.to_dict(), "layer": p.layer}
    paths = [write_maps_h5(layout.saliency_maps, o.results, o.image_index.numpy(),
                           o.targets.numpy(), o.rank.numpy(), labels.numpy(), names, attrs)]
    if o.evaluation is not None:
        from cnnexplain.explain.saliency.evaluation import CURVES

        write_csv(layout.saliency_evaluation, o.evaluation)
        write_csv(layout.saliency_ranks, o.ranks)
        write_csv(layout.saliency_agreement, o.agreement)
        paths += [layout.saliency_evaluation, layout.saliency_ranks, layout.saliency_agreement]
        if o.curves:
            paths.append(write_curves_h5(layout.saliency_curves, o.curves, CURVES, attrs))
    if o.sanity is not None:
        write_csv(layout.saliency_sanity, o.sanity)
        paths.append(layout.saliency_sanity)
    if p.overlays > 0:
        paths += write_pngs(layout.saliency, o.results, display_images(p),
                            o.image_index.numpy(), o.targets.numpy(), p.images.names,
                            p.loaded.class_name, p.overlays, session.progress,
                            boxes=truth_boxes(p.images, o.image_index, o.targets))
    summary = {**o.summary(), "layer": p.layer, "target": p.target.text,
               "outputs": [str(x) for x in paths[:3]]}
    return Output(summary=summary, paths=paths, model=p.loaded, data=p.images.describe,
                  result=o)


def truth_boxes(images, image_index, targets) -> list | None:
    """Per explained pair, the ground-truth box of the target class's object in its image (the
    main object's, or the second object's), None where the class is absent; None without truth."""
    t = images.truth
    if t is None or images.labels is None:
        return None
    out = []
    for i, c in zip(image_index.tolist(), targets.tolist()):
        if int(images.labels[i]) == c:
            out.append(t["box"][i].tolist())
        elif "second_label" in t and int(t["second_label"][i]) == c:
            out.append(t["second_box"][i].tolist())
        else:
            out.append(None)
    return out
