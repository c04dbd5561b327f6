"""``evaluate-entanglement``: how class-specific the channels of a layer are (ACC1/ACC2/ACC3
and MIS of seed 004, R0/R1 of seed 000, gate statistics), with CI bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cnnexplain.config.evaluate import EvaluateOptions
from cnnexplain.errors import CnnexplainError, UsageError, close_matches
from cnnexplain.jobs.base import Output, Session
from cnnexplain.jobs.resolve import Resolved, file_policy, resolve

COMMAND = "evaluate-entanglement"

def parse_bounds(values: list[str] | None, name: str, valid: tuple[str, ...]
                 ) -> list[tuple[str, float, str]]:
    """``["MIS=0.15", ...]`` -> ``[("MIS", 0.15, "MIS=0.15"), ...]`` (metric names
    case-insensitive, returned in their canonical spelling); ``name``: the option's field."""
    canon = {v.lower(): v for v in valid}
    out = []
    for text in values or []:
        metric, sep, num = str(text).partition("=")
        metric = metric.strip()
        if not sep or not metric:
            raise UsageError(f"`{name}` {text!r} is not NAME=VALUE", f"pass e.g. `{name}=MIS=0.15`")
        try:
            value = float(num)
        except ValueError:
            raise UsageError(f"`{name}` {text!r}: {num!r} is not a number",
                             f"pass e.g. `{name}={metric}=0.15`") from None
        if not math.isfinite(value):
            raise UsageError(f"`{name}` {text!r}: the bound must be finite",
                             f"pass e.g. `{name}={metric}=0.15`")
        if metric.lower() not in canon:
            raise UsageError(f"`{name}`: unknown metric {metric!r}{close_matches(metric, valid)}",
                             f"valid names: {', '.join(valid)}")
        out.append((canon[metric.lower()], value, f"{metric}={num.strip()}"))
    return out


@dataclass
class Plan:
    options: EvaluateOptions
    resolved: Resolved
    layer: str
    under: list[tuple[str, float, str]]
    over: list[tuple[str, float, str]]


def plan(options: EvaluateOptions, session: Session) -> Plan:
    """Validate the options and the bounds, load the model and open the split."""
    from cnnexplain.metrics.entanglement import METRICS, SCORE_METRICS
    from cnnexplain.models.layers import get_module

    m = options.metrics
    valid = METRICS if m.scores else tuple(x for x in METRICS if x not in SCORE_METRICS)
    under = parse_bounds(options.bounds.fail_under, "fail_under", METRICS)
    over = parse_bounds(options.bounds.fail_over, "fail_over", METRICS)
    for name, _, text in under + over:
        if name not in valid:
            raise UsageError(f"bound {text}: {name} is not computed with `scores=false`",
                             "drop `scores=false` or the bound")
    resolved = resolve(options.model, options.prep, options.data, device=session.device,
                       seed=session.seed, files=file_policy(options.files))
    layer = options.model.layer or resolved.layer
    get_module(resolved.loaded.model, layer)
    session.cache  # a cache directory that is a file fails here, before anything is computed
    return Plan(options, resolved, layer, under, over)


def run(plan: Plan, session: Session):
    """The :class:`~cnnexplain.explain.entanglement.EntanglementReport`."""
    from cnnexplain.explain.entanglement import evaluate_entanglement

    o = plan.options
    return evaluate_entanglement(plan.resolved.loaded, plan.resolved.data, layer=plan.layer,
                                 options=o.metrics, seed=session.seed,
                                 batch_size=o.data.batch_size, workers=o.data.workers,
                                 device=session.device, cache=session.cache,
                                 progress=session.progress)


def write(plan: Plan, report, session: Session) -> Output:
    """entanglement.csv, entanglement_per_class.csv (and features.h5); the bounds' verdict."""
    import pandas as pd

    from cnnexplain.io import write_csv

    layout = session.layout
    loaded, data = plan.resolved.loaded, plan.resolved.data
    paths = [layout.entanglement, layout.entanglement_per_class]
    frame = pd.DataFrame(report.rows, columns=["metric", "value", "std", "n", "note"])
    frame["n"] = frame["n"].astype("Int64")
    write_csv(paths[0], frame)
    write_csv(paths[1], pd.DataFrame(report.per_class))
    if report.ablation is not None:
        names = report.class_names or [str(c) for c in range(report.ablation.shape[0])]
        frame = pd.DataFrame(report.ablation.numpy(), columns=names)
        frame.insert(0, "removed_cluster", names)
        write_csv(layout.entanglement_ablation, frame)
        paths.append(layout.entanglement_ablation)
    if plan.options.metrics.save_features:
        paths.append(write_features(layout.features, report, loaded, data))
    headline = {k: report.value(k) for k in ("ACC1", "ACC2", "ACC3", "ACC2_det", "ACC3_det",
                                              "ACC2_R0", "ACC3_R0", "specificity", "MIS", "R0",
                                              "R1", "gate_density", "gate_peakedness")
                if report.value(k) is not None}
    violated = []  # (what, the option's field and value)
    for name, bound, text in plan.under:
        v = report.value(name)
        if v is not None and v < bound:
            violated.append((f"{name} {v:.3g} is under the bound {bound:g}", f"fail_under={text}"))
    for name, bound, text in plan.over:
        v = report.value(name)
        if v is not None and v > bound:
            violated.append((f"{name} {v:.3g} is over the bound {bound:g}", f"fail_over={text}"))
    summary = {**headline, "layer": report.layer, "gate_source": report.gate_source,
               "violations": [f"{what} ({where.replace('=', ' ', 1)})" for what, where in violated]}
    failure = CnnexplainError("; ".join(f"{what} (`{where}`)" for what, where in violated)) \
        if violated else None
    return Output(summary=summary, paths=paths, model=loaded, data=data, result=report,
                  failure=failure)


def write_features(path: Path, report, loaded, data) -> Path:
    """features.h5: the pooled features ``[N, K]`` and labels ``[N]`` MIS used (plain h5py)."""
    import h5py
    import numpy as np

    from cnnexplain.io import atomic_path

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            d = f.create_dataset("features", data=np.asarray(report.features, dtype=np.float32))
            d.attrs["description"] = (f"{report.pool}-pooled activations of layer {report.layer}, "
                                      "one row per image in dataset order")
            d.attrs["shape"] = "N x K"
            lab = f.create_dataset("labels", data=np.asarray(report.labels, dtype=np.int64))
            lab.attrs["description"] = "class index of each image"
            lab.attrs["shape"] = "N"
            f.attrs["layer"] = report.layer
            f.attrs["pool"] = report.pool
            f.attrs["model_fingerprint"] = loaded.fingerprint
            f.attrs["dataset"] = getattr(data, "spec", "")
            f.attrs["dataset_fingerprint"] = data.fingerprint()
            f.attrs["class_names"] = np.array([str(c) for c in (data.class_names or [])],
                                              dtype=h5py.string_dtype())
    return Path(path)
