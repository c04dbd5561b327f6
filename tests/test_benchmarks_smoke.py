"""Every benchmark runs at its smallest size (a smoke test: timings are printed, never asserted)."""

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
    p = subprocess.run([sys.executable, "-m", "benchmarks", name, "--size", "small", "--out",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    frame = pd.read_csv(tmp_path / f"{name}.csv")
    assert len(frame) > 0
    assert "Traceback" not in p.stderr
    targets = pd.read_csv(tmp_path / "targets.csv")
    if name in TARGETS:  # every headline ratio is printed beside its target
        assert len(targets) > 0 and set(targets["benchmark"]) == {name}
        assert targets["target"].notna().all()


def test_every_benchmark_has_its_targets():
    assert sorted(TARGETS) == available()
