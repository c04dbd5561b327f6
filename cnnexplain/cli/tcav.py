"""``cnnexplain tcav``: how sensitive a class is to a human concept at a layer (TCAV, Kim et al.
2018; seed 000 with its interventional I+ / I- scores), with the significance test against
random concept sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from cnnexplain.cli import options as O
from cnnexplain.cli.common import load_model_for, preprocessing_for, start_run
from cnnexplain.cli.main import app
from cnnexplain.errors import UsageError, close_matches

CONCEPTS = "Concepts"
TCAV_PANEL = "TCAV"
CONCEPT_SUBSAMPLE = 1.0  # TCAVConfig's default (kept here: the CLI imports torch lazily)

HELP = "\n\n".join([
    "Measure how sensitive a class is to a concept at one or more layers: Testing with Concept "
    "Activation Vectors (TCAV, Kim et al. 2018; seed 000), with seed 000's interventional "
    "scores I+ / I- and a significance test against random concept sets.",
    "[bold]Concepts[/]: --concepts DIR holds one folder of images per concept and random folders "
    "random_0, random_1, ... (`cnnexplain data synth --format concepts` writes one); or --broden "
    "PATH takes the images where each --concept is present (a whole-image label, or a pixel "
    "label covering at least --min-coverage) and draws the random sets, seeded, from the images "
    "where none of them is present.",
    "[bold]Class inputs[/]: the images of --dataset/--split (first --limit images) whose label is "
    "the --target class; or every image of --class-images DIR for every target.",
    "[bold]CAV[/]: a linear classifier on the layer's flattened activations, concept (+1) "
    "against one random set (-1): the sides are truncated to equal size (with "
    "--concept-subsample below 1, the concept side to a random share of its images), 0.33 is "
    "held out (stratified, seeded), and min alpha/2 |w|^2 + mean loss (hinge or logistic; "
    "tcav's SGDClassifier objective with alpha 0.01) is solved to convergence in torch; "
    "v = w/|w| points toward the concept; its balanced accuracy on the images it was not "
    "trained on (those of its two sets, and all other random sets) is reported.",
    "[bold]Scores[/] over the class inputs: sign count = fraction with S > 0, S = grad of the "
    "class logit w.r.t. the activation . v; magnitude = sum |S|[S>0] / sum |S| (captum's); "
    "I+ = fraction whose class probability rises when --step * v is added to the activation "
    "(--step-units norm: --step * |a| per input), I- = fraction whose probability falls when it "
    "is subtracted.",
    "[bold]Runs[/]: --random-runs N; run k trains each concept against random_k, and a baseline "
    "CAV of random_(k-1) against random_k, whose scores are the chart's random reference (needs "
    "random_0..random_N).",
    "[bold]Significance[/]: a concept is significant for a class at a layer when two tests both "
    "reject at --alpha, each p-value multiplied by the number of tests (concepts x classes x "
    "layers, capped at 1) unless --no-bonferroni. p (score test): the mean sign count differs "
    "from a random direction's, which is 0.5 by symmetry; a t-test on the probit scale whose "
    "variance is the runs' spread times r/(1-r) + 1/N, r being the share of the concept "
    "images each CAV is trained on, so that the images shared by all runs count as one sample "
    "(the references' t-test divides by N only and calls random image sets significant in about "
    "a third of trials). CAV p (CAV test): each run's CAV tells held-out concept images from "
    "held-out random images (one-sided Fisher exact test), and twice the median of the N "
    "p-values (valid however the runs depend on each other) says the concept is linearly "
    "present at the layer. Concept folders should have the random folders' class "
    "mix, as `cnnexplain data synth --format concepts` writes them.",
    "Activations, CAVs, gradients and scores are cached by content (model weights, images, "
    "preprocessing, options, seed), so a repeated run only reads them back. Outputs in "
    "--out/tcav: tcav.csv (one row per concept, class and layer), runs.csv (every CAV's "
    "scores), tcav.png (the paper's bar chart with the random baseline).",
])


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(p.strip() for p in str(v).split(",") if p.strip())
    return list(dict.fromkeys(out))


@app.command("tcav", help=HELP)
def tcav(
    checkpoint: O.Checkpoint = None,
    backbone: O.Backbone = None,
    num_classes: O.NumClasses = None,
    weights: O.Weights = None,
    layer: Annotated[Optional[str], typer.Option(
        "--layer", help="Layer(s), comma-separated (e.g. layer3,layer4). Default: the model's "
        "target layer.", rich_help_panel=O.MODEL, show_default=False)] = None,
    concepts_dir: Annotated[Optional[Path], typer.Option(
        "--concepts", help="Concept root: <DIR>/<concept>/ and <DIR>/random_<i>/ image folders.",
        rich_help_panel=CONCEPTS, show_default=False)] = None,
    broden: Annotated[Optional[Path], typer.Option(
        "--broden", help="A Broden-format directory (or the synthetic world's Broden export) to "
        "draw concept and random sets from.", rich_help_panel=CONCEPTS, show_default=False)] = None,
    concept: Annotated[Optional[list[str]], typer.Option(
        "--concept", help="Concept name(s), comma-separated or repeated. Default with "
        "--concepts: every concept folder.", rich_help_panel=CONCEPTS, show_default=False)] = None,
    images_per_set: Annotated[Optional[int], typer.Option(
        "--images-per-set", min=2, help="Images per concept / random set (folders: the first N; "
        "Broden: default 50, a seeded sample).", rich_help_panel=CONCEPTS,
        show_default=False)] = None,
    min_coverage: Annotated[float, typer.Option(
        "--min-coverage", help="Broden: share of an image's mask pixels a pixel concept must "
        "cover to count as present.", rich_help_panel=CONCEPTS)] = 0.005,
    target: Annotated[Optional[list[str]], typer.Option(
        "--target", help="Class (name or index), repeatable or comma-separated.",
        rich_help_panel=TCAV_PANEL, show_default=False)] = None,
    dataset: O.Dataset = "synthetic",
    split: Annotated[str, typer.Option(
        "--split", help="Split of --dataset whose target-class images are the class inputs.",
        rich_help_panel=O.DATA)] = "test",
    limit: O.Limit = None,
    class_images: Annotated[Optional[Path], typer.Option(
        "--class-images", help="A folder of images to use as the class inputs of every target "
        "(instead of --dataset).", rich_help_panel=O.DATA, show_default=False)] = None,
    resize: O.Resize = None,
    mean: O.Mean = None,
    std: O.Std = None,
    batch_size: O.BatchSize = 64,
    workers: O.Workers = 0,
    random_runs: Annotated[int, typer.Option(
        "--random-runs", help="N (>= 2): CAVs per concept, against random_1..random_N, and "
        "N baseline CAVs, random_(k-1) against random_k (needs N+1 random sets).",
        rich_help_panel=TCAV_PANEL)] = 10,
    concept_subsample: Annotated[float, typer.Option(
        "--concept-subsample", help="Share of its positive images (the concept's; for the "
        "baseline, the pseudo-concept's) each CAV draws at random, in (0, 1]. 1: the first "
        "images, as tcav; the held-out split already trains each run on another random 2/3.",
        rich_help_panel=TCAV_PANEL)] = CONCEPT_SUBSAMPLE,
    cav_loss: Annotated[str, typer.Option(
        "--cav-loss", help="hinge (tcav's SGDClassifier default) or logistic.",
        rich_help_panel=TCAV_PANEL)] = "hinge",
    cav_alpha: Annotated[float, typer.Option(
        "--cav-alpha", help="L2 regularization alpha of the CAV classifier.",
        rich_help_panel=TCAV_PANEL)] = 0.01,
    cav_max_iter: Annotated[int, typer.Option(
        "--cav-max-iter", help="Solver iterations at most.", rich_help_panel=TCAV_PANEL)] = 1000,
    cav_tol: Annotated[float, typer.Option(
        "--cav-tol", help="Solver tolerance (hinge: relative duality gap; logistic: gradient "
        "relative to its start).", rich_help_panel=TCAV_PANEL)] = 1e-3,
    step: Annotated[float, typer.Option(
        "--step", help="Step eps of I+ / I- (the CAV has unit norm).",
        rich_help_panel=TCAV_PANEL)] = 1.0,
    step_units: Annotated[str, typer.Option(
        "--step-units", help="absolute (a +- eps v, seed 000) or norm (a +- eps |a| v).",
        rich_help_panel=TCAV_PANEL)] = "absolute",
    alpha: Annotated[float, typer.Option(
        "--alpha", help="Significance level of both tests (after the Bonferroni factor).",
        rich_help_panel=TCAV_PANEL)] = 0.05,
    no_bonferroni: Annotated[bool, typer.Option(
        "--no-bonferroni", help="Do not multiply p-values by the number of tests.",
        rich_help_panel=TCAV_PANEL)] = False,
    out: O.Out = None, device: O.Device = "auto", seed: O.Seed = 0, quiet: O.Quiet = False,
    json_output: O.Json = False, recipe: O.Recipe = None, cache_dir: O.CacheDir = None,
    no_cache: O.NoCache = False,
):
    values = dict(locals())
    from cnnexplain.explain.tcav import CAVConfig, TCAVConfig

    config = TCAVConfig(random_runs=random_runs,
                        cav=CAVConfig(loss=cav_loss, alpha=cav_alpha, max_iter=cav_max_iter,
                                      tol=cav_tol),
                        concept_subsample=concept_subsample, step=step, step_units=step_units,
                        alpha=alpha, bonferroni=not no_bonferroni, seed=seed).validate()
    if (concepts_dir is None) == (broden is None):
        raise UsageError("pass exactly one source of concept images",
                         "use --concepts DIR (concept and random_<i> folders) or --broden PATH")
    concepts = _split(concept)
    if broden is not None and not concepts:
        raise UsageError("--broden needs the concepts to test", "pass --concept NAME[,NAME...]")
    targets = _split(target)
    if not targets:
        raise UsageError("no target class given", "pass --target CLASS (name or index)")
    if not 0.0 <= min_coverage <= 1.0:
        raise UsageError(f"--min-coverage must be in [0, 1], got {min_coverage}",
                         "pass e.g. --min-coverage 0.005")
    run = start_run("tcav", values)
    return _tcav(run, config, concepts, targets)


def resolve_targets(targets: list[str], class_names: list[str] | None,
                    num_classes: int) -> list[tuple[int, str]]:
    """``--target`` values (names or indices) -> [(index, name)]; a one-line UsageError with
    close matches for an unknown name or an index out of range."""
    names = list(class_names or [])
    out = []
    for t in targets:
        if t.lstrip("-").isdigit():
            i = int(t)
            if not 0 <= i < num_classes:
                raise UsageError(f"--target {t} is out of range: the model has {num_classes} "
                                 "classes", f"pass an index in 0..{num_classes - 1}"
                                 + (f" or a name ({', '.join(names[:8])})" if names else ""))
            out.append((i, names[i] if i < len(names) else str(i)))
        elif t in names:
            i = names.index(t)
            if i >= num_classes:
                raise UsageError(f"--target {t!r} is class {i}, but the model has {num_classes} "
                                 "classes", "check the model and the dataset belong together")
            out.append((i, t))
        else:
            known = ", ".join(names[:10]) if names else "none: pass an index"
            raise UsageError(f"unknown --target {t!r}{close_matches(t, names)}",
                             f"pass a class index or one of the class names ({known})")
    return list(dict.fromkeys(out))


def _tcav(run, config, concepts: list[str], targets: list[str]) -> int:
    from cnnexplain.data.datasets import concept_images, open_dataset
    from cnnexplain.explain.tcav import (
        broden_concept_sets, check_layers, folder_concept_sets, plot_tcav, run_tcav)
    from cnnexplain.io import write_csv
    from cnnexplain.models.layers import parse_layers

    o = run.opts
    if o.checkpoint is not None:
        loaded = load_model_for(run)
        prep = loaded.preprocessing
        inputs = _inputs(o, prep, run.seed, open_dataset, concept_images)
    else:
        prep = preprocessing_for(run)
        inputs = _inputs(o, prep, run.seed, open_dataset, concept_images)
        names = list(getattr(inputs, "class_names", []) or [])
        loaded = load_model_for(run, num_classes=len(names) or None,
                                class_names=names or None)
    class_names = loaded.class_names or list(getattr(inputs, "class_names", []) or [])
    resolved = resolve_targets(targets, class_names, loaded.num_classes)
    layers = parse_layers(o.layer) or [loaded.layer]
    check_layers(loaded.model, layers)  # before anything is computed or written
    runs_needed = config.random_runs + 1
    if o.concepts_dir is not None:
        if not concepts:
            from cnnexplain.data.datasets import list_concept_folders

            concepts = list_concept_folders(o.concepts_dir)["concepts"]
            if not concepts:
                raise UsageError(f"{o.concepts_dir} holds no concept folders (only random_* ones)",
                                 "add a folder of images per concept")
        sets = folder_concept_sets(o.concepts_dir, concepts, random_sets=runs_needed,
                                   preprocessing=prep, per_set=o.images_per_set)
    else:
        from cnnexplain.data.broden import BrodenDataset

        broden = BrodenDataset(o.broden, preprocessing=prep)
        sets = broden_concept_sets(broden, concepts, random_sets=runs_needed,
                                   per_set=o.images_per_set or 50, min_coverage=o.min_coverage,
                                   seed=run.seed, cache=run.cache, batch_size=o.batch_size,
                                   workers=o.workers, progress=run.progress)
    result = run_tcav(loaded.model, layers, sets.concepts, sets.randoms, inputs, resolved,
                      model_fingerprint=loaded.fingerprint, preprocessing=prep, config=config,
                      filter_by_label=o.class_images is None, device=run.device,
                      cache=run.cache, progress=run.progress, batch_size=o.batch_size,
                      workers=o.workers)
    folder = run.out / "tcav"
    csv_path, runs_path, png_path = folder / "tcav.csv", folder / "runs.csv", folder / "tcav.png"
    write_csv(csv_path, result.table)
    write_csv(runs_path, result.runs)
    plot_tcav(result.table, png_path,
              title=f"TCAV: {loaded.backbone} ({loaded.source}), {config.random_runs} runs")
    _print_table(run, result, config)
    rows = result.table.to_dict(orient="records")
    summary = {"rows": rows, "n_tests": result.n_tests, "bonferroni": config.bonferroni,
               "alpha": config.alpha, "random_runs": config.random_runs,
               "concept_subsample": config.concept_subsample,
               "significant": [f"{r['concept']}|{r['class']}|{r['layer']}" for r in rows
                               if r["significant"]],
               "cache": result.stats, "concept_source": sets.info,
               "csv": str(csv_path), "plot": str(png_path)}
    run.finish(summary=summary, model=loaded, data=inputs,
               results=[csv_path, runs_path, png_path])
    return 0


def _inputs(o, prep, seed, open_dataset, concept_images):
    """The class-input images: --class-images DIR, else --dataset/--split/--limit."""
    if o.class_images is not None:
        folder = Path(o.class_images).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--class-images {folder} is not a directory",
                             "pass a folder of images of the target class")
        return concept_images(folder.parent, folder.name, prep, o.limit)
    return open_dataset(o.dataset, o.split, prep, limit=o.limit, seed=seed)


def _print_table(run, result, config) -> None:
    correction = (f"Bonferroni-corrected over {result.n_tests} tests" if config.bonferroni
                  else "uncorrected")
    table = Table(title=f"TCAV ({config.random_runs} runs; p and CAV p {correction}; "
                        f"significant when both < {config.alpha:g})")
    for col in ("concept", "class", "layer", "TCAV score", "random", "magnitude", "I+", "I-",
                "CAV acc", "p", "CAV p", "significant"):
        table.add_column(col, justify="left" if col in ("concept", "class", "layer") else "right")
    for r in result.table.to_dict(orient="records"):
        table.add_row(escape(str(r["concept"])), escape(str(r["class"])), escape(str(r["layer"])),
                      f"{r['score_mean']:.3f} ± {r['score_std']:.3f}",
                      f"{r['random_score_mean']:.3f} ± {r['random_score_std']:.3f}",
                      f"{r['magnitude']:.3f}", f"{r['i_plus']:.3f}", f"{r['i_minus']:.3f}",
                      f"{r['cav_accuracy']:.3f}", f"{r['p_value']:.3g}",
                      f"{r['cav_p_value']:.3g}",
                      "[green]yes[/]" if r["significant"] else "no")
    run.print(table)
