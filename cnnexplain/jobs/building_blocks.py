"""Seed 001's "building blocks" view (Olah et al. 2018, The Building Blocks of
Interpretability): a unit's Network Dissection label beside its feature visualization and its
dataset examples. ``dissect`` and ``visualize`` each write their own section of a run
directory; these joins read the other section, only when it was made from the same model (its
fingerprint in run.json) at the same layer, so a stale or foreign section is never shown."""

from __future__ import annotations

from pathlib import Path


def _entry(layout, command: str, fingerprint: str) -> dict:
    """run.json's record of ``command`` in the run directory if it used the model with
    ``fingerprint``, else ``{}``."""
    from cnnexplain.runs import read_manifest

    try:
        entry = read_manifest(layout.root).get("commands", {}).get(command) or {}
    except Exception:  # an unreadable run.json: nothing to join (the command still works)
        return {}
    return entry if (entry.get("model") or {}).get("fingerprint") == fingerprint else {}


def dissection_labels(layout, layer: str, fingerprint: str) -> dict[int, tuple[str, str, float]]:
    """``{channel (0-based): (label, category, IoU)}`` from the ``dissect`` run recorded in the
    run directory, if it dissected ``layer`` of the model with ``fingerprint`` (a tally of
    another model or layer is never joined); empty when there is none. Seed 001's "building
    blocks" view: a unit's label beside its visualization and its examples."""
    import pandas as pd

    entry = _entry(layout, "dissect", fingerprint)
    layers = list(((entry.get("summary") or {}).get("layers") or {}))
    if layer not in layers:
        return {}
    path = layout.dissect_tally(layer)
    if not path.exists() and layers[-1] == layer:
        path = layout.dissect_tally()
    if not path.exists():
        return {}
    frame = pd.read_csv(path)
    return {int(r.unit) - 1: (str(r.label), str(r.category), float(r.score))
            for r in frame.itertuples() if isinstance(r.label, str)}


def visualizations(layout, layer: str, fingerprint: str) -> dict[int, Path]:
    """``{channel (0-based): PNG}``: the first maximizing image of each channel from the
    ``visualize`` run recorded in the run directory, if it optimized channels of ``layer`` of
    the model with ``fingerprint``; empty otherwise."""
    import pandas as pd

    entry = _entry(layout, "visualize", fingerprint)
    summary = entry.get("summary") or {}
    if summary.get("layer") != layer or summary.get("objective") != "channel" \
            or not layout.visualize_index.exists():
        return {}
    frame = pd.read_csv(layout.visualize_index)
    rows = frame[(frame["direction"] == "max") & (frame["replica"] == 0)]
    out = {}
    for r in rows.itertuples():
        path = layout.visualize / str(r.image)
        if path.is_file():
            out[int(r.index)] = path
    return out
