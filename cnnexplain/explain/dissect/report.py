"""Files of a dissection: ``tally.csv``, ``iou.h5``, ``summary.csv``, ``clusters.csv`` and the
``index.html`` report with its bar graphs and top-image strips.

Layout under ``DIR/dissect/`` (every file written atomically, after the computation):

    tally.csv             NetDissect-Lite's columns: unit (1-based), category, label, score, then
                          per category <cat>-label, -truth, -activation, -intersect, -iou; units
                          by descending score. With several `layer` values this is the LAST
                          layer's, and each layer also gets <layer>/tally.csv.
    summary.csv           layer, category, units, detector_units, unique_concepts ("all" row per
                          layer)
    iou.h5                per layer group /<layer>/: iou [K, NC] (configured mode), iou_original,
                          iou_lite, thresholds [K], intersection [K, NC], truth [NC],
                          activation [K], activation_original / activation_lite [K, G], label,
                          category, score [K]; root: concept_numbers, concept_names,
                          concept_categories [NC], categories [G]; attributes say the settings
    clusters.csv          gated checkpoints only: concepts detected by each class's channel
                          cluster (class, class_name, channels, detectors, unique_concepts,
                          concepts, units)
    index.html            per layer: bar graph of detectors and unique concepts per category
                          (detectors-<i>.png), the category table, and per unit its label, IoU
                          and a strip of its top images (images/<i>/unit-<k>.jpg), each drawn
                          as (0.8 * mask + 0.2) * image like NetDissect-Lite's report
                          (mask: the unit's map resized bilinearly to the image and > T_k).
                          Every text from data (names, layers) is HTML-escaped.
"""

from __future__ import annotations

import csv
import html
import io as _io
import json
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image

from cnnexplain.explain.dissect.labels import (
    activation_for,
    iou,
    tally_columns,
    tally_rows,
)
from cnnexplain.explain.dissect.tally import bilinear_matrix
from cnnexplain.io import atomic_path, write_bytes, write_text

TILE = 128
"""Largest side of one top-image tile in the strips (pixels)."""
UNITS_PER_BLOCK = 64
"""Units whose strips are rendered at once (bounds memory; images reload per block)."""


def _csv_text(columns: list[str], rows: list[dict]) -> str:
    buf = _io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def strip_tiles(images: torch.Tensor, maps: torch.Tensor, threshold: float,
                tile: int = TILE) -> np.ndarray:
    """uint8 ``[N, t, t', 3]`` tiles: ``(0.8 * mask + 0.2) * image`` for ``images`` ``[N, 3, H,
    W]`` in [0, 1] and unit maps ``[N, h, w]`` (mask = bilinear resize of the map to ``H x W``
    > ``threshold``), scaled down to at most ``tile`` pixels a side."""
    n, _, hh, ww = images.shape
    h, w = maps.shape[-2:]
    rows = bilinear_matrix(h, hh, torch.float64)
    cols = bilinear_matrix(w, ww, torch.float64)
    up = torch.matmul(rows, torch.matmul(maps.double(), cols.t()))
    mask = (up > threshold).float()[:, None]
    vis = (mask * 0.8 + 0.2) * images.float()
    arr = (vis.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    scale = min(1.0, tile / max(hh, ww))
    if scale < 1.0:
        size = (max(1, round(ww * scale)), max(1, round(hh * scale)))
        arr = np.stack([np.asarray(Image.fromarray(a).resize(size, Image.BILINEAR)) for a in arr])
    return arr


def _strip_jpeg(tiles: np.ndarray, gap: int = 2) -> bytes:
    n, th, tw, _ = tiles.shape
    canvas = np.full((th, n * tw + (n - 1) * gap, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        canvas[:, i * (tw + gap): i * (tw + gap) + tw] = t
    buf = _io.BytesIO()
    Image.fromarray(canvas).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_strips(lr, load_image: Callable[[int], torch.Tensor], directory: Path) -> dict[int, Path]:
    """Write ``directory/unit-<k>.jpg`` (k 1-based) for every unit with top images; images are
    loaded once per block of :data:`UNITS_PER_BLOCK` units."""
    out: dict[int, Path] = {}
    k = lr.units
    for b0 in range(0, k, UNITS_PER_BLOCK):
        units = range(b0, min(k, b0 + UNITS_PER_BLOCK))
        need = sorted({int(i) for u in units for i in lr.top_index[u] if i >= 0})
        cache = {i: load_image(i) for i in need}
        for u in units:
            slots = [j for j, i in enumerate(lr.top_index[u]) if i >= 0]
            if not slots:
                continue
            imgs = torch.stack([cache[int(lr.top_index[u, j])] for j in slots])
            maps = torch.as_tensor(lr.top_maps[u, slots])
            tiles = strip_tiles(imgs, maps, float(lr.thresholds[u]))
            path = directory / f"unit-{u + 1:04d}.jpg"
            write_bytes(path, _strip_jpeg(tiles))
            out[u] = path
    return out


def bar_graph_png(rows: list[dict], title: str) -> bytes:
    """PNG bar graph: detector units and unique concepts per category (``summary`` rows
    without the "all" row)."""
    from cnnexplain.plotting import figure, png_bytes

    cats = [r["category"] for r in rows]
    det = [r["detector_units"] for r in rows]
    uniq = [r["unique_concepts"] for r in rows]
    x = np.arange(len(cats))
    fig = figure(max(4.0, 1.1 * len(cats) + 1.5), 3.2, dpi=100)
    ax = fig.subplots()
    ax.bar(x - 0.2, det, 0.4, label="detector units")
    ax.bar(x + 0.2, uniq, 0.4, label="unique concepts")
    ax.set_xticks(x)
    ax.set_xticklabels(cats, parse_math=False)
    ax.set_title(title, parse_math=False)
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return png_bytes(fig, tight=False)


def _write_h5(path: Path, result) -> None:
    import h5py

    space = result.space
    numbers = space.numbers
    cfg = result.config
    strs = h5py.string_dtype()
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["description"] = ("Network Dissection IoU of every unit with every Broden "
                                      "concept (cnnexplain dissect; Bau et al. 2017)")
            f.attrs["quantile"] = cfg.quantile
            f.attrs["quantile_mode"] = cfg.quantile_mode
            f.attrs["iou_mode"] = cfg.iou_mode
            f.attrs["iou_threshold"] = cfg.iou_threshold
            f.attrs["n_images"] = result.n_images
            f.attrs["image_size"] = list(result.image_size)
            f.attrs["mask_size"] = list(result.mask_size)
            f.attrs["upsampling"] = "bilinear, align_corners=False; unit mask = upsampled > T"
            f.attrs["layers"] = json.dumps(list(result.layers))
            f.create_dataset("categories", data=list(space.categories), dtype=strs)
            f.create_dataset("concept_numbers", data=numbers.astype(np.int64))
            f.create_dataset("concept_names", data=[space.names[i] for i in numbers], dtype=strs)
            f.create_dataset("concept_categories",
                             data=[space.category_name(i) for i in numbers], dtype=strs)
            for name, lr in result.layers.items():
                g = f.create_group(name)
                t = lr.tally
                g.attrs["units"] = lr.units
                g.attrs["feature_size"] = list(lr.feature_size)
                g.attrs["quantile_info"] = json.dumps(
                    {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                     for k, v in lr.quantile_info.items()})
                g.create_dataset("iou", data=lr.iou[:, numbers])
                for mode in ("original", "lite"):
                    m = iou(t["intersection"], t["truth"], activation_for(t, mode),
                            space.label_category)
                    g.create_dataset(f"iou_{mode}", data=m[:, numbers])
                g.create_dataset("thresholds", data=lr.thresholds)
                g.create_dataset("intersection", data=t["intersection"][:, numbers])
                g.create_dataset("truth", data=t["truth"][numbers])
                g.create_dataset("activation", data=t["activation"])
                g.create_dataset("activation_original", data=t["activation_original"])
                g.create_dataset("activation_lite", data=t["activation_lite"])
                g.create_dataset("category_images", data=t["category_images"])
                g.create_dataset("label", data=lr.labels.label)
                g.create_dataset("category", data=lr.labels.category)
                g.create_dataset("score", data=lr.labels.score)
                if "rank_error" in lr.quantile_info:
                    g.create_dataset("threshold_rank_error",
                                     data=np.asarray(lr.quantile_info["rank_error"]))


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border-bottom:1px solid #ddd;padding:.2em .6em;
text-align:left}th{background:#f4f4f4}.det{color:#070;font-weight:600}.no{color:#999}
img.strip{height:72px;display:block}code{background:#f4f4f4;padding:0 .2em}"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _src(path: Path, base: Path) -> str:
    return _e(quote(path.relative_to(base).as_posix()))


def render_html(result, base: Path, bars: dict[str, Path], strips: dict[str, dict[int, Path]],
                clusters: list[dict] | None, title: str) -> str:
    """The report page (module docstring); every text from data is escaped."""
    cfg = result.config
    cats = result.space.categories
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>",
             f"<p>{result.n_images} images; top-quantile threshold q = {_e(cfg.quantile)} "
             f"({_e(cfg.quantile_mode)}); IoU mode <code>{_e(cfg.iou_mode)}</code>; detector: "
             f"IoU &gt; {_e(cfg.iou_threshold)}.</p>"]
    for name, lr in result.layers.items():
        rows = lr.summary_rows(cats, cfg.iou_threshold)
        parts.append(f"<h2>Layer <code>{_e(name)}</code> ({lr.units} units, feature map "
                     f"{lr.feature_size[0]}x{lr.feature_size[1]})</h2>")
        if name in bars:
            parts.append(f"<img src='{_src(bars[name], base)}' alt='detectors per category'>")
        parts.append("<table><tr><th>category</th><th>detector units</th>"
                     "<th>unique concepts</th></tr>")
        for r in rows:
            parts.append(f"<tr><td>{_e(r['category'])}</td><td>{r['detector_units']}</td>"
                         f"<td>{r['unique_concepts']}</td></tr>")
        parts.append("</table><table><tr><th>unit</th><th>label</th><th>category</th>"
                     "<th>IoU</th><th>top images</th></tr>")
        lab = lr.labels
        for u in np.argsort(-lab.score, kind="stable"):
            det = lab.score[u] > cfg.iou_threshold
            label = result.space.names[lab.label[u]] if lab.label[u] >= 0 else ""
            cat = cats[lab.category[u]] if cats else ""
            img = (f"<img class='strip' loading='lazy' src='{_src(strips[name][u], base)}' "
                   f"alt='unit {u + 1}'>" if u in strips.get(name, {}) else "")
            parts.append(f"<tr><td>{u + 1}</td><td class='{'det' if det else 'no'}'>{_e(label)}"
                         f"</td><td>{_e(cat)}</td><td>{lab.score[u]:.4f}</td><td>{img}</td></tr>")
        parts.append("</table>")
    if clusters:
        parts.append("<h2>Concepts of each class's channel cluster</h2><table><tr><th>class</th>"
                     "<th>channels</th><th>detectors</th><th>concepts</th></tr>")
        for r in clusters:
            parts.append(f"<tr><td>{_e(r['class_name'])}</td><td>{r['channels']}</td>"
                         f"<td>{r['detectors']}</td><td>{_e(r['concepts'])}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_dissection(result, out: Path, load_image: Callable[[int], torch.Tensor] | None = None,
                     clusters: list[dict] | None = None, title: str = "Network Dissection"
                     ) -> list[Path]:
    """Write every file of the module docstring under ``out/dissect``; the paths written."""
    from cnnexplain.layout import RunLayout

    layout = RunLayout(out)
    d = layout.dissect
    cats = result.space.categories
    columns = tally_columns(cats)
    written: list[Path] = []
    multi = len(result.layers) > 1
    last = list(result.layers)[-1]
    summary = []
    for name, lr in result.layers.items():
        text = _csv_text(columns, tally_rows(lr.labels, lr.tally, result.config.iou_mode,
                                             result.space))
        if multi:
            write_text(layout.dissect_tally(name), text)
            written.append(layout.dissect_tally(name))
        if name == last:
            write_text(layout.dissect_tally(), text)
            written.append(layout.dissect_tally())
        for r in lr.summary_rows(cats, result.config.iou_threshold):
            summary.append({"layer": name, "category": r["category"], "units": lr.units,
                            "detector_units": r["detector_units"],
                            "unique_concepts": r["unique_concepts"]})
    write_text(layout.dissect_summary, _csv_text(["layer", "category", "units",
                                                  "detector_units", "unique_concepts"], summary))
    written.append(layout.dissect_summary)
    _write_h5(layout.dissect_iou, result)
    written.append(layout.dissect_iou)
    if clusters is not None:
        write_text(layout.dissect_clusters, _csv_text(["class", "class_name", "channels", "detectors",
                                                  "unique_concepts", "concepts", "units"],
                                                 clusters))
        written.append(layout.dissect_clusters)
    bars, strips = {}, {}
    for i, (name, lr) in enumerate(result.layers.items()):
        rows = lr.summary_rows(cats, result.config.iou_threshold)[:-1]
        png = layout.dissect_detectors(i + 1)
        write_bytes(png, bar_graph_png(rows, f"{name}: detectors per category "
                                             f"(IoU > {result.config.iou_threshold})"))
        bars[name] = png
        written.append(png)
        if load_image is not None and lr.top_index.size:
            strips[name] = write_strips(lr, load_image, d / "images" / str(i + 1))
            written += list(strips[name].values())
    page = render_html(result, d, bars, strips, clusters, title)
    write_text(layout.dissect_index, page)
    written.append(layout.dissect_index)
    return written
