"""``dissect``: label every unit of one or more layers with the Broden concept it detects
(Network Dissection, Bau et al. 2017), and per class cluster of a gated model."""

from __future__ import annotations

from dataclasses import dataclass

from cnnexplain.config.dissect import DissectOptions
from cnnexplain.errors import UsageError
from cnnexplain.jobs.base import Output, Session
from cnnexplain.jobs.resolve import Resolved, file_policy, resolve

COMMAND = "dissect"


@dataclass
class Plan:
    options: DissectOptions
    resolved: Resolved
    root: str
    layers: list[str]
    data: object
    plans: dict
    matrix: object
    gated_layer: str | None


def plan(options: DissectOptions, session: Session) -> Plan:
    """Load the model (Broden images keep their size unless ``resize``), open the Broden
    data, probe every layer and check the memory the thresholds need."""
    from cnnexplain.data.datasets import open_dataset
    from cnnexplain.explain.dissect.run import check_memory, plan_layers
    from cnnexplain.models.gates import gate_matrix
    from cnnexplain.models.layers import parse_layers

    from cnnexplain.data.broden import image_side

    root = options.data.root()
    resolved = resolve(options.model, options.prep, None, device=session.device,
                       seed=session.seed, keep_size=True, several_layers=True,
                       input_side=image_side(root))
    loaded, prep = resolved.loaded, resolved.preprocessing
    layers = parse_layers(options.model.layer) or [loaded.layer]
    data = open_dataset(f"broden:{root}", options.data.split, prep, limit=options.data.limit,
                        categories=options.data.category_list(),
                        files=file_policy(options.files))
    plans = plan_layers(loaded.model, layers, data, prep, session.device)
    check_memory(plans, len(data), options.config)
    matrix = gate_matrix(loaded)
    gated = (resolved.gate_layer or loaded.layer) if matrix is not None else None
    if matrix is not None and gated in plans and plans[gated].units != matrix.shape[0]:
        raise UsageError(f"the checkpoint's gate has {matrix.shape[0]} channels but layer "
                         f"{gated!r} has {plans[gated].units} units",
                         "check that the checkpoint matches its backbone")
    return Plan(options, resolved, root, layers, data, plans, matrix, gated)


def run(plan: Plan, session: Session):
    """The dissection of every layer in one forward pass, and the concepts of each class's
    channel cluster of a gated model: ``(result, clusters or None)``."""
    from cnnexplain.explain.dissect.labels import cluster_rows
    from cnnexplain.explain.dissect.run import dissect, silent_layers
    from cnnexplain.models.gates import class_clusters, gate_threshold

    loaded = plan.resolved.loaded
    config = plan.options.config
    result = dissect(loaded.model, plan.layers, plan.data, preprocessing=plan.resolved.preprocessing,
                     config=config, device=session.device, model_fingerprint=loaded.fingerprint,
                     cache=session.cache, progress=session.progress, dist=session.dist,
                     plans=plan.plans)
    for layer in silent_layers(result, "negative"):
        session.notice(f"layer {layer}: no unit has activations below its negative "
                       "threshold (the bottom `quantile` of its activations), so `negative` "
                       "labels nothing there (a layer after a ReLU is >= 0 and its bottom "
                       "quantile is 0); dissect the module before the activation for it, "
                       "e.g. a BatchNorm")
    clusters = None
    if plan.matrix is not None:
        if plan.gated_layer in result.layers:
            names = loaded.class_names or [str(c) for c in range(plan.matrix.shape[1])]
            clusters = cluster_rows(result.layers[plan.gated_layer].labels,
                                    class_clusters(plan.matrix, gate_threshold(loaded)).numpy(),
                                    list(names), result.space, config.iou_threshold)
        else:
            session.notice(f"the checkpoint is gated at {plan.gated_layer}, which is not among "
                           f"the dissected layers {','.join(plan.layers)}; no per-class "
                           "cluster table")
    return result, clusters


def write(plan: Plan, computed, session: Session) -> Output:
    """dissect/tally.csv, summary.csv, iou.h5, clusters.csv, the PNGs and index.html; with
    ``negative`` / ``rotate`` also each view's tally, summary and iou files and rotation.csv.
    The summary's headline counts are the positive, unrotated layer's; ``negative`` and
    ``rotated`` add that view's per-layer counts and the last layer's
    ``detectors_<view>`` / ``unique_concepts_<view>``."""
    from cnnexplain.explain.dissect.report import write_dissection
    from cnnexplain.explain.dissect.run import image_loader

    result, clusters = computed
    loaded, config = plan.resolved.loaded, plan.options.config
    paths = []
    if session.dist.is_main:
        from cnnexplain.jobs.building_blocks import visualizations

        visuals = {layer: visualizations(session.layout, layer, loaded.fingerprint)
                   for layer in plan.layers}
        paths = write_dissection(result, session.out, load_image=image_loader(plan.data),
                                 clusters=clusters, visuals=visuals,
                                 title=f"Network Dissection: {loaded.backbone} "
                                       f"({loaded.source}) on {plan.root}")
    summary = {"images": result.n_images, "quantile": config.quantile,
               "quantile_mode": config.quantile_mode, "iou_mode": config.iou_mode,
               "iou_threshold": config.iou_threshold, "categories": list(result.space.categories),
               "layers": result.summary(), "report": str(session.layout.dissect_index)}
    last = result.summary()[plan.layers[-1]]
    summary.update({"detectors": last["detectors"], "unique_concepts": last["unique_concepts"]})
    for view in result.variants:
        counts = result.summary(view)
        summary[view] = counts
        if plan.layers[-1] in counts:
            summary[f"detectors_{view}"] = counts[plan.layers[-1]]["detectors"]
            summary[f"unique_concepts_{view}"] = counts[plan.layers[-1]]["unique_concepts"]
    if "rotated" in result.variants:
        summary["rotate"] = config.rotate
        summary["rotation"] = str(session.layout.dissect_rotation)
    if clusters is not None:
        summary["clusters"] = [{k: r[k] for k in ("class_name", "channels", "detectors",
                                                  "unique_concepts")} for r in clusters]
    return Output(summary=summary, paths=paths, model=loaded, data=plan.data,
                  result=(result, clusters))
