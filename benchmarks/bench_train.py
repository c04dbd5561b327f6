"""train-gated: epoch time of each method divided by std's (same backbone, data and batches, one
run, repetitions interleaved method by method so that machine noise hits all alike), and peak
memory of one training epoch per method (target of seed 004: at most 5% overhead, ratio <= 1.05).

size ``small`` (a smoke test: one step per epoch, the ratios are noise): resnet18 at 32 px, 64
synthetic images, batch 64, 1 timed epoch per method;
``full``: 1024 images, 3 timed epochs. Each method first runs one untimed epoch (memoizes the
rendered images, warms allocators). On CPU torch runs on one thread during the benchmark (on a
shared machine, intra-op thread hand-offs add more noise than speed to a ratio). Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA;
on CPU the peak resident set size (``VmHWM``) of a fresh process that trains one epoch of that
method alone (timings stay in one process).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks.device import is_cuda, sync
from benchmarks.memory import peak_rss_mib
from cnnexplain.models.gates import METHODS

VARIANTS: dict[str, tuple[str, dict]] = {
    **{m: (m, {}) for m in METHODS},
    "picnn preset=paper": ("picnn", {"preset": "paper"}),
    "cdcnn-r1p2 preset=paper": ("cdcnn-r1p2", {"preset": "paper"}),
    "std amp": ("std", {"amp": True}),
}
"""Row name -> (method, extra TrainConfig fields): every method with train-gated's default preset
(the wrong-mask and complement terms: two more runs of the layers after the gate per step), and
two with the seeds' losses (``preset=paper``), and std with ``amp`` (float16 on CUDA, bfloat16
autocast with channels_last on a CPU that runs it natively; the others train in float32 on CPU).
The warm-up is off (``gate_warmup=0``) so that every timed epoch is gated."""

SIZES = {"small": {"n": 64, "reps": 1}, "full": {"n": 1024, "reps": 3}}
BACKBONE = "resnet18"
SPEC = "synthetic:n={n},nval=16,ntest=16,res=32"


class _Null:
    def advance(self, n=1):
        pass

    def update(self, **kw):
        pass


def _trainer(name: str, n: int, device: str, out: Path, variants: dict = VARIANTS):
    from cnnexplain.data.datasets import open_dataset
    from cnnexplain.data.preprocessing import Preprocessing
    from cnnexplain.config.train import TrainConfig
    from cnnexplain.training.loop import Trainer

    prep = Preprocessing()
    spec = SPEC.format(n=n)
    train = open_dataset(spec, "train", prep)
    val = open_dataset(spec, "val", prep)
    method, extra = variants[name]
    fields = {"amp": is_cuda(device), "gate_warmup": 0, **extra}
    cfg = TrainConfig(backbone=BACKBONE, method=method, epochs=100, batch_size=64, **fields)
    return Trainer.prepare(cfg, train, val, class_names=train.class_names, preprocessing=prep,
                           device=device, out=out / f"run{list(variants).index(name)}",
                           overwrite=True)


def _peak_rss_one_epoch(args) -> float:
    """In a fresh process: train one epoch of the variant ``name``; peak RSS in MiB."""
    name, n, variants = args
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        t = _trainer(name, n, "cpu", Path(d), variants)
        t._train_epoch(0, _Null())
    return peak_rss_mib()


def run(size: str = "full") -> pd.DataFrame:
    cfg = SIZES[size]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)  # on a shared machine, thread hand-offs add more noise than speed
    try:
        return _run(cfg, device)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: dict, device: str, variants: dict = VARIANTS, memory: bool = True
         ) -> pd.DataFrame:
    """Rows of :func:`run` for ``variants`` (row name -> (method, TrainConfig fields)) on
    ``device``; std's row is the ratios' denominator; ``memory``: measure the peak (NaN
    otherwise)."""
    names = list(variants)
    times: dict[str, list[float]] = {m: [] for m in names}
    peak: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        trainers = {m: _trainer(m, cfg["n"], device, Path(d), variants) for m in names}
        for m, t in trainers.items():  # untimed warm-up epoch
            t._train_epoch(0, _Null())
        for rep in range(cfg["reps"]):
            order = list(names[rep % len(names):]) + list(names[:rep % len(names)])
            for m in order:
                t = trainers[m]
                if is_cuda(device):
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t0 = time.perf_counter()
                t._train_epoch(rep + 1, _Null())
                sync(device)
                times[m].append(time.perf_counter() - t0)
                if is_cuda(device):
                    peak[m] = max(peak.get(m, 0.0),
                                  torch.cuda.max_memory_allocated(device) / 2 ** 20)
    if device == "cpu" and memory:
        ctx = mp.get_context("spawn")
        for m in names:
            with ctx.Pool(1) as pool:
                peak[m] = pool.map(_peak_rss_one_epoch, [(m, cfg["n"], variants)])[0]
    std = sum(times["std"]) / len(times["std"])
    rows = []
    for m in names:
        mean = sum(times[m]) / len(times[m])
        rows.append({"method": m, "backbone": BACKBONE, "device": device, "images": cfg["n"],
                     "epochs_timed": len(times[m]), "epoch_s": round(mean, 3),
                     "ratio_to_std": round(mean / std, 3),
                     "min_ratio_to_std": round(min(times[m]) / min(times["std"]), 3),
                     "peak_mem_mib": round(peak.get(m, float("nan")), 1),
                     "peak_kind": "cuda max_memory_allocated" if is_cuda(device) else "process max RSS"})
    return pd.DataFrame(rows)


if __name__ == "__main__":  # pragma: no cover
    print(run(sys.argv[1] if len(sys.argv) > 1 else "small").to_string(index=False))
