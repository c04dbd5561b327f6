"""Headline metrics: one row per run for ``report/summary.csv`` and the terminal table."""

from __future__ import annotations

import math

import pandas as pd

from cnnexplain.report.collect import RunResults


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def headline(res: RunResults) -> dict:
    """run, model facts, final training figures, every entanglement metric, dissection counts,
    TCAV significance counts, and each saliency method's pointing-game accuracy (when found)."""
    m = res.model()
    row: dict = {"run": res.name, "path": str(res.path), "backbone": m.get("backbone"),
                 "method": m.get("method"), "layer": m.get("layer")}
    log = res.train_log
    if log is not None and len(log):
        last = log.iloc[-1]
        row["epochs"] = int(last["epoch"]) if "epoch" in log else len(log)
        for col in ("train_acc1", "val_acc1", "val_acc_gated", "gate_density"):
            if col in log:
                row[col] = _num(last[col])
        if "val_acc1" in log:
            row["best_val_acc1"] = _num(log["val_acc1"].max())
    ent = res.entanglement
    if ent is not None and {"metric", "value"} <= set(ent.columns):
        for _, r in ent.iterrows():
            row[str(r["metric"])] = _num(r["value"])
    d = res.dissect_summary
    if d is not None and {"category", "detector_units", "unique_concepts"} <= set(d.columns):
        allrows = d[d["category"].astype(str) == "all"]
        if len(allrows):
            last = allrows.iloc[-1]
            row["detector_units"] = _num(last["detector_units"])
            row["unique_concepts"] = _num(last["unique_concepts"])
    t = res.tcav
    if t is not None and "significant" in t:
        sig = t["significant"].astype(str).str.lower().isin(["true", "1", "yes"])
        row["tcav_tests"] = int(len(t))
        row["tcav_significant"] = int(sig.sum())
    s = res.saliency_eval
    if s is not None and "method" in s:
        col = next((c for c in s.columns if c.startswith("pointing") and "energy" not in c), None)
        if col is not None:
            for _, r in s.iterrows():
                row[f"{col}[{r['method']}]"] = _num(r[col])
    return row


def summary_frame(runs: list[RunResults]) -> pd.DataFrame:
    rows = [headline(r) for r in runs]
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return pd.DataFrame(rows, columns=cols)


def metric_matrix(runs: list[RunResults]) -> pd.DataFrame | None:
    """Entanglement metrics side by side: rows = metric, columns = runs (value ± std)."""
    frames = {}
    for r in runs:
        e = r.entanglement
        if e is not None and {"metric", "value"} <= set(e.columns):
            frames[r.name] = e.set_index("metric")["value"]
    if not frames:
        return None
    return pd.DataFrame(frames)
