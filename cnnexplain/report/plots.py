"""Plots for the report and the run directory (through :mod:`cnnexplain.plotting`): PNG bytes
saved next to index.html and embedded in it, and the gate heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from cnnexplain.plotting import figure, png_bytes, save_png

if TYPE_CHECKING:
    import torch


def _png(fig) -> bytes:
    return png_bytes(fig, dpi=110)


def training_curves(log: pd.DataFrame, title: str) -> bytes | None:
    """Loss terms and accuracies per epoch from a train_log.csv frame."""
    if log is None or "epoch" not in log or not len(log):
        return None
    losses = [c for c in log.columns if c.startswith("loss") and log[c].notna().any()]
    accs = [c for c in log.columns if "acc" in c and log[c].notna().any()]
    extra = [c for c in ("gate_density", "gate_peakedness") if c in log and log[c].notna().any()]
    panels = [p for p in (losses, accs, extra) if p]
    if not panels:
        return None
    fig = figure(4.2 * len(panels), 3.4, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)
    names = {id(losses): "loss", id(accs): "accuracy", id(extra): "gate"}
    for ax, cols in zip(axes[0], panels):
        for c in cols:
            ax.plot(log["epoch"], log[c], marker="o", ms=3, label=c)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(names[id(cols)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def grouped_bars(matrix: pd.DataFrame, title: str, ylabel: str) -> bytes | None:
    """Bars: one group per row of ``matrix``, one bar per column (run)."""
    if matrix is None or matrix.empty:
        return None
    matrix = matrix.apply(pd.to_numeric, errors="coerce")
    n_rows, n_cols = matrix.shape
    fig = figure(max(4.0, 0.9 * n_rows * max(1, n_cols) * 0.5 + 2), 3.4)
    ax = fig.subplots()
    width = 0.8 / max(1, n_cols)
    x = np.arange(n_rows)
    for j, col in enumerate(matrix.columns):
        ax.bar(x + j * width - 0.4 + width / 2, matrix[col].fillna(0).to_numpy(), width,
               label=str(col))
    ax.set_xticks(x)
    ax.set_xticklabels([str(i) for i in matrix.index], rotation=0, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def save_gate_heatmap(matrix: torch.Tensor, class_names: list[str], path: str | Path,
                      title: str = "") -> Path:
    """Heatmap PNG of the membership ``[K, C]``, channels (rows) sorted by their argmax class
    then by decreasing membership; written atomically (matplotlib, Agg backend)."""
    from cnnexplain.models.gates import sort_channels

    m = matrix.detach().float().cpu()
    order = sort_channels(m)
    k, c = m.shape
    fig = figure(max(4.0, 0.5 * c + 2.5), min(12.0, 3.0 + 0.02 * k), dpi=100)
    ax = fig.subplots()
    im = ax.imshow(m[order].numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                   interpolation="nearest")
    ax.set_xticks(range(c))
    ax.set_xticklabels([str(n) for n in class_names][:c] + [str(i) for i in range(len(class_names), c)],
                       rotation=45, ha="right")
    ax.set_ylabel(f"channel ({k}, sorted by class)")
    ax.set_xlabel("class")
    ax.set_title(title or "gate membership")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_png(fig, path)


def ablation_heatmap(frame: pd.DataFrame, title: str) -> bytes | None:
    """Heatmap of entanglement_ablation.csv: accuracy on each class's images (columns) with
    each class's cluster removed (rows)."""
    if frame is None or frame.empty:
        return None
    names = [str(n) for n in frame.iloc[:, 0]]
    values = frame.iloc[:, 1:].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    c = len(names)
    fig = figure(max(3.6, 0.55 * c + 2.0), max(3.0, 0.5 * c + 1.4))
    ax = fig.subplots()
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(values.shape[1]))
    ax.set_xticklabels(list(frame.columns[1:]), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("images of class")
    ax.set_ylabel("cluster removed")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] < 0.5 else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def evaluation_curves(path: Path | None, title: str) -> bytes | None:
    """Small multiples of ``evaluation_curves.h5``: one panel per curve (deletion, insertion,
    the removal orders ...), the mean over pairs of each method's curve."""
    import h5py

    if path is None or not Path(path).is_file():
        return None
    panels: dict[str, list] = {}
    try:
        with h5py.File(path, "r") as f:
            for method in f:
                for name in f[method]:
                    g = f[method][name]
                    y = np.asarray(g["y"][()], dtype=float)
                    if y.ndim != 2 or not len(y):
                        continue
                    panels.setdefault(name, []).append(
                        (method, np.asarray(g["x"][()], dtype=float), np.nanmean(y, axis=0),
                         str(g["x"].attrs.get("axis", "")), str(g["y"].attrs.get("axis", ""))))
    except (OSError, KeyError, ValueError):
        return None
    if not panels:
        return None
    n = len(panels)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig = figure(3.4 * cols, 2.9 * rows, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (name, lines) in zip(axes.ravel(), panels.items()):
        for method, x, y, _, _ in lines:
            ax.plot(x, y, label=method, lw=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(lines[0][3], fontsize=8)
        ax.set_ylabel(lines[0][4], fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def agreement_heatmap(frame: pd.DataFrame | None, title: str) -> bytes | None:
    """Heatmap of metric_agreement.csv: Kendall's tau-b between two metrics' rankings of the
    methods (1: same order, -1: reversed, blank: undefined)."""
    if frame is None or frame.empty or frame.shape[1] < 2:
        return None
    values = frame.iloc[:, 1:].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(values).any(axis=1)  # a metric with no ranking (e.g. no truth) is left out
    if keep.sum() < 2 or values.shape[0] != values.shape[1]:
        return None
    values = values[keep][:, keep]
    names = [str(n) for n, k in zip(frame.iloc[:, 0], keep) if k]
    frame = frame.iloc[keep.nonzero()[0], [0] + [1 + j for j in keep.nonzero()[0]]]
    k = len(names)
    fig = figure(max(4.0, 0.45 * k + 2.4), max(3.4, 0.42 * k + 1.6))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(values), vmin=-1.0, vmax=1.0, cmap="RdBu",
                   interpolation="nearest")
    ax.set_xticks(range(values.shape[1]))
    ax.set_xticklabels(list(frame.columns[1:]), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(k))
    ax.set_yticklabels(names, fontsize=7)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)
