"""GPU: the performance figures of a CUDA device, in one run, each part the code path of its CPU
benchmark run on the device (CUDA timings synchronize before reading the clock):

- ``train``: train-gated's epoch time of every gated method's defaults over std's, all with
  ``amp`` (float16 autocast) and ``channels_last`` (train-gated's CUDA defaults; target <= 1.05,
  Liang et al. 2020's overhead), and what AMP and channels_last buy: std in float32 with and
  without channels_last, and with AMP without it (:mod:`benchmarks.bench_train`, synthetic world
  at 32 px, batch 64);
- ``dissect``: ``dissect`` of resnet18's layer4 over a Broden-format set with Broden's label
  count (:func:`benchmarks.bench_dissect_scale.write_scale_broden`) at 224 px against
  the bare forward pass, on images in memory and read by the DataLoader (target >= 0.9;
  :func:`benchmarks.bench_dissect.throughput`), and its images/s, from which the time of all of
  Broden (63,305 images) is extrapolated next to NetDissect-Lite's published ~20 minutes on a GPU
  for resnet18 (:mod:`benchmarks.bench_dissect_scale`);
- ``saliency``: every method against the fastest of captum, zennit and pytorch-grad-cam on the
  same inputs and device (target <= 1; :mod:`benchmarks.bench_saliency`, batch 16 at 224 px);
- ``cache``: writing the activations as the cache stores them against the GPU's forward pass that
  produced them, measured, not projected (target <= 1: the writer does not throttle the GPU), and
  the copy of the maps to host memory (:mod:`benchmarks.bench_cache`).

Without a CUDA device it measures nothing and says so: one row per part, NaN, the reason in
``note``. ``CNNEXPLAIN_BENCH_DEVICE`` names the device (``cuda:1``; ``cpu`` runs the same code on
the CPU, as the smoke test does at ``small`` size, where the figures mean nothing).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
import torch

from benchmarks.device import is_cuda
from cnnexplain.models.gates import METHODS

ENV = "CNNEXPLAIN_BENCH_DEVICE"
SIZES = {
    "small": {"train": {"n": 64, "reps": 1}, "train_methods": ("std", "picnn"),
              "precisions": ("std float32, contiguous",),
              "dissect_images": 16, "saliency_batch": 2, "saliency_methods":
                  ("gradient", "integrated-gradients", "gradcam", "lrp-epsilon")},
    "full": {"train": {"n": 4096, "reps": 3}, "train_methods": tuple(METHODS),
             "precisions": ("std float32", "std float32, contiguous", "std amp, contiguous"),
             "dissect_images": 1024, "saliency_batch": 16, "saliency_methods": None},
}
"""Per size: training images and timed epochs, the methods trained with amp, std's precision
variants (:data:`PRECISIONS`), Broden images dissected, saliency batch and methods (None: all)."""
PRECISIONS = {"std float32": {"amp": False},
              "std float32, contiguous": {"amp": False, "channels_last": False},
              "std amp, contiguous": {"amp": True, "channels_last": False}}
"""std's precision and memory-format variants, against std with amp and channels_last."""
COLUMNS = ["part", "measure", "value", "unit", "target", "met", "device", "note"]


def _train_variants(size: dict) -> dict:
    """bench_train rows: the size's methods with amp + channels_last, and std's precisions."""
    return {**{m: (m, {"amp": True}) for m in size["train_methods"]},
            **{name: ("std", PRECISIONS[name]) for name in size["precisions"]}}


def _row(part, measure, value, unit, target="", ok=None):
    value = float(value)
    met = None if not target or value != value else bool(ok(value))
    return {"part": part, "measure": measure, "value": value, "unit": unit, "target": target,
            "met": met}


def _train(name: str, device: str) -> list[dict]:
    from benchmarks.bench_train import _run

    size = SIZES[name]
    frame = _run(size["train"], device, _train_variants(size), memory=False).set_index("method")
    rows = [_row("train", f"{m}: epoch time / std's (amp, channels_last)",
                 frame.loc[m, "ratio_to_std"], "x", "<= 1.05", lambda v: v <= 1.05)
            for m in size["train_methods"] if m != "std"]
    amp = frame.loc["std", "epoch_s"]
    for variant in size["precisions"]:
        rows.append(_row("train", f"{variant}: epoch time / std amp + channels_last",
                         frame.loc[variant, "epoch_s"] / amp, "x"))
    rows.append(_row("train", "std amp + channels_last: epoch", amp, "s"))
    return rows


def _dissect(name: str, device: str) -> list[dict]:
    from benchmarks.bench_dissect import _model, throughput
    from benchmarks.bench_dissect_scale import (BRODEN_IMAGES, NETDISSECT_LITE_GPU_MINUTES,
                                                write_scale_broden)
    from cnnexplain.data.broden import BrodenDataset

    n = SIZES[name]["dissect_images"]
    with tempfile.TemporaryDirectory(prefix="bench-gpu-dissect-") as tmp:
        root = Path(tmp) / "broden224"
        write_scale_broden(root, n, 224)
        timed = throughput(_model(), BrodenDataset(root), device)
    per_s = n / timed["dissect"]
    return [
        _row("dissect", "dissect / forward that reads the images",
             timed["forward_reading"] / timed["dissect"], "x", ">= 0.9", lambda v: v >= 0.9),
        _row("dissect", "dissect / forward on images in memory",
             timed["forward"] / timed["dissect"], "x"),
        _row("dissect", "dissect throughput", per_s, "images/s"),
        _row("dissect", f"all of Broden ({BRODEN_IMAGES:,} images), extrapolated / "
             f"NetDissect-Lite's published {NETDISSECT_LITE_GPU_MINUTES:g} min",
             BRODEN_IMAGES / per_s / 60.0 / NETDISSECT_LITE_GPU_MINUTES, "x", "<= 1",
             lambda v: v <= 1),
    ]


def _saliency(name: str, device: str) -> list[dict]:
    from benchmarks import bench_saliency
    from benchmarks.targets import TARGETS

    frame = bench_saliency.run(name, device=device, batch=SIZES[name]["saliency_batch"],
                               methods=SIZES[name]["saliency_methods"])
    return [_row("saliency", measure, value, "x", target, lambda v: v <= 1.0)
            for measure, value, target, _ in TARGETS["saliency"](frame)]


def _cache(name: str, device: str) -> list[dict]:
    from benchmarks import bench_cache

    frame = bench_cache.run(name, device=device)
    shipped = frame[frame["storage"].str.startswith("cache as shipped")]
    rows = []
    for _, r in shipped.iterrows():
        rows.append(_row("cache", f"{r['workload']}: cache write / forward", r["write_over_forward"],
                         "x", "<= 1", lambda v: v <= 1))
        rows.append(_row("cache", f"{r['workload']}: copy to host / forward",
                         r["copy_ms_per_image"] / r["forward_ms_per_image"], "x"))
    return rows


RUNNERS = {"train": _train, "dissect": _dissect, "saliency": _saliency, "cache": _cache}
"""Part -> (size name, device) -> rows; the parts run in this order."""
PARTS = tuple(RUNNERS)


def device_or_reason() -> tuple[str | None, str]:
    """(the device to measure on, or None; why not)."""
    name = os.environ.get(ENV)
    if name:
        return name, ""
    if torch.cuda.is_available():
        return "cuda", ""
    return None, "no CUDA device"


def run(size: str = "small") -> pd.DataFrame:
    """One row per measure (module docstring), ``met`` None where there is no target."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    device, reason = device_or_reason()
    if device is None:
        rows = [{**_row(part, "not measured", float("nan"), ""), "note": reason}
                for part in PARTS]
    else:
        rows = [r for part in PARTS for r in RUNNERS[part](size, device)]
        name = torch.cuda.get_device_name(device) if is_cuda(device) else ""
        for r in rows:
            r["note"] = name
    frame = pd.DataFrame(rows)
    frame["device"] = device or "none"
    return frame[COLUMNS]


if __name__ == "__main__":
    import sys

    print(run(sys.argv[1] if len(sys.argv) > 1 else "small").to_string(index=False))
