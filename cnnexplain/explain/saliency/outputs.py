"""Files ``saliency`` writes: ``maps.h5``, PNG overlays with a colour bar, the comparison grid.

``maps.h5`` (written atomically; plain HDF5, read with ``h5py.File(path)``)::

    /image_index   int64 [M]      row of each explained pair in the input set
    /target        int64 [M]      explained class
    /rank          int64 [M]      position of the class in the image's top-k (`target` topk:K)
    /label         int64 [M]      the image's label (-1 unknown)
    /image_name    str   [M]
    /maps/<method> float32 [M, H, W]   at input resolution: the method's own reduction
    /raw/<method>  float32 [M, 3, H, W] (pixel methods, unnormalized, signed) or
                   float32 [M, h, w] (layer methods, at the layer's resolution)

Root attributes: ``cnnexplain_version``, ``target`` (the `target` text), ``source``,
``model_json``, ``preprocessing_json``, ``methods_json``. Every ``maps/<method>`` and
``raw/<method>`` dataset carries ``description``, ``kind``, ``shape``, ``reduction`` (how the map
comes from raw), ``sign`` (sign convention), ``units``, ``citation``, ``options_json`` (the options that
produced it), ``layer``, ``seconds`` and ``cached``.

``evaluation_curves.h5`` (``evaluate``; atomically)::

    /<method>/<curve>/x   float64 [K]      the curve's x axis (attribute ``axis``)
    /<method>/<curve>/y   float64 [M, K]   one curve per explained pair (attribute ``axis``)

(curves: deletion, insertion, and the removal metrics' curves in both orders).

Overlays: ``overlays/<method>_<m>.png`` for the first pairs: the image with the map on top
(signed maps: a diverging colormap symmetric around 0; nonnegative maps: ``inferno`` from 0)
and a colour bar in the map's units. ``grid.png``: rows = pairs, columns = the image and each
method, every map scaled on its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from cnnexplain import __version__
from cnnexplain.io import atomic_path, write_bytes
from cnnexplain.plotting import figure, png_bytes


def _root_attrs(f, attrs: dict) -> None:
    """The version and ``attrs`` (non-scalars as JSON) on the file's root."""
    f.attrs["cnnexplain_version"] = __version__
    for k, v in attrs.items():
        f.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v, default=str)


def write_curves_h5(path, curves: dict, axes: dict, attrs: dict) -> Path:
    """Write ``evaluation_curves.h5`` (layout in the module docstring) atomically: ``curves``
    method -> name -> ``(x [K], y [M, K])``, ``axes`` name -> ``(x label, y label)``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _root_attrs(f, attrs)
            for method, named in curves.items():
                for name, (x, y) in named.items():
                    xl, yl = axes.get(name, ("", ""))
                    f.create_dataset(f"{method}/{name}/x", data=x).attrs["axis"] = xl
                    f.create_dataset(f"{method}/{name}/y", data=y).attrs["axis"] = yl
    return path


def write_maps_h5(path, results, image_index, targets, rank, labels, names, attrs: dict) -> Path:
    """Write ``maps.h5`` (layout in the module docstring) atomically; returns ``path``."""
    path = Path(path)
    m = len(image_index)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            _root_attrs(f, attrs)
            f.create_dataset("image_index", data=np.asarray(image_index, dtype=np.int64))
            f.create_dataset("target", data=np.asarray(targets, dtype=np.int64))
            f.create_dataset("rank", data=np.asarray(rank, dtype=np.int64))
            f.create_dataset("label", data=np.asarray(labels, dtype=np.int64))
            f.create_dataset("image_name", data=np.asarray(names, dtype=object),
                             dtype=h5py.string_dtype())
            for res in results:
                info = res.info
                common = {"description": info.get("description", ""), "kind": info.get("kind", ""),
                          "reduction": info.get("reduction", ""), "sign": info.get("sign", ""),
                          "units": info.get("units", ""),
                          "citation": info.get("citation", ""),
                          "options_json": json.dumps(info.get("options_used", {}), default=str),
                          "layer": info.get("layer") or "", "seconds": float(res.seconds),
                          "cached": int(res.cached)}
                ds = f.create_dataset(f"maps/{res.method}", data=res.maps.astype(np.float32),
                                      compression="gzip", shuffle=True,
                                      chunks=(1,) + res.maps.shape[1:])
                ds.attrs.update({**common, "shape": "M x H x W"})
                if res.raw is not None:
                    raw = res.raw.astype(np.float32)
                    shape = "M x 3 x H x W" if raw.ndim == 4 else "M x h x w (layer resolution)"
                    ds = f.create_dataset(f"raw/{res.method}", data=raw, compression="gzip",
                                          shuffle=True, chunks=(1,) + raw.shape[1:])
                    ds.attrs.update({**common, "shape": shape})
            if m == 0:
                f.attrs["empty"] = 1
    return path


def _figure(width: float, height: float):
    return figure(width, height)


def _png(fig, dpi: int = 100) -> bytes:
    return png_bytes(fig, dpi=dpi)


def _norm(saliency: np.ndarray):
    """``(cmap, vmin, vmax)``: diverging and symmetric for signed maps, inferno from 0 else."""
    lo, hi = float(np.min(saliency)), float(np.max(saliency))
    if lo < 0:
        bound = max(abs(lo), abs(hi), 1e-30)
        return "RdBu_r", -bound, bound
    return "inferno", 0.0, max(hi, 1e-30)


BOX_COLOR = "#00e060"
"""Colour of the ground-truth box of the explained class's object."""


def _truth(ax, saliency: np.ndarray | None, box) -> None:
    """Draw the explained object's ground-truth box (``(x0, y0, x1, y1)`` in pixels, end
    exclusive, or None) and the map's maximum (the pointing game's point, seed 003)."""
    from matplotlib.patches import Rectangle

    if box is not None:
        x0, y0, x1, y1 = (float(v) for v in box)
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               edgecolor=BOX_COLOR, linewidth=1.2))
    if saliency is not None:
        yy, xx = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
        ax.plot([xx], [yy], marker="x", color="white", markersize=5, markeredgewidth=1.5)


def overlay_png(image: np.ndarray, saliency: np.ndarray, title: str, label: str,
                box=None) -> bytes:
    """PNG bytes: ``image`` ``[H, W, 3]`` in [0, 1] with ``saliency`` ``[H, W]`` on top, a
    colour bar labelled ``label``, the ground-truth ``box`` and the map's maximum."""
    fig = _figure(3.6, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image, interpolation="nearest")
    cmap, vmin, vmax = _norm(saliency)
    im = ax.imshow(saliency, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.55, interpolation="nearest")
    _truth(ax, saliency, box)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.ax.tick_params(labelsize=6)
    bar.set_label(label, fontsize=7)
    return _png(fig)


def grid_png(images: list[np.ndarray], columns: list[tuple[str, np.ndarray]],
             row_titles: list[str], boxes: list | None = None) -> bytes:
    """PNG bytes of the comparison grid: one row per image, the image then one map per method
    (``columns``: (method, maps [R, H, W])), each with the row's ground-truth box (``boxes``)
    and the map's maximum."""
    rows = len(images)
    cols = 1 + len(columns)
    fig = _figure(1.6 * cols, 1.6 * rows + 0.3)
    for r in range(rows):
        ax = fig.add_subplot(rows, cols, r * cols + 1)
        ax.imshow(images[r], interpolation="nearest")
        _truth(ax, None, boxes[r] if boxes else None)
        ax.set_ylabel(row_titles[r], fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            ax.set_title("image", fontsize=7)
        for c, (name, maps) in enumerate(columns, start=2):
            ax = fig.add_subplot(rows, cols, r * cols + c)
            cmap, vmin, vmax = _norm(maps[r])
            ax.imshow(images[r], interpolation="nearest")
            ax.imshow(maps[r], cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.6, interpolation="nearest")
            _truth(ax, maps[r], boxes[r] if boxes else None)
            ax.axis("off")
            if r == 0:
                ax.set_title(name, fontsize=7)
    return _png(fig, dpi=90)


def write_pngs(out_dir, results, display_images: np.ndarray, image_index, targets, names,
               class_name, count: int, progress=None, boxes: list | None = None) -> list[Path]:
    """Overlays for the first ``count`` pairs of every method and the grid; returns the paths.
    ``display_images``: ``[N, H, W, 3]`` in [0, 1]; ``class_name(c) -> str``; ``boxes``: per
    pair, the explained class's ground-truth box or None."""
    from cnnexplain.progress import silent

    out_dir = Path(out_dir)
    k = min(int(count), len(image_index))
    written: list[Path] = []
    if k == 0 or not results:
        return written
    with (progress or silent())(total=k * len(results) + 1, description="writing PNGs") as task:
        for res in results:
            unit = res.info.get("units") or "saliency"
            for m in range(k):
                img = display_images[int(image_index[m])]
                name = names[int(image_index[m])]
                title = f"{res.method} - {name} - class {class_name(int(targets[m]))}"
                path = out_dir / "overlays" / f"{res.method}_{m}.png"
                write_bytes(path, overlay_png(img, res.maps[m], title, unit,
                                              boxes[m] if boxes else None))
                written.append(path)
                task.advance(1)
        rows = [display_images[int(image_index[m])] for m in range(k)]
        titles = [f"{names[int(image_index[m])]}:{class_name(int(targets[m]))}" for m in range(k)]
        path = out_dir / "grid.png"
        write_bytes(path, grid_png(rows, [(r.method, r.maps[:k]) for r in results], titles,
                                   boxes[:k] if boxes else None))
        written.append(path)
        task.advance(1)
    return written
