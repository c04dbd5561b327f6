"""``cnnexplain train-gated`` through the real CLI: outputs, validation before writing, NaN,
--resume after a real kill -9, and torchrun with 2 CPU processes against a single process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from clihelp import assert_one_line_error, run_cli, snapshot
from cnnexplain.models.checkpoint import load_checkpoint
from cnnexplain.training import loop
from cnnexplain.training.loop import (LOG_COLUMNS, autocast_dtype, cpu_runs_bfloat16,
                                      training_autocast)

WORLD = "synthetic:n=64,nval=16,ntest=16,res=32"
BASE = ["train-gated", "--backbone", "smallcnn", "--dataset", WORLD, "--batch-size", "16",
        "--device", "cpu", "--quiet"]


def test_outputs_of_a_gated_run(tmp_path):
    cache = tmp_path / "cache"
    r = run_cli(*BASE, "--method", "picnn", "--epochs", "2", "--out", tmp_path / "run",
                "--cache-dir", cache, "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["command"] == "train-gated" and summary["method"] == "picnn"
    out = tmp_path / "run"
    for name in ("checkpoint.pt", "best.pt", "train_log.csv", "gate.png", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "gate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = pd.read_csv(out / "train_log.csv")
    assert list(log.columns) == LOG_COLUMNS and len(log) == 2
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck.meta["method"] == "picnn" and "P" in ck.gate and ck.train_state["epoch"] == 2
    manifest = json.loads((out / "run.json").read_text())
    assert "train-gated" in manifest["commands"]
    entries = list((cache / "gate").rglob("*.h5"))
    assert len(entries) == 1 and summary["cache_key"] in entries[0].name
    import h5py

    with h5py.File(entries[0]) as f:
        assert f["P"].shape == (6, 64) and f["clusters"].shape == (6, 64)


def test_tiny_cifar_file_set(tmp_path):
    from data_fixtures import write_cifar10_python

    write_cifar10_python(tmp_path / "cifar", per_batch=10, n_test=10)
    r = run_cli("train-gated", "--backbone", "resnet18", "--dataset", f"cifar10:{tmp_path / 'cifar'}",
                "--method", "cdcnn-r1p2", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                "--quiet", "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r.err
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck.meta["class_names"] == [f"class{k}" for k in range(10)]
    assert tuple(ck.gate["W"].shape) == (512, 10)


@pytest.mark.parametrize("args,code,words", [
    (["--method", "cdcnn-r2p9"], 2, ["unknown --method", "cdcnn-r1p2"]),
    (["--layer", "layer9"], 2, ["layer9", "does not exist"]),
    (["--batch-size", "500"], 2, ["fewer than --batch-size"]),
    (["--optimizer", "rmsprop"], 2, ["--optimizer"]),
    (["--gate-threshold", "1.5"], 2, ["--gate-threshold"]),
    (["--resume"], 2, ["nothing to resume"]),
    (["--dataset", "cifar10:/nonexistent/dir"], 1, ["not found"]),
    (["--val-fraction", "0"], 2, ["--val-fraction"]),
    (["--method", "cdcnn-r1p2", "--lambda-neg", "-1"], 2, ["--lambda-neg must be at least 0", "got -1"]),
])
def test_bad_input_leaves_no_file(tmp_path, args, code, words):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    before = snapshot(tmp_path)
    r = run_cli(*BASE, "--epochs", "1", "--out", out, "--cache-dir", cache, *args)
    assert_one_line_error(r, code, *words)
    assert not out.exists() and not cache.exists()
    assert snapshot(tmp_path) == before


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    assert run_cli(*BASE, "--epochs", "1", "--out", out, "--no-cache").code == 0
    before = snapshot(out)
    r = run_cli(*BASE, "--epochs", "1", "--out", out, "--no-cache")
    assert_one_line_error(r, 2, "already holds", "--resume")
    r = run_cli(*BASE, "--epochs", "2", "--out", out, "--no-cache", "--resume")
    assert_one_line_error(r, 2, "--epochs 2 differs")
    assert snapshot(out) == before


def test_nan_is_one_line_and_exit_1(tmp_path):
    out = tmp_path / "nan"
    r = run_cli(*BASE, "--method", "cdcnn-r1p2", "--optimizer", "sgd", "--lr", "1e30",
                "--momentum", "0", "--weight-decay", "0", "--epochs", "1", "--out", out,
                "--no-cache")
    assert_one_line_error(r, 1, "loss term", "at epoch 1 step", "--grad-clip")
    assert not (out / "checkpoint.pt").exists()


@pytest.mark.skipif(not cpu_runs_bfloat16(), reason="this CPU has no native bfloat16")
def test_amp_on_a_bfloat16_cpu_trains_in_bfloat16_and_records_it(tmp_path):
    r = run_cli(*BASE, "--method", "picnn", "--epochs", "2", "--amp", "--out", tmp_path / "a",
                "--no-cache")
    assert r.code == 0, r.err
    assert "--amp needs" not in r.err
    ck = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    training = ck.meta["training"]
    assert training["amp"] is True and training["channels_last"] is True
    assert all(torch.isfinite(v).all() for v in ck.state_dict.values() if v.is_floating_point())
    log = pd.read_csv(tmp_path / "a" / "train_log.csv")
    assert log["loss"].notna().all() and len(log) == 2
    assert ck.train_state["scaler"] == {}  # bfloat16 needs no loss scaling


def test_amp_steps_run_convolutions_in_bfloat16_on_cpu_and_not_without_it(monkeypatch):
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with training_autocast(torch.device("cpu"), False):
        assert conv(x).dtype == torch.float32
    monkeypatch.setattr(loop, "cpu_runs_bfloat16", lambda: True)
    assert autocast_dtype(torch.device("cpu")) == torch.bfloat16
    with training_autocast(torch.device("cpu"), True):
        assert conv(x).dtype == torch.bfloat16
    monkeypatch.setattr(loop, "cpu_runs_bfloat16", lambda: False)
    assert autocast_dtype(torch.device("cpu")) is None
    with training_autocast(torch.device("cpu"), True):
        assert conv(x).dtype == torch.float32
    assert autocast_dtype(torch.device("cuda")) == torch.float16


def _checkpoint_tensors(path: Path) -> dict:
    ck = load_checkpoint(path)
    out = {f"state/{k}": v for k, v in ck.state_dict.items()}
    out.update({f"gate/{k}": v for k, v in ck.gate.items()})
    return out


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    world = "synthetic:n=160,nval=16,ntest=16,res=32"
    args = ["train-gated", "--backbone", "smallcnn", "--dataset", world, "--batch-size", "16",
            "--method", "picnn", "--epochs", "3", "--device", "cpu", "--quiet", "--no-cache"]
    ref = run_cli(*args, "--out", tmp_path / "ref")
    assert ref.code == 0, ref.err
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONHASHSEED="0", COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "cnnexplain", *args, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "train_log.csv"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if log.exists() and len(log.read_text().strip().splitlines()) >= 2:
                break  # epoch 1 is on disk: epoch 2 is running now
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = load_checkpoint(out / "checkpoint.pt").train_state["epoch"]
    assert done in (1, 2)
    r = run_cli(*args, "--out", out, "--resume")
    assert r.code == 0, r.err
    a, b = _checkpoint_tensors(tmp_path / "ref" / "checkpoint.pt"), _checkpoint_tensors(out / "checkpoint.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(pd.read_csv(out / "train_log.csv")) == 3


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
@pytest.mark.parametrize("method", [["picnn", "--gate-warmup", "0"], ["cdcnn-r1p2", "--gate-warmup", "0"],
                                    ["picnn", "--preset", "paper"]],
                         ids=["picnn", "cdcnn-r1p2", "picnn-paper"])
def test_torchrun_two_cpu_processes_match_a_single_process(tmp_path, method):
    """DDP (gloo) with the same global batch as one process. BatchNorm uses global batch
    statistics (cnnexplain.training.distributed.sync_batchnorm_) and every gate draw (the
    wrong-mask classes of the default preset too; its warm-up is off so that every step is
    gated) is cut from the global
    batch's draw, so the two runs compute the same function; they differ only in float summation
    order (per-rank partial sums all-reduced vs one sum): weights and gates must agree to 1e-5
    absolute after 4 SGD steps over two epochs (measured <= 1e-6). Longer runs drift further apart
    for a discrete reason, not a bug: a rounding-level difference in a gate probability flips one
    Bernoulli draw now and then (measured 1e-4 after 8 steps), so the run is kept to 4 steps; a
    rank that drew its own gates or saw its own images would differ by 1e-2."""
    args = ["train-gated", "--backbone", "smallcnn", "--dataset", "synthetic:n=36,nval=4,ntest=16,res=32",
            "--batch-size", "16", "--method", *method, "--epochs", "2", "--optimizer", "sgd",
            "--lr", "0.05", "--device", "cpu", "--quiet", "--no-cache"]
    single = run_cli(*args, "--out", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    assert single.code == 0, single.err
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", COLUMNS="200")
    p = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "cnnexplain", *args,
                        "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    one = _checkpoint_tensors(tmp_path / "one" / "checkpoint.pt")
    two = _checkpoint_tensors(tmp_path / "two" / "checkpoint.pt")
    assert one.keys() == two.keys()
    for k in one:
        if k.endswith("num_batches_tracked"):
            assert torch.equal(one[k], two[k]), k
            continue
        assert torch.allclose(one[k].float(), two[k].float(), atol=1e-5, rtol=0), \
            (k, float((one[k].float() - two[k].float()).abs().max()))
    # the weights moved away from their initialization, so the agreement is not vacuous
    from cnnexplain.models import zoo

    torch.manual_seed(0)
    init = zoo.build("smallcnn", num_classes=6).state_dict()
    moved = max(float((one[f"state/{k}"].float() - v.float()).abs().max()) for k, v in init.items()
                if v.is_floating_point())
    assert moved > 1e-2
    files = sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith("."))
    assert files == ["best.pt", "checkpoint.pt", "gate.png", "run.json", "train_log.csv"]
    manifest = json.loads((tmp_path / "two" / "run.json").read_text())
    assert manifest["commands"]["train-gated"]["world_size"] == 2
    log1 = pd.read_csv(tmp_path / "one" / "train_log.csv")
    log2 = pd.read_csv(tmp_path / "two" / "train_log.csv")
    assert (log1["train_acc1"] - log2["train_acc1"]).abs().max() < 1e-6
