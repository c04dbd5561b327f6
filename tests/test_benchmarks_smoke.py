"""Every benchmark runs at its smallest size (a smoke test: timings are printed, never asserted)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.__main__ import available
from benchmarks.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("name", available())
def test_benchmark_runs_at_small_size(name, tmp_path):
    env = {**os.environ}
    if name == "gpu":  # without a CUDA device, the GPU benchmark's code runs on the CPU
        env.setdefault("CNNEXPLAIN_BENCH_DEVICE", "cpu")
    p = subprocess.run([sys.executable, "-m", "benchmarks", name, "--size", "small", "--out",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    frame = pd.read_csv(tmp_path / f"{name}.csv")
    assert len(frame) > 0
    if name == "gpu":  # every part measured something on the device it was given
        from benchmarks.bench_gpu import PARTS

        measured = frame.groupby("part")["value"].apply(lambda v: v.notna().sum())
        assert sorted(measured.index) == sorted(PARTS) and (measured > 0).all()
    assert "Traceback" not in p.stderr
    targets = pd.read_csv(tmp_path / "targets.csv")
    if name in TARGETS:  # every headline ratio is printed beside its target
        assert len(targets) > 0 and set(targets["benchmark"]) == {name}
        assert targets["target"].notna().all()


def test_every_benchmark_has_its_targets():
    assert sorted(TARGETS) == available()


def test_gpu_benchmark_without_a_device_says_so(monkeypatch):
    from benchmarks import bench_gpu
    from benchmarks.targets import targets

    monkeypatch.delenv(bench_gpu.ENV, raising=False)
    monkeypatch.setattr(bench_gpu.torch.cuda, "is_available", lambda: False)
    frame = bench_gpu.run("small")
    assert list(frame["part"]) == list(bench_gpu.PARTS)
    assert frame["value"].isna().all() and (frame["note"] == "no CUDA device").all()
    rows = targets("gpu", frame)
    assert len(rows) == len(bench_gpu.PARTS) and rows["met"].isna().all()

