"""Broden reading throughput at 224 px versus a resnet18 forward pass on the same images.

Network Dissection reads every Broden image once per pass, so reading (JPEG + PNG decoding in
DataLoader workers, :class:`cnnexplain.data.broden.BrodenDataset`) must outpace the model: the
``read / forward`` ratio must be > 1. The reference implementation's pool-based PNG decoding is
one of its known bottlenecks (../shared/reference/broden-and-dissection.md). Timings are
reported, never asserted.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torchvision

from cnnexplain.data.base import make_loader
from cnnexplain.data.broden import BrodenDataset, export_broden
from cnnexplain.data.synthetic import WorldConfig

SIZES = {"small": 32, "full": 320}  # images in the synthetic Broden export
BATCH = 16
WORKERS = 2


def _read_pass(ds: BrodenDataset) -> tuple[float, list[torch.Tensor]]:
    """Seconds for one full DataLoader pass (worker start-up included) and the image batches."""
    loader = make_loader(ds, batch_size=BATCH, workers=WORKERS)
    start = time.perf_counter()
    images = [batch["image"] for batch in loader]
    return time.perf_counter() - start, images


def _forward_pass(model: torch.nn.Module, images: list[torch.Tensor]) -> float:
    with torch.no_grad():
        model(images[0][:2])  # warm-up (allocator, kernels)
        start = time.perf_counter()
        for x in images:
            model(x)
        return time.perf_counter() - start


def run(size: str = "small") -> pd.DataFrame:
    """Rows (measurement, value, unit, ratio): export time, reading and forward throughput in
    images/s at 224 px, and ``ratio`` = read / forward throughput (> 1: reading keeps up)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    n = SIZES[size]
    with tempfile.TemporaryDirectory(prefix="bench-broden-") as tmp:
        root = Path(tmp) / "broden224"
        start = time.perf_counter()
        export_broden(WorldConfig(num_images=n, resolution=224, seed=0, second_object=0.3), root)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        ds = BrodenDataset(root)
        open_s = time.perf_counter() - start
        read_s, images = _read_pass(ds)
    model = torchvision.models.resnet18(weights=None).eval()
    forward_s = _forward_pass(model, images)
    read_ips, forward_ips = n / read_s, n / forward_s
    ratio = read_ips / forward_ips
    rows = [
        ("export synthetic Broden (224 px)", n / export_s, "images/s", None),
        ("open + validate", open_s, "s", None),
        (f"read (DataLoader, {WORKERS} workers, batch {BATCH})", read_ips, "images/s", None),
        ("resnet18 forward (eval, no_grad)", forward_ips, "images/s", None),
        ("read / forward", ratio, "x", ratio),
    ]
    return pd.DataFrame(rows, columns=["measurement", "value", "unit", "ratio"])


if __name__ == "__main__":
    print(run().to_string(index=False))
