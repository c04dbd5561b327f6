"""Faults (reliability issue): Ctrl-C, kill -9 while results are written, and two processes on
one cache. (kill -9 during train-gated + --resume: tests/test_train_cli.py; kill -9 during a
streaming cache write: tests/test_activations.py; concurrent get_or_compute: test_cache.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from clihelp import run_inproc

WORLD = "synthetic:n=60,ntest=300,res=32"
ENV = {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "COLUMNS": "200"}


def _popen(args, tmp: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, CNNEXPLAIN_CACHE=str(tmp / "cache"), **ENV)
    return subprocess.Popen([sys.executable, "-m", "cnnexplain", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _no_temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".cnnexplain-tmp-" in p.name]


def _committed(root: Path) -> list[Path]:
    """Complete cache entries (a streaming write's ``*.partial.h5`` does not count)."""
    return [p for p in root.rglob("*.h5") if not p.name.endswith(".partial.h5")] \
        if root.exists() else []


@pytest.mark.slow
def test_ctrl_c_right_after_the_network_ran_stops_with_one_line(tmp_path):
    """SIGINT as R0's fit starts (torch lazily imports internals there; an interrupt swallowed
    by such code is re-raised at the next step, shown deterministically in test_interrupt.py;
    here the whole path end to end): one line, Ctrl-C's status
    (130; -2 when CPython re-raises SIGINT on exit, which shells also report as 130), nothing
    partial, and the cache it leaves serves the next run."""
    out = tmp_path / "out"
    proc = _popen(["evaluate-entanglement", "--backbone", "smallcnn", "--dataset", WORLD,
                   "--split", "test", "--score-steps", "1000000", "--out", out], tmp_path)
    t0 = time.time()
    while not _committed(tmp_path / "cache" / "activations") and proc.poll() is None \
            and time.time() - t0 < 300:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], (stdout, stderr)
    assert not _no_temporaries(tmp_path) and not (out / "entanglement.csv").exists()
    r = run_inproc("evaluate-entanglement", "--backbone", "smallcnn", "--dataset", WORLD,
                   "--split", "test", "--score-steps", "20", "--out", out, "--quiet",
                   env={"CNNEXPLAIN_CACHE": str(tmp_path / "cache"), **ENV})
    assert r.code == 0, r.err
    assert (out / "entanglement.csv").is_file()


def _fake_runs(root: Path, n: int) -> list[Path]:
    runs = []
    for i in range(n):
        run = root / f"run{i}"
        run.mkdir(parents=True)
        pd.DataFrame({"epoch": range(1, 30), "loss": [1.0 / e for e in range(1, 30)],
                      "val_acc1": [0.5] * 29}).to_csv(run / "train_log.csv", index=False)
        pd.DataFrame({"metric": ["ACC1", "MIS"], "value": [0.5, 0.1], "std": [None, None],
                      "n": [10, 10], "note": ["", ""]}).to_csv(run / "entanglement.csv",
                                                               index=False)
        runs.append(run)
    return runs


@pytest.mark.slow
def test_kill_9_while_the_report_is_written_leaves_old_or_new_never_half(tmp_path):
    runs = _fake_runs(tmp_path / "runs", 8)
    r = run_inproc("report", *runs, "--quiet")
    assert r.code == 0, r.err
    index = tmp_path / "runs" / "report" / "index.html"
    old = index.read_bytes()
    killed = 0
    for delay in (0.3, 0.8, 1.5, 2.5):
        proc = _popen(["report", *runs, "--quiet"], tmp_path)
        time.sleep(delay)
        if proc.poll() is None:
            proc.kill()
            killed += 1
        proc.communicate()
        data = index.read_bytes()
        assert data.endswith(b"</html>\n") and data.startswith(b"<!DOCTYPE html>")
        assert len(data) > 0.5 * len(old)
        pd.read_csv(tmp_path / "runs" / "report" / "summary.csv")
    assert killed >= 1
    # stale temporaries from the killed writers never break the next run
    r = run_inproc("report", *runs, "--quiet")
    assert r.code == 0, r.err


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate-entanglement", "dissect"])
def test_two_processes_on_one_cache_match_a_lone_run(tmp_path, command):
    if command == "dissect":
        from cnnexplain.data.broden import export_broden
        from cnnexplain.data.synthetic import WorldConfig

        export_broden(WorldConfig(num_images=24, resolution=32), tmp_path / "broden")
        base = ["dissect", "--backbone", "smallcnn", "--broden", tmp_path / "broden"]
        result = ("dissect", "tally.csv")
    else:
        base = ["evaluate-entanglement", "--backbone", "smallcnn", "--dataset", WORLD,
                "--split", "test", "--score-steps", "30"]
        result = ("entanglement.csv",)
    procs = [_popen([*base, "--out", tmp_path / f"p{i}", "--quiet"], tmp_path) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    lone = tmp_path / "lone"
    r = subprocess.run([sys.executable, "-m", "cnnexplain", *map(str, base), "--out", lone,
                        "--quiet", "--no-cache"], capture_output=True, text=True,
                       env=dict(os.environ, **ENV))
    assert r.returncode == 0, r.stderr
    want = pd.read_csv(lone.joinpath(*result))
    for i in range(2):
        got = pd.read_csv((tmp_path / f"p{i}").joinpath(*result))
        pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-5, atol=1e-6)
    assert not _no_temporaries(tmp_path / "cache")
