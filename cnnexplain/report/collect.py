"""Read everything a run directory holds. A missing section is simply absent (None); a file
that cannot be parsed is skipped with a notice, never an error."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from cnnexplain.layout import RunLayout


@dataclass
class RunResults:
    """The results found in one run directory (each attribute None when absent)."""

    path: Path
    name: str
    manifest: dict = field(default_factory=dict)
    train_log: pd.DataFrame | None = None
    gate_png: Path | None = None
    entanglement: pd.DataFrame | None = None
    entanglement_per_class: pd.DataFrame | None = None
    entanglement_ablation: pd.DataFrame | None = None
    saliency_eval: pd.DataFrame | None = None
    saliency_ranks: pd.DataFrame | None = None
    saliency_agreement: pd.DataFrame | None = None
    saliency_curves: Path | None = None
    saliency_grid: Path | None = None
    dissect_summary: pd.DataFrame | None = None
    dissect_tally: pd.DataFrame | None = None
    dissect_pngs: list[Path] = field(default_factory=list)
    dissect_clusters: pd.DataFrame | None = None
    tcav: pd.DataFrame | None = None
    tcav_png: Path | None = None
    visualize_index: pd.DataFrame | None = None
    visualize_grid: Path | None = None

    @property
    def sections(self) -> list[str]:
        found = []
        if self.train_log is not None or self.gate_png is not None:
            found.append("training")
        if self.entanglement is not None:
            found.append("entanglement")
        if self.saliency_eval is not None or self.saliency_grid is not None:
            found.append("saliency")
        if self.dissect_summary is not None or self.dissect_tally is not None:
            found.append("dissection")
        if self.tcav is not None:
            found.append("tcav")
        if self.visualize_index is not None:
            found.append("visualization")
        return found

    def command(self, name: str) -> dict:
        return (self.manifest.get("commands") or {}).get(name) or {}

    def model(self) -> dict:
        """The model of the latest command that recorded one (train-gated first)."""
        for cmd in ("train-gated", "evaluate-entanglement", "saliency", "dissect", "tcav"):
            m = self.command(cmd).get("model")
            if isinstance(m, dict):
                return m
        return {}


def _csv(path: Path, notice: Callable[[str], None]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        notice(f"skipped {path}: not a readable CSV ({' '.join(str(exc).split())[:80]})")
        return None


def _png(path: Path) -> Path | None:
    return path if path.is_file() and path.stat().st_size > 0 else None


def collect(run_dir: str | Path, notice: Callable[[str], None] = lambda m: None) -> RunResults:
    """Read ``run_dir``: run.json, train_log.csv, gate.png, entanglement*.csv, saliency/,
    dissect/, tcav/ and visualize/ (see :mod:`cnnexplain.layout`)."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    res = RunResults(path=run_dir, name=run_dir.resolve().name)
    manifest = layout.manifest
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                res.manifest = data
        except (OSError, ValueError):
            notice(f"skipped {manifest}: not valid JSON")
    res.train_log = _csv(layout.train_log, notice)
    res.gate_png = _png(layout.gate_png)
    res.entanglement = _csv(layout.entanglement, notice)
    res.entanglement_per_class = _csv(layout.entanglement_per_class, notice)
    res.entanglement_ablation = _csv(layout.entanglement_ablation, notice)
    res.saliency_eval = _csv(layout.saliency_evaluation, notice)
    res.saliency_ranks = _csv(layout.saliency_ranks, notice)
    res.saliency_agreement = _csv(layout.saliency_agreement, notice)
    res.saliency_curves = layout.saliency_curves if layout.saliency_curves.is_file() else None
    res.saliency_grid = _png(layout.saliency_grid)
    res.dissect_summary = _csv(layout.dissect_summary, notice)
    res.dissect_tally = _csv(layout.dissect_tally(), notice)
    res.dissect_clusters = _csv(layout.dissect_clusters, notice)
    pattern = layout.dissect_detectors()
    res.dissect_pngs = sorted(p for p in pattern.parent.glob(pattern.name) if _png(p)) \
        if pattern.parent.is_dir() else []
    res.tcav = _csv(layout.tcav_table, notice)
    res.tcav_png = _png(layout.tcav_plot)
    res.visualize_index = _csv(layout.visualize_index, notice)
    res.visualize_grid = _png(layout.visualize_grid)
    return res
