"""``tcav``: how sensitive a class is to a human concept at a layer (TCAV, Kim et al. 2018,
with the interventional I+ / I- scores of Liang's CDCNN report), with the significance test
against random concept sets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cnnexplain.config.tcav import TcavOptions
from cnnexplain.errors import UsageError
from cnnexplain.jobs.base import Output, Session
from cnnexplain.jobs.resolve import Resolved, file_policy, resolve, resolve_classes

COMMAND = "tcav"


@dataclass
class Plan:
    options: TcavOptions
    resolved: Resolved
    inputs: object
    targets: list[tuple[int, str]]
    layers: list[str]
    concepts: list[str]
    config: object


def class_inputs(options: TcavOptions, resolved: Resolved):
    """The class-input images: ``class_images`` (every image, for every target), else the
    resolved split (its target-class images are used)."""
    from cnnexplain.data.datasets import concept_images

    folder = options.data.class_images
    if folder is None:
        return resolved.data
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"`class_images` {folder} is not a directory",
                         "pass a folder of images of the target class")
    folder = folder.resolve()  # the folder is named by the user: its own link is followed
    return concept_images(folder.parent, folder.name, resolved.preprocessing, options.data.limit,
                          file_policy(options.files))


def plan(options: TcavOptions, session: Session) -> Plan:
    """Load the model and the class inputs (the checkpoint's dataset by default), resolve the
    targets and layers, and list the concepts (nothing is computed)."""
    from cnnexplain.data.datasets import list_concept_folders
    from cnnexplain.explain.tcav.run import check_layers
    from cnnexplain.models.layers import parse_layers

    o = options
    from_split = o.data.class_images is None
    resolved = resolve(o.model, o.prep, o.data if from_split else None, device=session.device,
                       seed=session.seed, several_layers=True, files=file_policy(o.files))
    inputs = class_inputs(o, resolved)
    loaded = resolved.loaded
    names = loaded.class_names or list(getattr(inputs, "class_names", []) or [])
    targets = resolve_classes(o.targets(), names, loaded.num_classes)
    layers = parse_layers(o.model.layer) or [loaded.layer]
    check_layers(loaded.model, layers)
    concepts = o.concepts.names()
    if o.concepts.concepts_dir is not None and not concepts:
        concepts = list_concept_folders(o.concepts.concepts_dir,
                                        file_policy(o.files))["concepts"]
        if not concepts:
            raise UsageError(f"{o.concepts.concepts_dir} holds no concept folders (only "
                             "random_* ones)", "add a folder of images per concept")
    config = dataclasses.replace(o.tcav, seed=session.seed)
    return Plan(o, resolved, inputs, targets, layers, concepts, config)


def run(plan: Plan, session: Session):
    """Concept and random sets, CAVs and scores, and the statistics: ``(result, sets)``."""
    from cnnexplain.explain.tcav.concepts import broden_concept_sets, folder_concept_sets
    from cnnexplain.explain.tcav.run import run_tcav

    o, loaded = plan.options, plan.resolved.loaded
    prep = plan.resolved.preprocessing
    needed = plan.config.random_runs + 1
    if o.concepts.concepts_dir is not None:
        sets = folder_concept_sets(o.concepts.concepts_dir, plan.concepts, random_sets=needed,
                                   preprocessing=prep, per_set=o.concepts.images_per_set,
                                   files=file_policy(o.files))
    else:
        from cnnexplain.data.broden import BrodenDataset

        broden = BrodenDataset(o.concepts.broden, preprocessing=prep, files=file_policy(o.files))
        sets = broden_concept_sets(broden, plan.concepts, random_sets=needed,
                                   per_set=o.concepts.images_per_set or 50,
                                   min_coverage=o.concepts.min_coverage, seed=session.seed,
                                   cache=session.cache, batch_size=o.data.batch_size,
                                   workers=o.data.workers, progress=session.progress)
    result = run_tcav(loaded.model, plan.layers, sets.concepts, sets.randoms, plan.inputs,
                      plan.targets, model_fingerprint=loaded.fingerprint, preprocessing=prep,
                      config=plan.config, filter_by_label=o.data.class_images is None,
                      device=session.device, cache=session.cache, progress=session.progress,
                      batch_size=o.data.batch_size, workers=o.data.workers)
    from cnnexplain.explain.tcav.run import INPUT_INDEPENDENT

    flat = result.runs[result.runs["gradient_spread"] < INPUT_INDEPENDENT]
    for layer in dict.fromkeys(flat["layer"]):
        session.notice(f"at layer {layer} the class logit's gradient is the same for every "
                       "input (the layer feeds only pooling and a linear head), so each CAV's "
                       "TCAV score is 0 or 1 whatever the concept and says nothing about it; "
                       "use an earlier `layer`")
    return result, sets


def write(plan: Plan, computed, session: Session) -> Output:
    """tcav/tcav.csv, runs.csv and tcav.png."""
    from cnnexplain.explain.tcav.plot import plot_tcav
    from cnnexplain.io import write_csv

    result, sets = computed
    layout, config, loaded = session.layout, plan.config, plan.resolved.loaded
    write_csv(layout.tcav_table, result.table)
    write_csv(layout.tcav_runs, result.runs)
    plot_tcav(result.table, layout.tcav_plot,
              title=f"TCAV: {loaded.backbone} ({loaded.source}), {config.random_runs} runs")
    rows = result.table.to_dict(orient="records")
    summary = {"rows": rows, "n_tests": result.n_tests, "bonferroni": config.bonferroni,
               "alpha": config.alpha, "significance": config.significance,
               "intervention_inputs": config.intervention_inputs,
               "random_runs": config.random_runs,
               "concept_subsample": config.concept_subsample,
               "significant": [f"{r['concept']}|{r['class']}|{r['layer']}" for r in rows
                               if r["significant"]],
               "cache": result.stats, "concept_source": sets.info,
               "csv": str(layout.tcav_table), "plot": str(layout.tcav_plot)}
    return Output(summary=summary, paths=[layout.tcav_table, layout.tcav_runs, layout.tcav_plot],
                  model=loaded, data=plan.inputs, result=result)
