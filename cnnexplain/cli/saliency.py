"""``cnnexplain saliency``: pixel-level explanations with every method of the seeds, for any
backbone, batched, on CPU or GPU, scored with the seeds' evaluations."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from cnnexplain.cli import options as O
from cnnexplain.cli.common import load_model_for, start_run
from cnnexplain.cli.main import app
from cnnexplain.errors import UsageError

SAL = "Saliency"
MOPT = "Method options"
EVAL = "Evaluation"

HELP = """Explain a model's decisions pixel by pixel and score the explanations.

Inputs (one of): --dataset SPEC [--split --limit] (default synthetic), --images FILES_OR_DIR
(read with PIL, resized and normalized as the model expects), --inputs FILE.npy (float
N x 3 x H x W, already preprocessed, used as is). Targets: --target pred | label | CLASS |
topk:K. Methods: --methods m1,m2,... or all (see --list-methods); layer methods use --layer
(default: the backbone's last conv block, or a gated checkpoint's gated layer).

--evaluate (needs boxes or masks: the synthetic world has both) scores every method with the
pointing game and its energy variant, max-point ablation, deletion / insertion AUC, localization
error, rank correlation with occlusion, the cascading-randomization sanity check and class
discriminativeness on two-object images (--metrics picks a subset).

Writes OUT/saliency/maps.h5 (maps/<method> N x H x W, raw/<method>, with sign conventions),
overlays/<method>_<i>.png, grid.png, evaluation.csv and sanity.csv; maps are cached."""


def _list_methods(as_json: bool) -> None:
    from cnnexplain.explain.saliency import METHODS

    rows = [m.describe() for m in METHODS.values()]
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    from rich.console import Console

    table = Table(title="Saliency methods")
    for col in ("method", "kind", "needs", "description"):
        table.add_column(col, overflow="fold")
    for m in METHODS.values():
        needs = [n for n, flag in (("layer", m.needs_layer), ("GAP head", m.needs_gap),
                                   ("gate", m.needs_gate)) if flag]
        if m.name.startswith(("lrp", "clrp")):
            needs.append("LRP canonizer")
        table.add_row(m.name, m.kind, ", ".join(needs) or "-", m.description)
    Console(soft_wrap=False).print(table)


@app.command("saliency", help=HELP)
def saliency(
    checkpoint: O.Checkpoint = None,
    backbone: O.Backbone = None,
    num_classes: O.NumClasses = None,
    weights: O.Weights = None,
    layer: O.Layer = None,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Dataset spec (default synthetic), e.g. synthetic:n=200,res=32,second=1.0.",
        rich_help_panel=O.DATA, show_default=False)] = None,
    split: O.Split = "val",
    limit: O.Limit = None,
    images: Annotated[Optional[List[str]], typer.Option(
        "--images", help="Image files or a directory (repeat or comma-separate).",
        rich_help_panel=O.DATA, show_default=False)] = None,
    inputs: Annotated[Optional[Path], typer.Option(
        "--inputs", help="A .npy float array N x 3 x H x W, already preprocessed.",
        rich_help_panel=O.DATA, show_default=False)] = None,
    resize: O.Resize = None,
    mean: O.Mean = None,
    std: O.Std = None,
    batch_size: O.BatchSize = 16,
    methods: Annotated[str, typer.Option(
        "--methods", help="Comma-separated methods, or all (every one that applies).",
        rich_help_panel=SAL)] = "gradient,gradcam",
    list_methods: Annotated[bool, typer.Option(
        "--list-methods", help="List the methods with one-line descriptions and exit.",
        rich_help_panel=SAL)] = False,
    target: Annotated[str, typer.Option(
        "--target", help="pred (top class), label, a class index, or topk:K (K pairs per image).",
        rich_help_panel=SAL)] = "pred",
    overlays: Annotated[int, typer.Option(
        "--overlays", min=0, help="Pairs to draw as PNG overlays per method (0: none, no grid).",
        rich_help_panel=SAL)] = 8,
    smoothgrad_base: Annotated[str, typer.Option(
        "--smoothgrad-base", help="Gradient method SmoothGrad averages.",
        rich_help_panel=MOPT)] = "gradient",
    smoothgrad_samples: Annotated[int, typer.Option(
        "--smoothgrad-samples", help="Noisy copies per image.", rich_help_panel=MOPT)] = 16,
    smoothgrad_sigma: Annotated[float, typer.Option(
        "--smoothgrad-sigma", help="Noise std as a fraction of each image's input range.",
        rich_help_panel=MOPT)] = 0.15,
    ig_steps: Annotated[int, typer.Option("--ig-steps", help="Integrated-gradients path points.",
                                          rich_help_panel=MOPT)] = 32,
    ig_method: Annotated[str, typer.Option(
        "--ig-method", help="gausslegendre, riemann_right, riemann_left, riemann_middle or "
        "riemann_trapezoid.", rich_help_panel=MOPT)] = "gausslegendre",
    occlusion_window: Annotated[Optional[int], typer.Option(
        "--occlusion-window", help="Occluder side in pixels (default side // 8).",
        rich_help_panel=MOPT, show_default=False)] = None,
    occlusion_stride: Annotated[Optional[int], typer.Option(
        "--occlusion-stride", help="Occluder stride (default half the window).",
        rich_help_panel=MOPT, show_default=False)] = None,
    lime_samples: Annotated[int, typer.Option("--lime-samples", help="LIME perturbed samples.",
                                              rich_help_panel=MOPT)] = 256,
    lime_segments: Annotated[int, typer.Option("--lime-segments", help="LIME SLIC superpixels.",
                                               rich_help_panel=MOPT)] = 50,
    lrp_epsilon: Annotated[float, typer.Option("--lrp-epsilon", help="Epsilon of the LRP epsilon rule.",
                                               rich_help_panel=MOPT)] = 1e-6,
    gate_threshold: Annotated[Optional[float], typer.Option(
        "--gate-threshold", help="gated-cam cluster threshold (default: the checkpoint's).",
        rich_help_panel=MOPT, show_default=False)] = None,
    internal_batch_size: Annotated[int, typer.Option(
        "--internal-batch-size", help="Model passes per chunk for SmoothGrad, integrated "
        "gradients, occlusion and LIME (bounds memory).", rich_help_panel=MOPT)] = 64,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Score the maps (needs ground truth).",
                                           rich_help_panel=EVAL)] = False,
    metrics: Annotated[str, typer.Option(
        "--metrics", help="pointing, energy, ablation, deletion, insertion, localization, "
        "occlusion-rank, sanity, discriminativeness, or all.", rich_help_panel=EVAL)] = "all",
    ablation_patch: Annotated[Optional[int], typer.Option(
        "--ablation-patch", help="Side of the ablated square (default side // 8).",
        rich_help_panel=EVAL, show_default=False)] = None,
    deletion_steps: Annotated[int, typer.Option(
        "--deletion-steps", help="Steps of the deletion / insertion curves.",
        rich_help_panel=EVAL)] = 20,
    sanity_steps: Annotated[int, typer.Option(
        "--sanity-steps", help="Groups of layers randomized in turn, top down.",
        rich_help_panel=EVAL)] = 5,
    sanity_limit: Annotated[int, typer.Option(
        "--sanity-limit", help="Pairs the sanity check recomputes.", rich_help_panel=EVAL)] = 16,
    out: O.Out = None, device: O.Device = "auto", seed: O.Seed = 0, quiet: O.Quiet = False,
    json_output: O.Json = False, recipe: O.Recipe = None, cache_dir: O.CacheDir = None,
    no_cache: O.NoCache = False,
):
    if list_methods:
        _list_methods(json_output)
        return
    values = dict(locals())
    from cnnexplain.explain.saliency import MethodOptions
    from cnnexplain.explain.saliency import pipeline
    from cnnexplain.explain.saliency.evaluation import EvalOptions, parse_metrics
    from cnnexplain.explain.saliency.inputs import TargetSpec, from_dataset, from_images, from_npy

    # -- everything that needs no model or data ----------------------------------------------
    options = MethodOptions(
        smoothgrad_base=smoothgrad_base, smoothgrad_samples=smoothgrad_samples,
        smoothgrad_sigma=smoothgrad_sigma, ig_steps=ig_steps, ig_method=ig_method,
        occlusion_window=occlusion_window, occlusion_stride=occlusion_stride,
        lime_samples=lime_samples, lime_segments=lime_segments, lrp_epsilon=lrp_epsilon,
        gate_threshold=gate_threshold, internal_batch_size=internal_batch_size).validate()
    eval_options = EvalOptions(ablation_patch=ablation_patch, steps=deletion_steps,
                               sanity_steps=sanity_steps, sanity_limit=sanity_limit,
                               seed=seed).validate()
    metric_names = parse_metrics(metrics) if evaluate else []
    requested = pipeline.parse_methods(methods)
    if requested and "smoothgrad" in requested:
        from cnnexplain.explain.saliency.gradients import SmoothGrad

        SmoothGrad.base_method(smoothgrad_base)
    TargetSpec.parse(target)
    image_items = [p for item in (images or []) for p in str(item).split(",") if p.strip()]
    sources = [name for name, given in (("--dataset", dataset is not None),
                                        ("--images", bool(image_items)),
                                        ("--inputs", inputs is not None)) if given]
    if len(sources) > 1:
        raise UsageError(f"{' and '.join(sources)} exclude each other",
                         "pass one input source: --dataset, --images or --inputs")
    if evaluate and sources and sources[0] != "--dataset":
        raise UsageError(f"--evaluate needs ground-truth boxes or masks, and {sources[0]} has none",
                         "evaluate on --dataset synthetic[...] (masks and boxes), or drop --evaluate")
    run = start_run("saliency", values)

    # -- model and inputs ---------------------------------------------------------------------
    spec = dataset or "synthetic"
    class_names = None
    if not sources or sources[0] == "--dataset":
        from cnnexplain.data.datasets import open_dataset
        from cnnexplain.data.preprocessing import Preprocessing

        probe = open_dataset(spec, split=split, preprocessing=Preprocessing(), limit=1, seed=seed)
        class_names = list(getattr(probe, "class_names", []) or []) or None
    loaded = load_model_for(run, num_classes=len(class_names) if class_names else None,
                            class_names=class_names)
    if inputs is not None:
        imageset = from_npy(inputs, min_size=1)
    elif image_items:
        imageset = from_images(image_items, loaded.preprocessing, run.progress)
    else:
        imageset = from_dataset(spec, split, loaded.preprocessing, limit=limit, seed=seed,
                                batch_size=max(batch_size, 32), progress=run.progress)
    plan = pipeline.plan(loaded, imageset, methods, target, layer, options, batch_size,
                         run.device, seed=seed, evaluate=evaluate, metrics=metric_names,
                         eval_options=eval_options, overlays=overlays)
    for note in plan.notices:
        run.notice(note)

    # -- compute, write, report ---------------------------------------------------------------
    outcome = pipeline.execute(plan, cache=run.cache, progress=run.progress)
    ev = outcome.evaluation
    if ev is not None and len(ev) and int(ev["pairs_with_truth"].iloc[0]) == 0:
        run.notice(f"no explained class is present in its image (--target {plan.target.text}), so "
                   "the pointing, energy and localization metrics are undefined; use --target "
                   "label")
    paths = pipeline.write_outputs(plan, outcome, run.out, progress=run.progress)
    run.print(_table(plan, outcome))
    run.finish(summary={**outcome.summary(), "layer": plan.layer, "target": plan.target.text,
                        "outputs": [str(p) for p in paths[:3]]},
               model=loaded, data=imageset.describe, results=paths)


COLUMNS = {"pointing_game": "point", "pointing_energy_50": "E50", "localization_error": "loc err",
           "deletion_auc": "del", "insertion_auc": "ins", "ablation_drop": "abl",
           "occlusion_spearman": "occ rho", "sanity_spearman_all": "sanity rho",
           "class_map_correlation": "AB rho"}
"""evaluation.csv column -> short table header (the CSV has every column)."""


def _table(plan, outcome) -> Table:
    ev = outcome.evaluation.set_index("method") if outcome.evaluation is not None else None
    cols = [c for c in COLUMNS if ev is not None and c in ev.columns]
    table = Table(title=f"saliency: {len(outcome.image_index)} pairs, target {plan.target.text}, "
                        f"layer {plan.layer}")
    table.add_column("method", no_wrap=True)
    table.add_column("ms/img", justify="right")
    table.add_column("cached")
    for c in cols:
        table.add_column(COLUMNS[c], justify="right")
    for r in outcome.results:
        row = [r.method, f"{r.ms_per_image:.1f}", "yes" if r.cached else "no"]
        for c in cols:
            v = ev.loc[r.method, c]
            row.append("-" if v != v else f"{v:.2f}")
        table.add_row(*row)
    return table
