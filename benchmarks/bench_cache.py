"""Activation cache throughput: writing and reading the activations of a ResNet-18 forward pass
versus the forward pass itself, for each candidate HDF5 storage, in one run.

The arrays are the real thing: the full ``layer1``..``layer4`` maps (float32, N x K x h x w) of
torchvision's ResNet-18 (random weights with BatchNorm statistics) on synthetic-world images at
224 px, i.e. what ``dissect`` and ``tcav`` cache. Every candidate is chunked exactly as the cache
chunks (:func:`cnnexplain.cache.layout._block_rows`) and keeps fletcher32 checksums; each write
is fsynced, as the cache's atomic writes are. Reads are timed from a file written in the same
run (after ``posix_fadvise(DONTNEED)`` where the OS has it, so the page cache does not hide the
disk). Two workloads: all four layers' maps (1.5 MB an image, the most a run caches) and
layer4's alone (0.1 MB, a typical ``dissect``). Rows, per workload:

- one per storage: MB per image on disk, write and read ms per image, ``write / forward``
  (target <= 0.10 on this CPU), and the projected ``write / GPU forward`` against a GPU that
  runs the ResNet-18 forward at ``GPU_IMAGES_PER_S`` images a second at 224 px (an assumption,
  not a measurement: no GPU is timed here; <= 1 means the writer does not throttle it);
- ``cache as shipped``: the same arrays through :meth:`cnnexplain.cache.Cache.writer` and
  :meth:`~cnnexplain.cache.Cache.load`, the code path users run.

``readable_by`` says what a reader needs: "h5py" (any h5py), "h5py + hdf5plugin".
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from benchmarks.device import is_cuda, sync
from benchmarks.models import resnet18_with_bn_statistics
from cnnexplain.cache import Cache
from cnnexplain.cache.layout import _block_rows, storage_options
from cnnexplain.data.synthetic import WorldConfig, image_tensor, render

SIZES = {"small": (8, 64, 1), "full": (64, 224, 3)}  # images, side, rounds
LAYERS = ("layer1", "layer2", "layer3", "layer4")
#: Assumed GPU throughput of a ResNet-18 forward at 224 px (images/s), the "well over 1,000"
#: of an A100/H100 at batch 64 in float32; projected ratios scale with it.
GPU_IMAGES_PER_S = 2000.0


def _candidates() -> dict[str, tuple[dict, str]]:
    """storage name -> (create_dataset options besides chunks and fletcher32, reader needs)."""
    out = {
        "gzip-1 + shuffle": (dict(compression="gzip", compression_opts=1, shuffle=True), "h5py"),
        "lzf + shuffle": (dict(compression="lzf", shuffle=True), "h5py"),
        "none": ({}, "h5py"),
    }
    try:
        import hdf5plugin
    except ImportError:
        return out
    out["lz4 + shuffle (hdf5plugin)"] = ({**hdf5plugin.LZ4(), "shuffle": True},
                                         "h5py + hdf5plugin")
    out["blosc2 lz4 bitshuffle (hdf5plugin)"] = (
        dict(hdf5plugin.Blosc2(cname="lz4", clevel=1, filters=hdf5plugin.Blosc2.BITSHUFFLE)),
        "h5py + hdf5plugin")
    return out


def _activations(n: int, side: int, device: str = "cpu"
                 ) -> tuple[dict[str, np.ndarray], float, float]:
    """(layer -> float32 [n, K, h, w], median forward seconds per image over 3 passes on
    ``device`` (batches of 16 on a CPU, 64 on a GPU), seconds per image to copy the maps to
    host memory (0 on a CPU))."""
    cuda = is_cuda(device)
    batch = 64 if cuda else 16
    model = resnet18_with_bn_statistics().to(device)
    world = WorldConfig(num_images=n, resolution=side, seed=0)
    x = torch.stack([image_tensor(render(world, i).image) for i in range(n)])
    x = ((x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)).to(device)
    captured: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda m, i, o, name=name: captured.__setitem__(name, o)) for name in LAYERS]
    times, copies, acts = [], [], {}
    with torch.no_grad():
        model(x[:2])
        for _ in range(3):
            parts = {name: [] for name in LAYERS}
            sync(device)
            start = time.perf_counter()
            for b in range(0, n, batch):
                model(x[b:b + batch])
                for name in LAYERS:
                    parts[name].append(captured[name])
            sync(device)
            times.append((time.perf_counter() - start) / n)
            start = time.perf_counter()
            acts = {name: torch.cat(v).cpu().numpy() for name, v in parts.items()}
            copies.append((time.perf_counter() - start) / n if cuda else 0.0)
    for h in hooks:
        h.remove()
    return acts, statistics.median(times), statistics.median(copies)


def _drop_page_cache(path: Path) -> None:
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _write(path: Path, acts: dict[str, np.ndarray], options: dict) -> float:
    block = _block_rows([(a.shape[1:], a.dtype) for a in acts.values()])
    start = time.perf_counter()
    with h5py.File(path, "w") as f:
        for name, a in acts.items():
            f.create_dataset(name, data=a, chunks=(min(block, len(a)), *a.shape[1:]),
                             fletcher32=True, **options)
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    return time.perf_counter() - start


def _read(path: Path, acts: dict[str, np.ndarray]) -> float:
    _drop_page_cache(path)
    start = time.perf_counter()
    with h5py.File(path, "r") as f:
        for name, a in acts.items():
            if not np.array_equal(f[name][()], a):
                raise AssertionError(f"{path.name}: {name} read back differently")
    return time.perf_counter() - start


def _shipped(root: Path, acts: dict[str, np.ndarray]) -> tuple[float, float, int]:
    cache = Cache(root)
    n = len(next(iter(acts.values())))
    key = cache.key("activations", bench=str(root))
    start = time.perf_counter()
    with cache.writer("activations", key, {k: (a.shape[1:], "float32") for k, a in acts.items()},
                      total_rows=n, attrs={}) as w:
        for b in range(0, n, 16):
            w.append({k: a[b:b + 16] for k, a in acts.items()})
        w.commit()
    write = time.perf_counter() - start
    path = cache.path("activations", key)
    _drop_page_cache(path)
    start = time.perf_counter()
    entry = cache.load("activations", key)
    for k, a in acts.items():
        if not np.array_equal(entry[k], a):
            raise AssertionError(f"cache entry: {k} read back differently")
    return write, time.perf_counter() - start, path.stat().st_size


WORKLOADS = {"layer1-4 maps": LAYERS, "layer4 maps": ("layer4",)}


def _measure(acts: dict[str, np.ndarray], rounds: int, tmp: Path) -> dict:
    """storage name -> (median write s/image, median read s/image, bytes on disk)."""
    n = len(next(iter(acts.values())))
    cands = _candidates()
    names = list(cands) + ["cache as shipped"]
    times = {name: ([], []) for name in names}
    sizes: dict[str, int] = {}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name == "cache as shipped":
                w, rd, nbytes = _shipped(tmp / f"cache-{len(acts)}-{r}", acts)
            else:
                path = tmp / f"{names.index(name)}-{r}.h5"
                w = _write(path, acts, cands[name][0])
                rd = _read(path, acts)
                nbytes = path.stat().st_size
                path.unlink()
            times[name][0].append(w / n)
            times[name][1].append(rd / n)
            sizes[name] = nbytes
    return {name: (statistics.median(times[name][0]), statistics.median(times[name][1]),
                   sizes[name]) for name in names}


def run(size: str = "small", device: str = "cpu") -> pd.DataFrame:
    """One row per workload and storage, and per workload one for the shipped cache (module
    docstring); ms per image are medians over rounds, in an order rotated each round. On a
    CUDA ``device`` the forward is the GPU's, measured (``write_over_forward`` then answers
    "does the writer throttle this GPU?", target <= 1), and ``copy_ms_per_image`` the copy of
    the maps to host memory that a cached GPU run adds."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    n, side, rounds = SIZES[size]
    all_acts, forward_s, copy_s = _activations(n, side, device)
    on_gpu = is_cuda(device)
    cands = _candidates()
    shipped = storage_options()["name"]
    gpu_forward_s = 1.0 / GPU_IMAGES_PER_S
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        for workload, layers in WORKLOADS.items():
            acts = {name: all_acts[name] for name in layers}
            raw_mb = sum(a.nbytes for a in acts.values()) / n / 1e6
            for name, (write_s, read_s, nbytes) in _measure(acts, rounds, Path(tmp)).items():
                rows.append({
                    "workload": workload,
                    "storage": name if name in cands else f"{name} ({shipped})",
                    "mb_per_image": nbytes / n / 1e6,
                    "compression": raw_mb / (nbytes / n / 1e6),
                    "write_ms_per_image": 1000 * write_s,
                    "read_ms_per_image": 1000 * read_s,
                    "forward_ms_per_image": 1000 * forward_s,
                    "write_over_forward": write_s / forward_s,
                    "target": "<= 1" if on_gpu else "<= 0.10",
                    "copy_ms_per_image": 1000 * copy_s,
                    "projected_write_over_gpu_forward": write_s / gpu_forward_s,
                    "readable_by": cands[name][1] if name in cands else "h5py",
                    "raw_mb_per_image": raw_mb,
                })
    frame = pd.DataFrame(rows)
    frame["side_px"] = side
    frame["images"] = n
    frame["device"] = torch.device(device).type
    return frame


if __name__ == "__main__":
    print(run().to_string(index=False))
