"""``cnnexplain dissect``: label every unit of a layer with the Broden concept it detects
(Network Dissection, Bau et al. 2017; seed 001 section 7.1.2, seed 000 "unit
interpretability")."""

from __future__ import annotations

from typing import Annotated, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from cnnexplain.cli import options as O
from cnnexplain.cli.common import start_run
from cnnexplain.cli.main import app
from cnnexplain.errors import UsageError

DISSECT = "Dissection"

HELP = "\n\n".join([
    "Label every unit (channel) of one or more layers with the human concept it detects, as "
    "Network Dissection does (Bau et al. 2017), and count detector units and unique concepts "
    "per Broden category.",
    "Per unit k, the threshold T_k is the top --quantile of all its activations over the "
    "dataset at feature resolution (exact by default; --quantile-mode sketch: constant memory, "
    "one extra read, error bounded by the count of the final histogram bucket, stored in "
    "iou.h5). Per image the map is resized bilinearly (align_corners=False, like "
    "NetDissect-Lite) to the mask size and binarized at > T_k. IoU_k,c = sum |M_k & L_c| / "
    "sum |M_k | L_c| over the images where c's category is present (--iou-mode original, the "
    "paper's), or with a unit's activation counted only where its mask touches that category "
    "(--iou-mode lite, NetDissect-Lite's; never smaller). A unit whose best IoU exceeds "
    "--iou-threshold is a detector.",
    "Broden images are not resized (unless --resize); the normalization defaults to the "
    "model's recorded preprocessing, else ImageNet's. The reference code used (RGB - "
    "\\[124.69, 118.69, 109.54]) / 57.12, i.e. --mean 0.489,0.465,0.430 --std "
    "0.224,0.224,0.224.",
    "All --layer values come from one forward pass; their maps are kept in the HDF5 cache (a "
    "private temporary file with --no-cache), so a repeated run reads them back. --recompute "
    "runs the forward pass again for the tally instead of storing the maps.",
    "Outputs in --out/dissect: tally.csv (NetDissect-Lite's columns; with several layers the "
    "last layer's, plus <layer>/tally.csv for each), summary.csv, iou.h5 (units x concepts IoU "
    "in both modes, thresholds, counts), index.html (bar graphs, per-unit labels and top-image "
    "strips) and, for a gated checkpoint, clusters.csv (the concepts of each class's channel "
    "cluster). Distributed: torchrun --nproc_per_node=N -m cnnexplain dissect ... shards the "
    "images and gives the single-process result.",
])


def _split_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    return items or None


@app.command("dissect", help=HELP)
def dissect(
    checkpoint: O.Checkpoint = None,
    backbone: O.Backbone = None,
    num_classes: O.NumClasses = None,
    weights: O.Weights = None,
    layer: Annotated[Optional[str], typer.Option(
        "--layer", help="Layer(s) to dissect, comma-separated (e.g. layer3,layer4); all in one "
        "forward pass. Default: the model's target layer.", rich_help_panel=O.MODEL,
        show_default=False)] = None,
    broden: Annotated[Optional[str], typer.Option(
        "--broden", help="Root of a Broden-format dataset (index.csv, label.csv, images/).",
        rich_help_panel=O.DATA, show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Alternative to --broden: broden:ROOT.", rich_help_panel=O.DATA,
        show_default=False)] = None,
    split: Annotated[str, typer.Option(
        "--split", help="Broden split: all, train or val.", rich_help_panel=O.DATA)] = "all",
    categories: Annotated[Optional[str], typer.Option(
        "--categories", help="Broden categories to use, comma-separated (e.g. object,part; "
        "default: all). Images without any of them are dropped.", rich_help_panel=O.DATA,
        show_default=False)] = None,
    limit: O.Limit = None,
    resize: O.Resize = None,
    mean: O.Mean = None,
    std: O.Std = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.",
                                            rich_help_panel=O.DATA)] = 32,
    workers: O.Workers = 0,
    quantile: Annotated[float, typer.Option(
        "--quantile", help="Top quantile of each unit's activations that are 'on' (the "
        "paper's 0.005).", rich_help_panel=DISSECT)] = 0.005,
    iou_threshold: Annotated[float, typer.Option(
        "--iou-threshold", help="A unit is a detector when its best IoU exceeds this.",
        rich_help_panel=DISSECT)] = 0.04,
    iou_mode: Annotated[str, typer.Option(
        "--iou-mode", help="original (the paper's denominator) or lite (NetDissect-Lite's).",
        rich_help_panel=DISSECT)] = "original",
    quantile_mode: Annotated[str, typer.Option(
        "--quantile-mode", help="exact (memory ~ quantile x images x h x w per unit) or sketch "
        "(constant memory, bounded error).", rich_help_panel=DISSECT)] = "exact",
    top_images: Annotated[int, typer.Option(
        "--top-images", min=0, help="Top images per unit in the report strips (0: none).",
        rich_help_panel=DISSECT)] = 8,
    recompute: Annotated[bool, typer.Option(
        "--recompute", help="Run the forward pass again for the tally instead of storing the "
        "layer maps (no disk; slower).", rich_help_panel=DISSECT)] = False,
    out: O.Out = None, device: O.Device = "auto", seed: O.Seed = 0, quiet: O.Quiet = False,
    json_output: O.Json = False, recipe: O.Recipe = None, cache_dir: O.CacheDir = None,
    no_cache: O.NoCache = False,
):
    values = dict(locals())
    from cnnexplain.explain.dissect_run import DissectConfig

    config = DissectConfig(quantile=quantile, iou_threshold=iou_threshold, iou_mode=iou_mode,
                           quantile_mode=quantile_mode, top_images=top_images,
                           batch_size=batch_size, workers=workers, recompute=recompute).validate()
    root = _broden_root(broden, dataset)
    run = start_run("dissect", values)
    try:
        return _dissect(run, config, root, split, _split_list(categories), limit)
    finally:
        from cnnexplain.runtime import shutdown_distributed

        shutdown_distributed()


def _broden_root(broden: str | None, dataset: str | None) -> str:
    if broden and dataset:
        raise UsageError("--broden and --dataset name the data twice",
                         "pass only --broden PATH (or --dataset broden:PATH)")
    if dataset:
        prefix, _, rest = dataset.partition(":")
        if prefix != "broden" or not rest:
            raise UsageError(f"dissect needs a Broden dataset, got --dataset {dataset!r}",
                             "pass --broden PATH or --dataset broden:PATH")
        return rest
    if not broden:
        raise UsageError("no Broden dataset given", "pass --broden PATH (a Broden-format "
                         "directory; `cnnexplain data synth --format broden` writes one)")
    return broden


def _dissect(run, config, root, split, categories, limit):
    from cnnexplain.cli.common import load_model_for
    from cnnexplain.data.datasets import open_dataset
    from cnnexplain.data.preprocessing import Preprocessing, parse_triplet
    from cnnexplain.explain.dissect_report import write_dissection
    from cnnexplain.explain.dissect_run import (
        check_memory, dissect as run_dissection, image_loader, plan_layers)
    from cnnexplain.explain.dissection import cluster_rows
    from cnnexplain.models.gates import class_clusters, gate_matrix, gate_threshold
    from cnnexplain.models.layers import parse_layers

    o = run.opts
    loaded = load_model_for(run)
    recorded = loaded.preprocessing
    # Broden images keep their size unless --resize (the recorded resize is a training size)
    prep = Preprocessing(resize=o.resize,
                         mean=parse_triplet(o.mean, "--mean") or recorded.mean,
                         std=parse_triplet(o.std, "--std") or recorded.std)
    layers = parse_layers(o.layer) or [loaded.layer]
    data = open_dataset(f"broden:{root}", split, prep, limit=limit, categories=categories)
    plans = plan_layers(loaded.model, layers, data, prep, run.device)
    check_memory(plans, len(data), config)
    matrix = gate_matrix(loaded)
    gated_layer = None
    if matrix is not None:
        gated_layer = (loaded.meta.get("gate") or {}).get("layer") or loaded.layer
    if matrix is not None and gated_layer in plans and plans[gated_layer].units != matrix.shape[0]:
        raise UsageError(f"the checkpoint's gate has {matrix.shape[0]} channels but layer "
                         f"{gated_layer!r} has {plans[gated_layer].units} units",
                         "check that the checkpoint matches its backbone")
    result = run_dissection(loaded.model, layers, data, preprocessing=prep, config=config,
                            device=run.device, model_fingerprint=loaded.fingerprint,
                            cache=run.cache, progress=run.progress, dist=run.dist, plans=plans)
    clusters = None
    if matrix is not None:
        if gated_layer in result.layers:
            names = loaded.class_names or [str(c) for c in range(matrix.shape[1])]
            clusters = cluster_rows(result.layers[gated_layer].labels,
                                    class_clusters(matrix, gate_threshold(loaded)).numpy(),
                                    list(names), result.space, config.iou_threshold)
        else:
            run.notice(f"the checkpoint is gated at {gated_layer}, which is not among --layer "
                       f"{','.join(layers)}; no per-class cluster table")
    paths = []
    if run.dist.is_main:
        paths = write_dissection(result, run.out, load_image=image_loader(data), clusters=clusters,
                                 title=f"Network Dissection: {loaded.backbone} "
                                       f"({loaded.source}) on {root}")
        _print_tables(run, result, clusters)
    summary = {"images": result.n_images, "quantile": config.quantile,
               "quantile_mode": config.quantile_mode, "iou_mode": config.iou_mode,
               "iou_threshold": config.iou_threshold, "categories": list(result.space.categories),
               "layers": result.summary(), "report": str(run.out / "dissect" / "index.html")}
    last = result.summary()[layers[-1]]
    summary.update({"detectors": last["detectors"], "unique_concepts": last["unique_concepts"]})
    if clusters is not None:
        summary["clusters"] = [{k: r[k] for k in ("class_name", "channels", "detectors",
                                                  "unique_concepts")} for r in clusters]
    run.finish(summary=summary, model=loaded, data=data, results=paths)
    return 0


def _print_tables(run, result, clusters) -> None:
    cfg = result.config
    for name, lr in result.layers.items():
        rows = lr.summary_rows(result.space.categories, cfg.iou_threshold)
        table = Table(title=f"{escape(name)}: {lr.units} units, detectors at IoU > "
                            f"{cfg.iou_threshold} ({cfg.iou_mode})")
        table.add_column("category")
        table.add_column("detector units", justify="right")
        table.add_column("unique concepts", justify="right")
        table.add_column("top concepts (units)")
        det = lr.labels.detectors(cfg.iou_threshold)
        for g, r in enumerate(rows):
            sel = det if g == len(rows) - 1 else det & (lr.labels.category == g)
            labels, counts = np.unique(lr.labels.label[sel], return_counts=True)
            best = sorted(zip(counts, labels), key=lambda t: (-t[0], t[1]))[:4]
            text = ", ".join(f"{result.space.names[int(lab)]} ({int(c)})" for c, lab in best)
            table.add_row(escape(r["category"]), str(r["detector_units"]),
                          str(r["unique_concepts"]), escape(text))
        run.print(table)
    if clusters:
        table = Table(title="concepts detected by each class's channel cluster")
        for col in ("class", "channels", "detectors", "concepts"):
            table.add_column(col)
        for r in clusters:
            table.add_row(escape(str(r["class_name"])), str(r["channels"]), str(r["detectors"]),
                          escape(r["concepts"]))
        run.print(table)
