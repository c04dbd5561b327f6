"""Network Dissection at Broden scale: time linear in images, peak memory flat, and the
extrapolated time for all of Broden, at Broden's label count.

The dataset is a Broden-format directory (the layout :class:`~cnnexplain.data.broden.
BrodenDataset` reads) with about as many labels as broden1_224: ``LABEL_COUNTS`` per category
(1,197 in all). Images are synthetic-world JPEGs at the chosen side (a pool of
``IMAGE_POOL`` scenes repeated: decoding costs the same); every image has its own masks at half
the side: an 8 x 8 grid of regions per pixel category, each region a label drawn with Zipf
frequencies from that category (parts cover a quarter of the regions, the rest unlabelled), and
one scene and one texture label. So every tally carries Broden's label width.

For each image count, in one run on the same model (torchvision resnet18, random weights,
layer4) and files:

- ``forward``: a bare forward to layer4 of the images read from disk by the DataLoader, the
  floor dissection cannot beat, in a fresh process;
- ``dissect``: :func:`cnnexplain.explain.dissect.run.dissect` end to end (reading, forward,
  thresholds, tallies of all 1,197 labels, top images) in a fresh process, with its peak RSS
  (``VmHWM``);
- ``dissect / forward`` (target >= 0.9) and seconds per 1,000 images (linear in images when
  flat);
- the tally pass alone at this label width, vectorized against NetDissect-Lite's per-unit
  loop on the same activations (target: the loop >= 20x slower), and their agreement;
- the full-Broden extrapolation multiplies the largest run's per-image time by
  ``BRODEN_IMAGES`` (63,305), next to NetDissect-Lite's published ~20 minutes for resnet18 on a
  GPU (a figure quoted, not measured here).

Timings are printed, never asserted (shared machine: only same-run ratios mean something).
``small`` (64 px; 100 / 200 / 400 images) is a smoke test; ``full`` is 224 px with 1,000 /
4,000 / 10,000 images (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from PIL import Image

from benchmarks.bench_dissect import _tally_timings
from benchmarks.memory import ROOT
from cnnexplain.cache.store import Cache
from cnnexplain.data.broden import (CATEGORY_HEADER, CODE_HEADER, INDEX_HEADER, LABEL_HEADER,
                                    BrodenDataset, _csv_bytes, encode_rg, hashed_float)
from cnnexplain.data.export import png_bytes
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.data.synthetic import WorldConfig, render
from cnnexplain.explain.dissect.run import DissectConfig, dissect

SIZES = {"small": (64, (100, 200, 400)), "full": (224, (1000, 4000, 10000))}
TALLY_IMAGES = {"small": (48, 3), "full": (160, 8)}  # images for thresholds, for the loop
LABEL_COUNTS = {"color": 11, "object": 529, "part": 154, "material": 26, "scene": 430,
                "texture": 47}
PIXEL_CATEGORIES = ("color", "object", "part", "material")
BRODEN_IMAGES = 63305
NETDISSECT_LITE_GPU_MINUTES = 20.0
IMAGE_POOL = 64
GRID = 8
BATCH = 16
LAYER = "layer4"

_SCRIPT = r"""
import json, sys, time, torch, torchvision
sys.path.insert(0, sys.argv[5])
from benchmarks.bench_dissect import ImagesOnly
from benchmarks.memory import peak_rss_mib
from cnnexplain.cache.store import Cache
from cnnexplain.data.base import make_loader
from cnnexplain.data.broden import BrodenDataset
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.explain.dissect.run import DissectConfig, dissect
from cnnexplain.models.layers import split_at
root, limit, batch, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = torchvision.models.resnet18(weights=None).eval()
prep = Preprocessing()
ds = BrodenDataset(root, limit=limit)
start = time.perf_counter()
if mode == "forward":  # the floor: a bare forward to layer4 of the images read from disk
    body = split_at(model, "layer4").body
    with torch.no_grad():
        for b in make_loader(ImagesOnly(ds), batch_size=batch):
            body(prep.normalize(b["image"]))
else:
    dissect(model, ["layer4"], ds, preprocessing=prep,
            config=DissectConfig(batch_size=batch, top_images=8), cache=Cache(enabled=False))
print(json.dumps({"seconds": time.perf_counter() - start, "rss_mb": peak_rss_mib()}))
"""


def _labels() -> dict[str, list[int]]:
    """category -> its global label numbers (1-based, in category order)."""
    out, start = {}, 1
    for cat, count in LABEL_COUNTS.items():
        out[cat] = list(range(start, start + count))
        start += count
    return out


def _zipf(rng: np.random.Generator, numbers: list[int], size) -> np.ndarray:
    p = 1.0 / np.arange(1, len(numbers) + 1)
    return np.asarray(numbers)[rng.choice(len(numbers), size=size, p=p / p.sum())]


def write_scale_broden(root: Path, n: int, side: int) -> None:
    """A Broden-format directory of ``n`` images at ``side`` px with :data:`LABEL_COUNTS`
    labels (module docstring)."""
    labels = _labels()
    world = WorldConfig(num_images=IMAGE_POOL, resolution=side, seed=0, second_object=0.3)
    pool = []
    for i in range(IMAGE_POOL):
        buf = io.BytesIO()
        Image.fromarray(render(world, i).image).save(buf, format="JPEG", quality=95)
        pool.append(buf.getvalue())
    sh = side // 2
    cell = -(-sh // GRID)
    (root / "images" / "scale").mkdir(parents=True)
    rows, freq = [], {}
    for i in range(n):
        rng = np.random.default_rng([7, i])
        stem = f"scale/{i:06d}"
        (root / "images" / f"{stem}.jpg").write_bytes(pool[i % IMAGE_POOL])
        row = {"image": f"{stem}.jpg", "ih": side, "iw": side, "sh": sh, "sw": sh,
               "split": "train" if hashed_float(f"{stem}.jpg") <= 0.7 else "val"}
        for cat in PIXEL_CATEGORIES:
            grid = _zipf(rng, labels[cat], (GRID, GRID))
            if cat == "part":
                grid = np.where(rng.random((GRID, GRID)) < 0.25, grid, 0)
            mask = np.kron(grid, np.ones((cell, cell), np.int64))[:sh, :sh]
            rel = f"{stem}_{cat}.png"
            (root / "images" / rel).write_bytes(png_bytes(encode_rg(mask)))
            row[cat] = rel
            for num, count in zip(*np.unique(mask[mask > 0], return_counts=True)):
                freq[(cat, int(num))] = freq.get((cat, int(num)), 0) + int(count)
        for cat in ("scene", "texture"):
            num = int(_zipf(rng, labels[cat], 1)[0])
            row[cat] = str(num)
            freq[(cat, num)] = freq.get((cat, num), 0) + 1
        rows.append(row)
    label_rows, cat_rows = [], []
    for cat, numbers in labels.items():
        codes = []
        for code, num in enumerate(numbers, start=1):
            f = freq.get((cat, num), 0)
            label_rows.append({"number": num, "name": f"{cat}-{code}", "category": f"{cat}({f})",
                               "frequency": f, "coverage": "1.0", "syns": ""})
            codes.append({"code": code, "number": num, "name": f"{cat}-{code}", "frequency": f,
                          "coverage": "1.0"})
        (root / f"c_{cat}.csv").write_bytes(_csv_bytes(CODE_HEADER, codes))
        cat_rows.append({"name": cat, "first": numbers[0], "last": numbers[-1],
                         "count": len(numbers),
                         "frequency": sum(freq.get((cat, x), 0) for x in numbers)})
    (root / "label.csv").write_bytes(_csv_bytes(LABEL_HEADER, label_rows))
    (root / "category.csv").write_bytes(_csv_bytes(CATEGORY_HEADER, cat_rows))
    (root / "index.csv").write_bytes(_csv_bytes(INDEX_HEADER, rows))


def _child(root: Path, limit: int, mode: str) -> dict:
    """``{"seconds", "rss_mb"}`` of ``mode`` ("forward" or "dissect") over the first ``limit``
    images, in a fresh process (both sides start alike)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    p = subprocess.run([sys.executable, "-c", _SCRIPT, str(root), str(limit), str(BATCH), mode,
                        ROOT], capture_output=True, text=True, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def _tally_at_scale(root: Path, images: int, loop_images: int) -> dict:
    """The tally pass at Broden's label count: vectorized against NetDissect-Lite's per-unit
    loop (:func:`benchmarks.bench_dissect.naive_tally`) on the same activations and the
    thresholds of a dissection of ``images`` images; ms per image and their ratio."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    ds = BrodenDataset(root, limit=images)
    res = dissect(model, [LAYER], ds, preprocessing=Preprocessing(),
                  config=DissectConfig(batch_size=BATCH, top_images=8), cache=Cache(enabled=False))
    t = _tally_timings(model, ds, loop_images, res.layers[LAYER].thresholds)
    return {"tally_vectorized_ms_per_image": 1000 * t["vec_s"],
            "tally_loop_ms_per_image": 1000 * t["naive_s"],
            "tally_loop_over_vectorized": t["naive_s"] / t["vec_s"],
            "tally_agreement": t["agree"]}


def run(size: str = "small") -> pd.DataFrame:
    """One row per image count (module docstring), then the full-Broden extrapolation."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    side, counts = SIZES[size]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dissect-scale-") as tmp:
        root = Path(tmp) / "broden-scale"
        start = time.perf_counter()
        write_scale_broden(root, max(counts), side)
        gen_s = time.perf_counter() - start
        labels = len(BrodenDataset(root, limit=1).label_names) - 1
        for n in counts:
            fwd_s = _child(root, n, "forward")["seconds"]
            d = _child(root, n, "dissect")
            rows.append({"images": n, "labels": labels, "side_px": side,
                         "forward_s": fwd_s, "dissect_s": d["seconds"],
                         "dissect_over_forward": fwd_s / d["seconds"], "target": ">= 0.9",
                         "dissect_s_per_1000_images": 1000 * d["seconds"] / n,
                         "peak_rss_mb": d["rss_mb"], "generate_s": gen_s})
        tally = _tally_at_scale(root, *TALLY_IMAGES[size])
    frame = pd.DataFrame(rows)
    for name, value in tally.items():
        frame[name] = value
    per_image = frame["dissect_s"].iloc[-1] / frame["images"].iloc[-1]
    frame["rss_over_smallest"] = frame["peak_rss_mb"] / frame["peak_rss_mb"].iloc[0]
    frame["full_broden_minutes_this_cpu"] = per_image * BRODEN_IMAGES / 60.0
    frame["netdissect_lite_gpu_minutes"] = NETDISSECT_LITE_GPU_MINUTES
    frame["threads"] = torch.get_num_threads()
    return frame


if __name__ == "__main__":
    print(run(sys.argv[1] if len(sys.argv) > 1 else "small").to_string(index=False))
