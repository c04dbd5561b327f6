"""``cnnexplain evaluate-entanglement``: how class-specific the channels of a layer are
(ACC1/ACC2/ACC3 and MIS of seed 004, R0/R1 of seed 000, gate statistics), with CI bounds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.table import Table

from cnnexplain.cli import options as O
from cnnexplain.cli.common import load_model_for, preprocessing_for, start_run
from cnnexplain.cli.main import app
from cnnexplain.errors import CnnexplainError, UsageError

METRICS_PANEL = "Metrics"
GATES_PANEL = "CI gates"

HELP = """Measure channel-class entanglement at a layer, to compare a gated model with a
standard one and to gate it in CI.

[bold]ACC1[/] full pathway; [bold]ACC2[/] only the class-specific cluster of the predicted class;
[bold]ACC3[/] all channels but the true class's cluster (seed 004). ACC2/ACC3 are the paper's
single stochastic draw (pseudo-label ỹ ~ softmax, mask z ~ Ber(P[ỹ])) averaged over --draws with
their standard deviation, and ACC2_det/ACC3_det the deterministic variants (argmax, membership >
threshold). [bold]MIS[/]: mean over channels of the max over classes of the k-NN (k = 3)
mutual information between the pooled activation and the one-vs-rest class, in nats, as
scikit-learn's mutual_info_classif computes it (vectorized in torch). [bold]R0/R1[/] (seed 000):
with the network frozen, the cross-entropy of the gated pathway under the best one-hot W (R0) or
binary sparse W (R1, + mu·density); lower = more disentangled.

A checkpoint's learned gate (W or P) defines the clusters; a model without one (std, any
torchvision weights) gets them from R0's one-hot solution, so the numbers are comparable.
checkpoint.pt (last epoch) and best.pt (best validation epoch) of train-gated both work.

Features come from the HDF5 cache (a second evaluation does not run the network again); R0/R1
solutions too. Writes entanglement.csv, entanglement_per_class.csv and run.json in --out
(features.h5 with --save-features). --fail-under / --fail-over turn a metric into a CI gate:
exit code 1 and one line naming the violated bound."""


def parse_bounds(values: list[str] | None, option: str, valid: tuple[str, ...]) -> list[tuple[str, float, str]]:
    """``["MIS=0.15", ...]`` -> ``[("MIS", 0.15, "MIS=0.15"), ...]`` (names case-insensitive,
    returned in their canonical spelling)."""
    canon = {v.lower(): v for v in valid}
    out = []
    for text in values or []:
        name, sep, num = str(text).partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"{option} {text!r} is not NAME=VALUE", f"pass e.g. {option} MIS=0.15")
        try:
            value = float(num)
        except ValueError:
            raise UsageError(f"{option} {text!r}: {num!r} is not a number",
                             f"pass e.g. {option} {name}=0.15") from None
        if not math.isfinite(value):
            raise UsageError(f"{option} {text!r}: the bound must be finite", f"pass e.g. {option} {name}=0.15")
        if name.lower() not in canon:
            from cnnexplain.errors import close_matches

            raise UsageError(f"{option}: unknown metric {name!r}{close_matches(name, valid)}",
                             f"valid names: {', '.join(valid)}")
        out.append((canon[name.lower()], value, f"{name}={num.strip()}"))
    return out


@app.command("evaluate-entanglement", help=HELP)
def evaluate_entanglement(
    checkpoint: O.Checkpoint = None,
    backbone: O.Backbone = None,
    num_classes: O.NumClasses = None,
    weights: O.Weights = None,
    layer: Annotated[Optional[str], typer.Option(
        "--layer", help="Dotted module name (default: the checkpoint's gated layer, else the "
        "backbone's last conv block).", rich_help_panel=O.MODEL, show_default=False)] = None,
    dataset: O.Dataset = "synthetic",
    split: Annotated[str, typer.Option(
        "--split", help="train, val or test (val is carved from train with --seed and "
        "--val-fraction where the dataset has none).", rich_help_panel=O.DATA)] = "test",
    val_fraction: Annotated[float, typer.Option(
        "--val-fraction", help="Share of train carved as val where the dataset has no val split "
        "(use the value train-gated used).", rich_help_panel=O.DATA)] = 0.1,
    resize: O.Resize = None,
    mean: O.Mean = None,
    std: O.Std = None,
    limit: O.Limit = None,
    batch_size: O.BatchSize = 64,
    workers: O.Workers = 0,
    pool: Annotated[str, typer.Option(
        "--pool", help="Pooling over space of the features MIS uses: mean (CSG) or sum (PICNN).",
        rich_help_panel=METRICS_PANEL)] = "mean",
    draws: Annotated[int, typer.Option(
        "--draws", min=0, help="Stochastic draws averaged for ACC2/ACC3 (seed 004's single draw "
        "varies by 0.01-0.02 on its own).", rich_help_panel=METRICS_PANEL)] = 10,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", help="Membership above which a channel is in a class's cluster (default: "
        "the checkpoint's, else 0.5).", rich_help_panel=METRICS_PANEL, show_default=False)] = None,
    scores: Annotated[bool, typer.Option(
        "--scores/--no-scores", help="Compute R0 and R1 (seed 000).",
        rich_help_panel=METRICS_PANEL)] = True,
    score_steps: Annotated[int, typer.Option(
        "--score-steps", min=1, help="Optimization steps for R0/R1's W (and the post-hoc gate).",
        rich_help_panel=METRICS_PANEL)] = 300,
    score_lr: Annotated[float, typer.Option(
        "--score-lr", help="Adam learning rate for R0/R1's W.", rich_help_panel=METRICS_PANEL)] = 0.1,
    mu: Annotated[float, typer.Option(
        "--mu", help="R1's sparsity weight μ (on ||W||_0 / (K·C)).",
        rich_help_panel=METRICS_PANEL)] = 0.5,
    save_features: Annotated[bool, typer.Option(
        "--save-features", help="Also write features.h5 (datasets features [N, K] pooled, labels [N]).",
        rich_help_panel=METRICS_PANEL)] = False,
    fail_under: Annotated[Optional[List[str]], typer.Option(
        "--fail-under", help="NAME=VALUE (repeatable): exit 1 when the metric is under VALUE, "
        "e.g. MIS=0.15.", rich_help_panel=GATES_PANEL, show_default=False)] = None,
    fail_over: Annotated[Optional[List[str]], typer.Option(
        "--fail-over", help="NAME=VALUE (repeatable): exit 1 when the metric is over VALUE, "
        "e.g. ACC3=0.4.", rich_help_panel=GATES_PANEL, show_default=False)] = None,
    out: O.Out = None, device: O.Device = "auto", seed: O.Seed = 0, quiet: O.Quiet = False,
    json_output: O.Json = False, recipe: O.Recipe = None, cache_dir: O.CacheDir = None,
    no_cache: O.NoCache = False,
):
    values = dict(locals())
    from cnnexplain.metrics.entanglement import METRICS, SCORE_METRICS

    valid = METRICS if scores else tuple(m for m in METRICS if m not in SCORE_METRICS)
    under = parse_bounds(fail_under, "--fail-under", METRICS)
    over = parse_bounds(fail_over, "--fail-over", METRICS)
    for name, _, text in under + over:
        if name not in valid:
            raise UsageError(f"bound {text}: {name} is not computed with --no-scores",
                             "drop --no-scores or the bound")
    if pool not in ("mean", "sum"):
        raise UsageError(f"--pool must be mean or sum, got {pool!r}", "pass --pool mean or --pool sum")
    if threshold is not None and not 0 < threshold < 1:
        raise UsageError(f"--threshold must be in (0, 1), got {threshold}", "pass e.g. --threshold 0.5")
    if not 0 < val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1), got {val_fraction}",
                         "pass e.g. --val-fraction 0.1")
    if checkpoint is None and backbone is None:
        raise UsageError("no model given", "pass --checkpoint PATH or --backbone NAME")
    run = start_run("evaluate-entanglement", values)
    return _evaluate(run, under, over)


def _evaluate(run, under, over) -> int:
    from cnnexplain.data.datasets import open_dataset
    from cnnexplain.metrics.entanglement import evaluate_entanglement as evaluate
    from cnnexplain.models.layers import get_module

    o = run.opts
    if o.checkpoint is not None:
        loaded = load_model_for(run)
        data = open_dataset(o.dataset, o.split, loaded.preprocessing, limit=o.limit, seed=run.seed,
                            val_fraction=o.val_fraction)
    else:
        prep = preprocessing_for(run)
        data = open_dataset(o.dataset, o.split, prep, limit=o.limit, seed=run.seed,
                            val_fraction=o.val_fraction)
        loaded = load_model_for(run, num_classes=len(data.class_names), class_names=data.class_names)
        loaded.preprocessing = prep
    layer = o.layer or loaded.layer
    get_module(loaded.model, layer)
    run.cache  # a cache directory that is a file fails here, before anything is computed
    report = evaluate(loaded, data, layer=layer, pool=o.pool, draws=o.draws, threshold=o.threshold,
                      scores=o.scores, score_steps=o.score_steps, score_lr=o.score_lr, mu=o.mu,
                      seed=run.seed, batch_size=o.batch_size, workers=o.workers,
                      device=run.device, cache=run.cache, progress=run.progress)
    results = _write(run, report, loaded, data)
    _render(run, report, loaded, layer)
    headline = {k: report.value(k) for k in ("ACC1", "ACC2", "ACC3", "ACC2_det", "ACC3_det", "MIS",
                                              "R0", "R1", "gate_density", "gate_peakedness")
                if report.value(k) is not None}
    violations = []
    for name, bound, text in under:
        v = report.value(name)
        if v is not None and v < bound:
            violations.append(f"{name} {v:.3g} is under the bound {bound:g} (--fail-under {text})")
    for name, bound, text in over:
        v = report.value(name)
        if v is not None and v > bound:
            violations.append(f"{name} {v:.3g} is over the bound {bound:g} (--fail-over {text})")
    run.finish(summary={**headline, "layer": report.layer, "gate_source": report.gate_source,
                        "violations": violations},
               model=loaded, data=data, results=results)
    if violations:
        raise CnnexplainError("; ".join(violations))
    return 0


def _write(run, report, loaded, data) -> list[Path]:
    import h5py
    import numpy as np
    import pandas as pd

    from cnnexplain.io import atomic_path, write_csv

    out = run.out
    paths = [out / "entanglement.csv", out / "entanglement_per_class.csv"]
    frame = pd.DataFrame(report.rows, columns=["metric", "value", "std", "n", "note"])
    frame["n"] = frame["n"].astype("Int64")
    write_csv(paths[0], frame)
    write_csv(paths[1], pd.DataFrame(report.per_class))
    if run.opts.save_features:
        path = out / "features.h5"
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                d = f.create_dataset("features", data=np.asarray(report.features, dtype=np.float32))
                d.attrs["description"] = (f"{report.pool}-pooled activations of layer {report.layer}, "
                                          "one row per image in dataset order")
                d.attrs["shape"] = "N x K"
                l = f.create_dataset("labels", data=np.asarray(report.labels, dtype=np.int64))
                l.attrs["description"] = "class index of each image"
                l.attrs["shape"] = "N"
                f.attrs["layer"] = report.layer
                f.attrs["pool"] = report.pool
                f.attrs["model_fingerprint"] = loaded.fingerprint
                f.attrs["dataset"] = getattr(data, "spec", "")
                f.attrs["dataset_fingerprint"] = data.fingerprint()
                f.attrs["class_names"] = np.array([str(c) for c in (data.class_names or [])],
                                                  dtype=h5py.string_dtype())
        paths.append(path)
    return paths


def _render(run, report, loaded, layer: str) -> None:
    table = Table(title=f"entanglement of {loaded.backbone} ({loaded.method}) at {layer}; "
                        f"clusters: {report.gate_source}")
    for col in ("metric", "value", "std", "note"):
        table.add_column(col, overflow="fold")
    for r in report.rows:
        std = "" if r["std"] is None else f"{r['std']:.3f}"
        table.add_row(r["metric"], f"{r['value']:.4g}", std, r.get("detail", ""))
    run.print(table)
    pc = Table(title="per class")
    cols = ["name", "n", "acc1", "acc2", "acc3", "cluster_channels", "mi_max"]
    for col in cols:
        pc.add_column(col)
    for r in report.per_class:
        pc.add_row(*[f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
    run.print(pc)
