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
    tally_<view>.csv, summary_<view>.csv, iou_<view>.h5
                          the same for the other views (`negative`: the units' lowest
                          activations, iou_negative.h5's thresholds are bottom quantiles and the
                          mask is activation < threshold; `rotate`: the layer's channels after a
                          random orthogonal rotation, iou_rotated.h5 holds each layer's
                          rotation [K, K]); the positive files are the same with or without them
    rotation.csv          `rotate` only: layer, category, units, detector_units, unique_concepts,
                          detector_units_rotated, unique_concepts_rotated (Bau et al. 2017 sec.
                          3.2)
    index.html            per layer: bar graph of detectors and unique concepts per category
                          (detectors-<i>.png), the category table, and per unit its label, IoU
                          and a strip of its top images (images/<i>/unit-<k>.jpg), each drawn
                          as (0.8 * mask + 0.2) * image like NetDissect-Lite's report
                          (mask: the unit's map resized bilinearly to the image and > T_k),
                          and, when a visualize run of the same model optimized the layer's
                          channels in the same run directory, each unit's visualization.
                          With `negative`, the same for the lowest activations
                          (negative-detectors-<i>.png, images/negative/<i>/); with `rotate`, the
                          table of rotation.csv. Every text from data (names, layers) is
                          HTML-escaped.
"""

from __future__ import annotations

import csv
import html
import io as _io
import json
import os
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cnnexplain.explain.dissect.labels import (
    activation_for,
    compare_detectors,
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


OUTLINE_RGB = (0.0, 1.0, 1.0)
"""Colour of the labelled concept's outline in the strips (cyan)."""


def outline(mask: torch.Tensor) -> torch.Tensor:
    """The boundary pixels of bool masks ``[N, H, W]`` (inside, with a 4-neighbour outside)."""
    m = mask.float()[:, None]
    inner = -F.max_pool2d(-F.pad(m, (1, 1, 1, 1), value=0.0), 3, stride=1)
    return (m - inner)[:, 0] > 0


def strip_tiles(images: torch.Tensor, maps: torch.Tensor, threshold: float,
                tile: int = TILE, concept: torch.Tensor | None = None) -> np.ndarray:
    """uint8 ``[N, t, t', 3]`` tiles: ``(0.8 * mask + 0.2) * image`` for ``images`` ``[N, 3, H,
    W]`` in [0, 1] and unit maps ``[N, h, w]`` (mask = bilinear resize of the map to ``H x W``
    > ``threshold``), with the outline of ``concept`` (bool ``[N, H', W']``, the unit's label,
    resized nearest to ``H x W``) drawn in :data:`OUTLINE_RGB`; scaled up (nearest, small
    images) or down to about ``tile`` pixels a side."""
    n, _, hh, ww = images.shape
    h, w = maps.shape[-2:]
    rows = bilinear_matrix(h, hh, torch.float64)
    cols = bilinear_matrix(w, ww, torch.float64)
    up = torch.matmul(rows, torch.matmul(maps.double(), cols.t()))
    mask = (up > threshold).float()[:, None]
    vis = (mask * 0.8 + 0.2) * images.float()
    scale = tile / max(hh, ww)
    if scale > 1.0:  # small images: enlarge first, so the outline stays one thin line
        f = int(scale)
        vis = F.interpolate(vis, scale_factor=f, mode="nearest")
        hh, ww = hh * f, ww * f
        scale = tile / max(hh, ww)
    if concept is not None:
        c = F.interpolate(concept.float()[:, None], size=(hh, ww), mode="nearest")[:, 0] > 0.5
        edge = outline(c)[:, None]
        color = torch.tensor(OUTLINE_RGB, dtype=vis.dtype).view(1, 3, 1, 1)
        vis = torch.where(edge, color, vis)
    arr = (vis.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
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


def write_strips(lr, load_image: Callable[[int], tuple], directory: Path) -> dict[int, Path]:
    """Write ``directory/unit-<k>.jpg`` (k 1-based) for every unit with top images: each top
    image with the unit's thresholded map and the outline of the concept it is labelled with;
    images are loaded once per block of :data:`UNITS_PER_BLOCK` units."""
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
            items = [cache[int(lr.top_index[u, j])] for j in slots]
            imgs = torch.stack([im for im, _ in items])
            maps = torch.as_tensor(lr.top_maps[u, slots])
            label = int(lr.labels.label[u])
            concept = None
            if label > 0 and all(m is not None for _, m in items):
                concept = torch.stack([(torch.as_tensor(m) == label).any(0) for _, m in items])
            tiles = strip_tiles(imgs, maps, float(lr.thresholds[u]), concept=concept)
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


def _write_h5(path: Path, result, view: str = "positive") -> None:
    import h5py

    space = result.space
    layers = result.view(view)
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
            f.attrs["layers"] = json.dumps(list(layers))
            if view != "positive":
                f.attrs["view"] = view
            if view == "negative":
                f.attrs["mask"] = ("the unit's lowest activations: upsampled < thresholds, the "
                                   "bottom `quantile` of each unit")
            if view == "rotated":
                if cfg.rotate is not None:
                    f.attrs["rotate"] = np.uint64(cfg.rotate)
                f.attrs["rotation"] = ("maps A' = Q A over the channels, Q [K, K] orthogonal "
                                       "(per layer: rotation)")
            f.create_dataset("categories", data=list(space.categories), dtype=strs)
            f.create_dataset("concept_numbers", data=numbers.astype(np.int64))
            f.create_dataset("concept_names", data=[space.names[i] for i in numbers], dtype=strs)
            f.create_dataset("concept_categories",
                             data=[space.category_name(i) for i in numbers], dtype=strs)
            for name, lr in layers.items():
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
                # the negative view dissected -A: its threshold T is -(the bottom quantile)
                g.create_dataset("thresholds", data=-lr.thresholds if view == "negative"
                                 else lr.thresholds)
                if view == "rotated" and name in result.rotations:
                    g.create_dataset("rotation", data=result.rotations[name])
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
img.strip{height:72px;display:block}img.vis{height:72px;width:72px;image-rendering:pixelated}code{background:#f4f4f4;padding:0 .2em}"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _src(path: Path, base: Path) -> str:
    return _e(quote(path.relative_to(base).as_posix()))


def _rel(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` even outside it (``../visualize/...``), URL-quoted."""
    return _e(quote(Path(os.path.relpath(path, base)).as_posix()))


VIEW_NOTES = {
    "positive": ("", "Top images of each unit: bright where the unit's map is above its "
                 "threshold T_k, dimmed elsewhere; the cyan line outlines the concept the unit "
                 "is labelled with."),
    "negative": (", lowest activations", "Images where each unit's activation is lowest: "
                 "bright where the map is below the unit's bottom-quantile threshold, dimmed "
                 "elsewhere; the cyan line outlines the concept the unit's lowest activations "
                 "are labelled with."),
}
"""Per view drawn in the page: the heading's suffix and the note above its unit table."""


def _layer_sections(result, view: str, base: Path, bars: dict[str, Path],
                    strips: dict[str, dict[int, Path]],
                    visuals: dict[str, dict[int, Path]] | None = None) -> list[str]:
    """Per layer of one view: heading, bar graph, category table and the unit table (with a
    column of the units' feature visualizations where ``visuals`` has the layer)."""
    cfg = result.config
    cats = result.space.categories
    suffix, note = VIEW_NOTES[view]
    parts = []
    for name, lr in result.view(view).items():
        rows = lr.summary_rows(cats, cfg.iou_threshold)
        parts.append(f"<h2>Layer <code>{_e(name)}</code>{suffix} ({lr.units} units, feature map "
                     f"{lr.feature_size[0]}x{lr.feature_size[1]})</h2>")
        if name in bars:
            parts.append(f"<img src='{_src(bars[name], base)}' alt='detectors per category'>")
        parts.append("<table><tr><th>category</th><th>detector units</th>"
                     "<th>unique concepts</th></tr>")
        for r in rows:
            parts.append(f"<tr><td>{_e(r['category'])}</td><td>{r['detector_units']}</td>"
                         f"<td>{r['unique_concepts']}</td></tr>")
        vis = (visuals or {}).get(name) or {}
        vis_head = "<th>visualization</th>" if vis else ""
        parts.append(f"</table><p>{note}</p><table><tr><th>unit</th><th>label</th>"
                     f"<th>category</th><th>IoU</th>{vis_head}<th>top images</th></tr>")
        lab = lr.labels
        for u in np.argsort(-lab.score, kind="stable"):
            det = lab.score[u] > cfg.iou_threshold
            label = result.space.names[lab.label[u]] if lab.label[u] >= 0 else ""
            cat = cats[lab.category[u]] if cats else ""
            img = (f"<img class='strip' loading='lazy' src='{_src(strips[name][u], base)}' "
                   f"alt='unit {u + 1}'>" if u in strips.get(name, {}) else "")
            cell = ""
            if vis:
                cell = (f"<td><img class='vis' loading='lazy' src='{_rel(vis[u], base)}' "
                        f"alt='unit {u + 1} visualization'></td>" if u in vis else "<td></td>")
            parts.append(f"<tr><td>{u + 1}</td><td class='{'det' if det else 'no'}'>{_e(label)}"
                         f"</td><td>{_e(cat)}</td><td>{lab.score[u]:.4f}</td>{cell}<td>{img}</td>"
                         "</tr>")
        parts.append("</table>")
    return parts


def rotation_rows(result) -> list[dict]:
    """rotation.csv's rows: per rotated layer and category (and ``all``), detector units and
    unique concepts of the layer and of its rotation (:func:`compare_detectors`)."""
    rows = []
    for name, rot in result.variants.get("rotated", {}).items():
        lr = result.layers[name]
        for r in compare_detectors(lr.labels, rot.labels, result.space.categories,
                                   result.config.iou_threshold):
            rows.append({"layer": name, "category": r.pop("category"), "units": lr.units, **r})
    return rows


ROTATION_COLUMNS = ["layer", "category", "units", "detector_units", "unique_concepts",
                    "detector_units_rotated", "unique_concepts_rotated"]


def _rotation_section(result) -> list[str]:
    cfg = result.config
    seed = f"seed {_e(cfg.rotate)}" if cfg.rotate is not None else "given rotation"
    parts = [f"<h2>Random rotation of the channels ({seed})</h2><p>Each layer dissected again "
             "after a random orthogonal change of its channel basis, A' = Q A (Bau et al. 2017, "
             "section 3.2): the rotated layer is exactly as discriminative, so fewer unique "
             "detectors there mean that interpretability is aligned with the units' axes. "
             "Thresholds and IoU as above.</p><table><tr><th>layer</th><th>category</th>"
             "<th>detector units</th><th>rotated</th><th>unique concepts</th><th>rotated</th>"
             "</tr>"]
    for r in rotation_rows(result):
        parts.append(f"<tr><td>{_e(r['layer'])}</td><td>{_e(r['category'])}</td>"
                     f"<td>{r['detector_units']}</td><td>{r['detector_units_rotated']}</td>"
                     f"<td>{r['unique_concepts']}</td><td>{r['unique_concepts_rotated']}</td>"
                     "</tr>")
    parts.append("</table>")
    return parts


def render_html(result, base: Path, bars: dict[str, Path], strips: dict[str, dict[int, Path]],
                clusters: list[dict] | None, title: str,
                view_figures: dict[str, tuple[dict, dict]] | None = None,
                visuals: dict[str, dict[int, Path]] | None = None) -> str:
    """The report page (module docstring); every text from data is escaped. ``bars`` and
    ``strips`` are the positive view's, ``view_figures`` ``{view: (bars, strips)}`` the other
    views'."""
    cfg = result.config
    view_figures = view_figures or {}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>",
             f"<p>{result.n_images} images; top-quantile threshold q = {_e(cfg.quantile)} "
             f"({_e(cfg.quantile_mode)}); IoU mode <code>{_e(cfg.iou_mode)}</code>; detector: "
             f"IoU &gt; {_e(cfg.iou_threshold)}.</p>"]
    parts += _layer_sections(result, "positive", base, bars, strips, visuals or {})
    if clusters:
        parts.append("<h2>Concepts of each class's channel cluster</h2><table><tr><th>class</th>"
                     "<th>channels</th><th>detectors</th><th>concepts</th></tr>")
        for r in clusters:
            parts.append(f"<tr><td>{_e(r['class_name'])}</td><td>{r['channels']}</td>"
                         f"<td>{r['detectors']}</td><td>{_e(r['concepts'])}</td></tr>")
        parts.append("</table>")
    if "negative" in result.variants:
        parts.append(f"<h2>Negative activations</h2><p>Every unit labelled again by its lowest "
                     f"activations: its threshold is the bottom q = {_e(cfg.quantile)} of its "
                     "activations and its mask where the upsampled map is below it (Network "
                     "Dissection itself looks only at the highest). Same IoU and detector "
                     "threshold.</p>")
        nbars, nstrips = view_figures.get("negative", ({}, {}))
        parts += _layer_sections(result, "negative", base, nbars, nstrips)
    if "rotated" in result.variants:
        parts += _rotation_section(result)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _write_tables(result, layout, view: str) -> list[Path]:
    """One view's tally.csv files, summary.csv and iou.h5 (``tally_<view>.csv`` ... for a view
    other than ``positive``); the paths written."""
    named = None if view == "positive" else view
    layers = result.view(view)
    cats = result.space.categories
    columns = tally_columns(cats)
    written: list[Path] = []
    multi = len(layers) > 1
    last = list(layers)[-1]
    summary = []
    for name, lr in layers.items():
        text = _csv_text(columns, tally_rows(lr.labels, lr.tally, result.config.iou_mode,
                                             result.space))
        if multi:
            write_text(layout.dissect_tally(name, named), text)
            written.append(layout.dissect_tally(name, named))
        if name == last:
            write_text(layout.dissect_tally(None, named), text)
            written.append(layout.dissect_tally(None, named))
        for r in lr.summary_rows(cats, result.config.iou_threshold):
            summary.append({"layer": name, "category": r["category"], "units": lr.units,
                            "detector_units": r["detector_units"],
                            "unique_concepts": r["unique_concepts"]})
    spath = layout.dissect_view_summary(view) if named else layout.dissect_summary
    write_text(spath, _csv_text(["layer", "category", "units", "detector_units",
                                 "unique_concepts"], summary))
    written.append(spath)
    hpath = layout.dissect_view_iou(view) if named else layout.dissect_iou
    _write_h5(hpath, result, view)
    written.append(hpath)
    return written


def _write_figures(result, layout, view: str, load_image, written: list[Path]
                   ) -> tuple[dict[str, Path], dict[str, dict[int, Path]]]:
    """One view's bar graphs and top-image strips (appended to ``written``): ``(bars,
    strips)`` by layer."""
    named = None if view == "positive" else view
    cats = result.space.categories
    images = layout.dissect / "images"
    images = images / view if named else images
    bars, strips = {}, {}
    for i, (name, lr) in enumerate(result.view(view).items()):
        rows = lr.summary_rows(cats, result.config.iou_threshold)[:-1]
        png = layout.dissect_detectors(i + 1, named)
        what = "detectors" if view == "positive" else f"{view} detectors"
        write_bytes(png, bar_graph_png(rows, f"{name}: {what} per category "
                                             f"(IoU > {result.config.iou_threshold})"))
        bars[name] = png
        written.append(png)
        if load_image is not None and lr.top_index.size:
            strips[name] = write_strips(lr, load_image, images / str(i + 1))
            written += list(strips[name].values())
    return bars, strips


def write_dissection(result, out: Path, load_image: Callable[[int], torch.Tensor] | None = None,
                     clusters: list[dict] | None = None, title: str = "Network Dissection",
                     visuals: dict[str, dict[int, Path]] | None = None) -> list[Path]:
    """Write every file of the module docstring under ``out/dissect``; the paths written.
    ``visuals``: ``{layer: {unit (0-based): PNG}}``, feature visualizations of the units
    (Olah et al. 2017) shown beside their labels and top images."""
    from cnnexplain.layout import RunLayout

    layout = RunLayout(out)
    written = _write_tables(result, layout, "positive")
    if clusters is not None:
        write_text(layout.dissect_clusters, _csv_text(["class", "class_name", "channels", "detectors",
                                                  "unique_concepts", "concepts", "units"],
                                                 clusters))
        written.append(layout.dissect_clusters)
    bars, strips = _write_figures(result, layout, "positive", load_image, written)
    figures = {}
    for view in result.variants:
        written += _write_tables(result, layout, view)
        if view == "negative":
            figures[view] = _write_figures(result, layout, view, load_image, written)
    if "rotated" in result.variants:
        write_text(layout.dissect_rotation, _csv_text(ROTATION_COLUMNS, rotation_rows(result)))
        written.append(layout.dissect_rotation)
    page = render_html(result, layout.dissect, bars, strips, clusters, title, figures,
                       visuals=visuals)
    write_text(layout.dissect_index, page)
    written.append(layout.dissect_index)
    return written
