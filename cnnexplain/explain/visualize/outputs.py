"""The files of ``visualize``: the optimized images and example strips as PNG, the grid, the
index table rows and a self-contained HTML page (every image embedded as a data URI, every
string escaped, no scripts, no external resources).

Images are written at their own resolution (one PNG pixel per image pixel, so they can be
measured); the page and the grid enlarge them with nearest-neighbour sampling.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cnnexplain.plotting import figure, png_bytes

TILE = 96
"""Side in pixels of an example tile in the strips (small images are enlarged to it)."""
FLOOR = 0.2
"""Brightness of an example where the unit's map is lowest (1 where it is highest)."""
GRID_ROWS = 48
"""Most units drawn in grid.png (the page and the table have every one)."""


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> uint8 ``[H, W, 3]``."""
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def png(array: np.ndarray) -> bytes:
    """uint8 ``[H, W, 3]`` -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def slug(text: str) -> str:
    """A file-name-safe version of a unit or layer name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_.") or "unit"


def overlay(images: torch.Tensor, maps: torch.Tensor | None, lo: float, hi: float,
            tile: int = TILE) -> np.ndarray:
    """uint8 ``[k, t, t, 3]`` tiles: ``images`` ``[k, 3, H, W]`` in [0, 1] under the unit's
    ``maps`` ``[k, h, w]`` (None: no map), upsampled bilinearly to ``H x W`` and scaled to
    [0, 1] by ``(lo, hi)``: each pixel's brightness is ``FLOOR + (1 - FLOOR) * map``, so the
    example shows where the unit responds, in its own colours (as Network Dissection's
    strips); enlarged (nearest) to about ``tile`` pixels a side."""
    vis = images.float()
    if maps is not None:
        up = F.interpolate(maps.float()[:, None], size=vis.shape[-2:], mode="bilinear",
                           align_corners=False)
        m = ((up - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
        vis = vis * (FLOOR + (1 - FLOOR) * m)
    f = max(1, tile // max(vis.shape[-2:]))
    if f > 1:
        vis = F.interpolate(vis, scale_factor=f, mode="nearest")
    return np.stack([to_uint8(v) for v in vis])


def strip(tiles: np.ndarray, gap: int = 2) -> np.ndarray:
    """uint8 ``[k, t, t', 3]`` -> one row ``[t, k * t' + gaps, 3]`` on white."""
    n, th, tw, _ = tiles.shape
    canvas = np.full((th, n * tw + max(0, n - 1) * gap, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        canvas[:, i * (tw + gap): i * (tw + gap) + tw] = t
    return canvas


def enlarge(array: np.ndarray, tile: int = TILE) -> np.ndarray:
    """uint8 ``[H, W, 3]`` enlarged by a whole factor (nearest) to about ``tile`` a side."""
    f = max(1, tile // max(array.shape[:2]))
    return array.repeat(f, axis=0).repeat(f, axis=1) if f > 1 else array


@dataclass
class UnitView:
    """What the page and the grid show of one unit: its name, the rows of its images (each a
    dict with ``direction``, ``objective_value``, ``png`` bytes), its strips (PNG bytes or
    None), the objective on its best examples and ``short``, the grid's row label (default: the
    title)."""

    title: str
    images: list = field(default_factory=list)
    short: str = ""
    top_strip: bytes | None = None
    bottom_strip: bytes | None = None
    top_best: float = float("nan")
    bottom_best: float = float("nan")
    top_array: np.ndarray | None = None


def _num(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _img(data: bytes, alt: str, cls: str = "") -> str:
    b64 = base64.b64encode(data).decode("ascii")
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:16px 26px} header h1{margin:0;font-size:21px}
header p{margin:4px 0 0;color:#b9c0cc;font-size:13px}
main{padding:6px 26px 36px;max-width:1500px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);margin:16px 0;padding:12px 18px}
h2{font-size:16px;margin:4px 0 10px} .row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0;text-align:center;font-size:12px;color:#33415c}
img.vis{width:128px;height:128px;image-rendering:pixelated;border:1px solid #e3e6eb;border-radius:4px}
img.strip{max-width:100%;border:1px solid #e3e6eb;border-radius:4px}
.muted{color:#6b7485;font-size:12px}
"""


def render_html(title: str, subtitle: str, units: list[UnitView], notes: list[str]) -> str:
    """The self-contained page: per unit its optimized images (max and min, with the objective
    reached) and its top and bottom dataset examples with the unit's map over them."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
             f"<style>{CSS}</style></head><body><header><h1>{e(title)}</h1>"
             f"<p>{e(subtitle)}</p></header><main>"]
    for note in notes:
        parts.append(f"<p class='muted'>{e(note)}</p>")
    for u in units:
        parts.append(f"<section><h2>{e(u.title)}</h2><div class='row'>")
        for im in u.images:
            cap = f"{im['direction']} {im.get('replica', 0) + 1}: {_num(im['objective_value'])}"
            parts.append(f"<figure>{_img(im['png'], cap, 'vis')}<figcaption>{e(cap)}"
                         "</figcaption></figure>")
        parts.append("</div>")
        for label, data, best in (("top examples", u.top_strip, u.top_best),
                                  ("bottom examples", u.bottom_strip, u.bottom_best)):
            if data is not None:
                parts.append(f"<p class='muted'>{e(label)} (best: {e(_num(best))})</p>"
                             f"{_img(data, label, 'strip')}")
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "".join(parts)


def grid_png(units: list[UnitView], examples: int = 4) -> bytes:
    """PNG bytes: one row per unit (at most :data:`GRID_ROWS`): its optimized images, then up
    to ``examples`` of its top dataset examples (with the map)."""
    units = units[:GRID_ROWS]
    cols = max(len(u.images) for u in units) + (1 if any(u.top_array is not None
                                                         for u in units) else 0)
    fig = figure(1.5 * cols + 0.6, 1.5 * len(units) + 0.2)
    for r, u in enumerate(units):
        for c, im in enumerate(u.images):
            ax = fig.add_subplot(len(units), cols, r * cols + c + 1)
            from PIL import Image

            ax.imshow(np.asarray(Image.open(io.BytesIO(im["png"]))), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{im['direction']} {_num(im['objective_value'])}", fontsize=6)
            if c == 0:
                ax.set_ylabel(u.short or u.title, fontsize=6)
        if u.top_array is not None:
            ax = fig.add_subplot(len(units), cols, r * cols + cols)
            arr = u.top_array
            w = arr.shape[1]
            k = max(1, min(examples, (w + 2) // max(1, arr.shape[0] + 2)))
            ax.imshow(arr[:, : k * (arr.shape[0] + 2) - 2], interpolation="nearest")
            ax.axis("off")
            ax.set_title(f"top examples {_num(u.top_best)}", fontsize=6)
    return png_bytes(fig, dpi=90)
