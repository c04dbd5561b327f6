"""Each benchmark's headline ratios beside their targets: one function per benchmark, taking its
frame and returning ``(measure, value, target, met)`` rows, ``met`` None where the frame has no
value (a peer not installed). ``python -m benchmarks`` prints them after the benchmarks ran.

Targets come from the issues that asked for them and the seeds (train-gated's 5% overhead:
Liang et al. 2020); none is asserted anywhere: on a shared machine only same-run ratios mean
something, so they are read, not tested.
"""

from __future__ import annotations

import math
from typing import Callable

import pandas as pd

Row = tuple[str, float, str, "bool | None"]
TARGETS: dict[str, Callable[[pd.DataFrame], list[Row]]] = {}


def _target(name: str):
    def register(fn):
        TARGETS[name] = fn
        return fn
    return register


def _row(measure: str, value, target: str, ok: Callable[[float], bool]) -> Row:
    value = float(value)
    return (measure, value, target, None if math.isnan(value) else bool(ok(value)))


def _measurement(frame: pd.DataFrame, starts: str) -> float:
    hit = frame[frame["measurement"].str.startswith(starts)]
    return float(hit["value"].iloc[0]) if len(hit) else float("nan")


@_target("saliency")
def _saliency(frame):
    rows = []
    for _, r in frame.iterrows():
        if isinstance(r["fastest_peer"], str) and r["fastest_peer"] not in ("none", "-"):
            spread = ""
            if "round_ratio_min" in r:
                spread = f" (rounds {r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f})"
            rows.append(_row(f"{r['method']}: ours / {r['fastest_peer']}{spread}",
                             r["ours_over_peer"], "<= 1", lambda v: v <= 1.0))
    return rows


@_target("dissect")
def _dissect(frame):
    return [
        _row("dissect / forward that reads the images",
             _measurement(frame, "dissect / forward-with-reading"), ">= 0.9", lambda v: v >= 0.9),
        _row("tally: per-unit loop / vectorized", _measurement(frame, "tally speed-up"),
             ">= 20", lambda v: v >= 20),
    ]


@_target("dissect_scale")
def _dissect_scale(frame):
    rows = [_row(f"{int(r['images'])} images x {int(r['labels'])} labels: dissect / forward",
                 r["dissect_over_forward"], ">= 0.9", lambda v: v >= 0.9)
            for _, r in frame.iterrows()]
    if "tally_loop_over_vectorized" in frame:
        rows.append(_row(f"tally at {int(frame['labels'].iloc[0])} labels: per-unit loop / "
                         "vectorized", frame["tally_loop_over_vectorized"].iloc[0], ">= 20",
                         lambda v: v >= 20))
    per_k = frame["dissect_s_per_1000_images"]
    rows.append(_row("s per 1,000 images, largest / smallest run (linear in images)",
                     per_k.iloc[-1] / per_k.iloc[0], "<= 1.1", lambda v: v <= 1.1))
    rows.append(_row("peak RSS, largest / smallest run (flat)", frame["rss_over_smallest"].iloc[-1],
                     "<= 1.1", lambda v: v <= 1.1))
    return rows


@_target("cache")
def _cache(frame):
    shipped = frame[frame["storage"].str.startswith("cache as shipped")]
    return [_row(f"{r['workload']}: cache write / CPU forward", r["write_over_forward"],
                 "<= 0.10", lambda v: v <= 0.10) for _, r in shipped.iterrows()]


@_target("tcav")
def _tcav(frame):
    return [
        _row("warm / cold run speed-up", _measurement(frame, "cold / warm"), ">= 10",
             lambda v: v >= 10),
        _row("CAV solver: SGDClassifier time / ours", _measurement(frame, "speed: SGDClassifier"),
             ">= 1", lambda v: v >= 1),
        _row("cosine(ours, exact optimum), min",
             _measurement(frame, "cosine(ours, exact LinearSVC optimum)"), ">= 0.999",
             lambda v: v >= 0.999),
    ]


@_target("train")
def _train(frame):
    return [_row(f"{r['method']}: epoch time / std's", r["ratio_to_std"], "<= 1.05",
                 lambda v: v <= 1.05) for _, r in frame.iterrows() if r["method"] != "std"]


@_target("mis")
def _mis(frame):
    rows = []
    for _, r in frame.iterrows():
        rows.append(_row(f"MIS ({r['device']}): scikit-learn time / ours", r["speedup"], ">= 20",
                         lambda v: v >= 20))
        rows.append(_row(f"MIS ({r['device']}): max |difference| (nats)",
                         r["max_abs_diff_nats"], "< 0.01", lambda v: v < 0.01))
    return rows


@_target("evaluation")
def _evaluation(frame):
    total = frame[frame["metric"].str.startswith("default set")]
    rows = [_row("default metric set: Quantus time / ours", total["speedup"].iloc[0], ">= 10",
                 lambda v: v >= 10)]
    if "quantus_over_floor" in total:  # the most any implementation could gain on this CPU
        rows.append(("default metric set: Quantus time / its forward passes alone",
                     float(total["quantus_over_floor"].iloc[0]), "-", None))
    return rows


@_target("data")
def _data(frame):
    return [_row("Broden reading / forward throughput", _measurement(frame, "read / forward"),
                 "> 1", lambda v: v > 1)]


@_target("visualize")
def _visualize(frame):
    ours = frame[frame["implementation"] == "ours (batched)"].iloc[0]
    return [
        _row("objective / lucent's", ours["objective_vs_lucent"], ">= 1", lambda v: v >= 1),
        _row("lucent's time / ours (batched)", ours["lucent_time_over_ours"], ">= 1",
             lambda v: v >= 1),
    ]


@_target("gpu")
def _gpu(frame):
    """The rows with a target (the frame carries them, per part), or one "not measured" row
    per part without a device."""
    return [(f"{r['part']}: {r['measure']}" + (f" ({r['note']})" if r["note"] else ""),
             float(r["value"]), r["target"] or "-", None if pd.isna(r["met"]) else bool(r["met"]))
            for _, r in frame.iterrows() if r["target"] or r["measure"] == "not measured"]


def targets(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """The ``(benchmark, measure, value, target, met)`` rows of one benchmark's frame."""
    fn = TARGETS.get(name)
    rows = fn(frame) if fn else []
    return pd.DataFrame([(name, *r) for r in rows],
                        columns=["benchmark", "measure", "value", "target", "met"])
