"""What a user should see in each section of the report, and whether it was seen: one line per
check, from the files of the run directories alone (known answers of the synthetic world come
from the world spec the runs recorded)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from cnnexplain.report.collect import RunResults

LEARNED = 0.9
"""Validation ACC1 a model must reach before its explanations are shown as findings."""
POINTING = 0.8
"""Grad-CAM's pointing game on a model that learned the synthetic world (its objects are large,
so the random-point baseline is high too: the margin over it is what counts)."""
POINTING_MARGIN = 0.2
DETECTOR_IOU = 0.2
"""IoU at which a unit counts as a detector of a shape class in the verdict (Bau et al. 2017
call a unit a detector at 0.04; a shape detector worth showing overlaps its objects far more)."""
MIS_GAIN = 0.05
"""nats of MIS a gated run should gain over std on the same data."""


@dataclass
class Verdict:
    """``expect``: what the user should see; ``seen``: True / False, or None when the runs
    hold too little to judge; ``detail``: the measured figures."""

    section: str
    run: str
    expect: str
    seen: bool | None
    detail: str

    @property
    def mark(self) -> str:
        return {True: "seen", False: "NOT seen", None: "not judged"}[self.seen]


def _f(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def _metric(run: RunResults, name: str) -> float | None:
    e = run.entanglement
    if e is None or "metric" not in e:
        return None
    hit = e[e["metric"] == name]
    return _f(hit["value"].iloc[0]) if len(hit) else None


def world_spec(run: RunResults) -> str | None:
    """The synthetic world spec the run's commands recorded (None for other data)."""
    for cmd in (run.manifest.get("commands") or {}).values():
        data = cmd.get("data") or {}
        spec = data.get("spec") if isinstance(data, dict) else None
        if isinstance(spec, str) and spec.startswith("synthetic"):
            return spec
    return None


def planted(run: RunResults) -> list[tuple[str, str]]:
    """(concept, class) pairs planted by the run's world (``correlate=CONCEPT@CLASS=s``)."""
    spec = world_spec(run)
    if not spec:
        return []
    try:
        from cnnexplain.data.synthetic import WorldConfig

        return [(c, k) for c, k, s in WorldConfig.from_spec(spec).correlations if s >= 0.5]
    except Exception:  # noqa: BLE001 - a spec this version cannot read: nothing to judge
        return []


def _classes(run: RunResults) -> list[str]:
    for cmd in (run.manifest.get("commands") or {}).values():
        data = cmd.get("data") or {}
        names = data.get("class_names") if isinstance(data, dict) else None
        if names:
            return [str(n) for n in names]
    return []


def training(run: RunResults) -> Verdict | None:
    log = run.train_log
    if log is None or "val_acc1" not in log or not len(log):
        return None
    acc = _f(log["val_acc1"].max())
    n = len(_classes(run)) or (run.model().get("num_classes") or 0)
    chance = f", chance {1 / n:.2f}" if n else ""
    seen = None if acc is None else acc >= LEARNED
    return Verdict("training", run.name, f"the model learned the task (best val ACC1 >= "
                   f"{LEARNED}); explanations of a model that did not are not findings",
                   seen, f"best val ACC1 {acc:.3f}{chance}" if acc is not None else "no val ACC1")


def entanglement(runs: list[RunResults]) -> list[Verdict]:
    std = next((r for r in runs if r.model().get("method") == "std" and r.entanglement is not None),
               None)
    out = []
    for r in runs:
        if r is std or r.entanglement is None or r.model().get("method") in (None, "std"):
            continue
        if std is None:
            out.append(Verdict("entanglement", r.name, "a gated run is more class-specific than "
                               "std", None, "no std run to compare with"))
            continue
        mis, mis0 = _metric(r, "MIS"), _metric(std, "MIS")
        acc3, acc30 = _metric(r, "ACC3"), _metric(std, "ACC3")
        sp, sp0 = _metric(r, "specificity"), _metric(std, "specificity")
        parts = [(mis is not None and mis0 is not None and mis >= mis0 + MIS_GAIN,
                  f"MIS {mis:.3f} vs std {mis0:.3f}" if mis is not None and mis0 is not None
                  else "MIS missing"),
                 (acc3 is not None and acc30 is not None and acc3 <= acc30 / 2,
                  f"ACC3 {acc3:.3f} vs std {acc30:.3f}" if acc3 is not None and acc30 is not None
                  else "ACC3 missing"),
                 (sp is not None and sp0 is not None and sp > sp0,
                  f"specificity {sp:.3f} vs std {sp0:.3f}" if sp is not None and sp0 is not None
                  else "specificity missing")]
        out.append(Verdict("entanglement", r.name, f"more class-specific than std: MIS at least "
                           f"{MIS_GAIN} nats higher, ACC3 at most half of std's, specificity "
                           "higher", all(ok for ok, _ in parts),
                           "; ".join(text for _, text in parts)))
    return out


def saliency(run: RunResults) -> Verdict | None:
    ev = run.saliency_eval
    if ev is None or "method" not in ev or "pointing_game" not in ev:
        return None
    rows = ev.set_index("method")
    if "gradcam" not in rows.index:
        return None
    pg = _f(rows.loc["gradcam", "pointing_game"])
    base = _f(rows.loc["gradcam", "pointing_game_random"]) if "pointing_game_random" in rows \
        else None
    if pg is None:
        return Verdict("saliency", run.name, "Grad-CAM points at the explained object", None,
                       "no pointing game (no ground truth for the explained classes)")
    need = max(POINTING, (base or 0.0) + POINTING_MARGIN)
    others = ", ".join(f"{m} {_f(v):.2f}" for m, v in rows["pointing_game"].items()
                       if m != "gradcam" and _f(v) is not None)
    return Verdict("saliency", run.name, f"Grad-CAM's maximum lies on the explained object "
                   f"(pointing game >= {need:.2f}, the random-point baseline + "
                   f"{POINTING_MARGIN} or {POINTING})", pg >= need,
                   f"Grad-CAM {pg:.2f}, random point {base:.2f}" if base is not None else
                   f"Grad-CAM {pg:.2f}" + (f"; {others}" if others else ""))


def dissection(run: RunResults) -> list[Verdict]:
    t = run.dissect_tally
    if t is None or "object-label" not in t or "object-iou" not in t:
        return []
    classes = _classes(run)
    out = []
    if classes:
        found = {c: float(t.loc[t["object-label"] == c, "object-iou"].max())
                 for c in classes if (t["object-label"] == c).any()}
        hits = [c for c, v in found.items() if v >= DETECTOR_IOU]
        need = math.ceil(len(classes) / 2)
        best = ", ".join(f"{c} {found.get(c, 0.0):.2f}" for c in classes)
        out.append(Verdict("dissection", run.name, f"most shape classes ({need} of "
                           f"{len(classes)}) have an object detector at the last layer (best "
                           f"object IoU >= {DETECTOR_IOU})", len(hits) >= need,
                           f"{len(hits)} of {len(classes)}: {best}"))
    colors = [c for c, _ in planted(run) if c.endswith("-c")]
    if colors and "color-label" in t and "color-iou" in t:
        found = {c: float(t.loc[t["color-label"] == c, "color-iou"].max())
                 for c in colors if (t["color-label"] == c).any()}
        out.append(Verdict("dissection", run.name, "the planted colour correlates have colour "
                           "detectors (IoU > 0.04, Bau et al. 2017)",
                           all(found.get(c, 0.0) > 0.04 for c in colors),
                           ", ".join(f"{c} {found.get(c, 0.0):.2f}" for c in colors)))
    return out


def tcav(run: RunResults) -> Verdict | None:
    t = run.tcav
    if t is None or not {"concept", "class", "significant"} <= set(t.columns):
        return None
    plant = set(planted(run))
    if not plant:
        return None
    sig = t["significant"].astype(str).str.lower().isin(["true", "1", "yes"])
    rows = list(zip(t["concept"].astype(str), t["class"].astype(str), sig))
    tested = [(c, k) for c, k, _ in rows if (c, k) in plant]
    if not tested:
        return None
    right = [s == ((c, k) in plant) for c, k, s in rows]
    detail = "; ".join(f"{c}@{k}: {'significant' if s else 'not significant'}"
                       f"{' (planted)' if (c, k) in plant else ''}" for c, k, s in rows)
    return Verdict("tcav", run.name, "TCAV calls the planted concept-class correlation "
                   "significant and the unrelated concepts not", all(right), detail)


def verdicts(runs: list[RunResults]) -> list[Verdict]:
    """Every check the runs allow, in report order."""
    out: list[Verdict] = []
    out += [v for v in (training(r) for r in runs) if v is not None]
    out += entanglement(runs)
    out += [v for v in (saliency(r) for r in runs) if v is not None]
    for r in runs:
        out += dissection(r)
    out += [v for v in (tcav(r) for r in runs) if v is not None]
    return out


def frame(items: list[Verdict]) -> pd.DataFrame:
    return pd.DataFrame([{"section": v.section, "run": v.run, "expected": v.expect,
                          "seen": v.mark, "measured": v.detail} for v in items],
                        columns=["section", "run", "expected", "seen", "measured"])
