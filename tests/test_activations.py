"""compute_activations: correct values, cache hits and misses, invalidation, float16, resume after
a failure or a kill -9, corrupt entries, and two processes computing the same entry at once."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from cache_worker import BATCH, LAYERS, TinyDataset, tiny_model
from cnnexplain.activations import KIND, compute_activations
from cnnexplain.cache import layout as cache_layout
from cnnexplain.cache.store import Cache
from cnnexplain.data.preprocessing import Preprocessing
from cnnexplain.errors import CnnexplainError, UsageError
from cnnexplain.fingerprint import module_digest

WORKER = Path(__file__).with_name("cache_worker.py")
ROW_BYTES = 6 * 8 * 8 * 4  # the widest column: layer "2", [6, 8, 8] float32


def forward_rows(model) -> list[int]:
    """A list that gets the batch size of every forward pass of ``model``."""
    rows: list[int] = []
    model.register_forward_pre_hook(lambda _m, inp: rows.append(inp[0].shape[0]))
    return rows


def acts(model, data, cache, **kw):
    kw.setdefault("preprocessing", Preprocessing())
    kw.setdefault("batch_size", BATCH)
    return compute_activations(model, LAYERS, data, model_fingerprint=module_digest(model),
                               cache=cache, **kw)


def reference(model, data, layer: str, preprocessing=Preprocessing()) -> np.ndarray:
    """The layer's output for all images in one plain forward pass."""
    out = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda _m, _i, o: out.update(a=o.detach()))
    with torch.no_grad():
        model.eval()
        model(preprocessing.normalize(data.images))
    handle.remove()
    return out["a"].numpy()


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def files(root: Path, pattern: str) -> list[Path]:
    return sorted(root.rglob(pattern))


def worker(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_for(predicate, timeout=90.0, proc=None):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stdout.read()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------

def test_activations_equal_a_plain_forward_pass(tmp_path):
    model, data = tiny_model(), TinyDataset(7)
    got = acts(model, data, Cache(tmp_path))
    assert got.n == 7 and got.layers == LAYERS
    np.testing.assert_array_equal(got.labels, data.labels.numpy())
    for layer in LAYERS:
        full = reference(model, data, layer)
        close(got.array(layer), full)
    pooled = {p: acts(model, data, Cache(tmp_path), pool=p).array("2")
              for p in ("mean", "sum", "max")}
    full = reference(model, data, "2")
    close(pooled["mean"], full.mean(axis=(2, 3)))
    close(pooled["sum"], full.sum(axis=(2, 3)))
    close(pooled["max"], full.max(axis=(2, 3)))


def test_rows_slices_masks_and_chunks(tmp_path):
    got = acts(tiny_model(), TinyDataset(9), Cache(tmp_path))
    full = got.array("0")
    assert full.dtype == np.float32 and full.shape == (9, 4, 8, 8) == got.shape("0")
    np.testing.assert_array_equal(got.array("0", rows=[5, 1, 1, -1]), full[[5, 1, 1, -1]])
    np.testing.assert_array_equal(got.array("0", rows=slice(1, 8, 3)), full[1:8:3])
    np.testing.assert_array_equal(got.array("0", rows=slice(2, 6)), full[2:6])
    mask = np.arange(9) % 2 == 0
    np.testing.assert_array_equal(got.array("0", rows=mask), full[mask])
    blocks = list(got.chunks("0", 4))
    assert [s for s, _ in blocks] == [0, 4, 8]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), full)
    with pytest.raises(UsageError, match="no activations for layer"):
        got.array("1")


def test_model_mode_is_restored_and_progress_advanced(tmp_path):
    model = tiny_model().train()
    seen = []

    class Task:
        def advance(self, n):
            seen.append(("advance", n))

    class Bar:  # like cnnexplain.progress.ProgressFactory: the task comes from __enter__
        def __init__(self, total, description):
            seen.append(("total", total, description))

        def __enter__(self):
            return Task()

        def __exit__(self, *exc):
            seen.append(("exit",))

    acts(model, TinyDataset(5), Cache(tmp_path), progress=Bar)
    assert model.training
    assert seen[0] == ("total", 5, "activations 0, 2") and seen[-1] == ("exit",)
    assert sum(s[1] for s in seen if s[0] == "advance") == 5


def test_bad_arguments_are_one_line_errors(tmp_path):
    model, data = tiny_model(), TinyDataset(3)
    with pytest.raises(UsageError, match="unknown pooling 'avg'"):
        acts(model, data, Cache(tmp_path), pool="avg")
    with pytest.raises(UsageError, match="layer '9' does not exist"):
        compute_activations(model, ["9"], data, model_fingerprint="m",
                            preprocessing=Preprocessing(), cache=Cache(tmp_path))
    with pytest.raises(CnnexplainError, match="has no images"):
        acts(model, TinyDataset(0), Cache(tmp_path))
    model.add_module("unused", torch.nn.Linear(2, 2))
    model.forward = lambda x: model[3](model[2](model[1](model[0](x))))
    with pytest.raises(UsageError, match="'unused' did not run in the forward pass"):
        compute_activations(model, ["unused"], data, model_fingerprint="m",
                            preprocessing=Preprocessing(), cache=Cache(tmp_path))
    assert not files(tmp_path, "*.h5")


# ------------------------------------------------------------------------------------------
# hits, misses, invalidation
# ------------------------------------------------------------------------------------------

def test_second_call_is_a_hit_that_runs_no_model(tmp_path):
    model, data = tiny_model(), TinyDataset(6)
    rows = forward_rows(model)
    first = acts(model, data, Cache(tmp_path))
    assert sum(rows) == 6
    rows.clear()
    data.fetched.clear()
    # a fresh Cache object (as in a new process) and another batch size: still a hit
    second = acts(model, data, Cache(tmp_path), batch_size=4)
    assert rows == [] and data.fetched == []
    assert second.entry.path == first.entry.path
    for layer in LAYERS:
        np.testing.assert_array_equal(second.array(layer), first.array(layer))


def _changed(what: str, model, data):
    """(model, data, extra kwargs) with one ingredient of the key changed."""
    if what == "weights":
        model = tiny_model()
        with torch.no_grad():
            model[2].weight[0, 0, 0, 0] += 0.5
    if what == "dataset content":
        data = TinyDataset(len(data))
        data.images[3, 1, 4, 4] = 1.0 - data.images[3, 1, 4, 4]
    kw = {"preprocessing": Preprocessing(mean=(0.5, 0.5, 0.5))} if what == "preprocessing" else {}
    kw.update({"pool": "mean"} if what == "pool" else {})
    kw.update({"float16": True} if what == "dtype" else {})
    return model, data, kw


@pytest.mark.parametrize("what", ["weights", "dataset content", "preprocessing", "pool", "dtype"])
def test_changing_any_key_part_misses_and_keeps_the_old_entry(tmp_path, what):
    model, data = tiny_model(), TinyDataset(6)
    base = acts(model, data, Cache(tmp_path))
    model2, data2, kw = _changed(what, model, data)
    rows = forward_rows(model2)
    other = acts(model2, data2, Cache(tmp_path), **kw)
    assert sum(rows) == 6, "a changed input must recompute every row"
    assert other.entry.key != base.entry.key
    if what in ("weights", "dataset content", "preprocessing"):
        assert not np.allclose(other.array("2"), base.array("2"))
    rows_base = forward_rows(model)
    again = acts(model, data, Cache(tmp_path))
    assert rows_base == [] and again.entry.path == base.entry.path


def test_float16_storage(tmp_path):
    model, data = tiny_model(), TinyDataset(6)
    full = acts(model, data, Cache(tmp_path))
    half = acts(model, data, Cache(tmp_path), float16=True)
    with h5py.File(half.entry.path, "r") as f:
        assert f["activations/2"].dtype == np.float16
        assert f["labels"].dtype == np.int64
        assert f.attrs["dtype"] == "float16"
    out = half.array("2")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, full.array("2"), rtol=2e-3, atol=1e-3)


def test_float16_overflow_is_an_error_and_leaves_no_entry(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model[2].weight.mul_(1e6)
    with pytest.raises(CnnexplainError) as err:
        acts(model, TinyDataset(4), Cache(tmp_path), float16=True, pool="sum")
    assert "float16 range" in str(err.value) and "\n" not in str(err.value)
    assert not files(tmp_path, "*.h5")


def test_no_cache_keeps_arrays_in_a_private_file_that_goes_away(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNEXPLAIN_CACHE", str(tmp_path / "cache"))
    got = acts(tiny_model(), TinyDataset(4), None)
    path = got.entry.path
    assert path.exists() and not (tmp_path / "cache").exists()
    assert got.array("0").shape == (4, 4, 8, 8)
    del got
    gc.collect()
    assert not path.exists()


# ------------------------------------------------------------------------------------------
# failures: resume, corrupt entries, kill -9, concurrency
# ------------------------------------------------------------------------------------------

def test_resume_after_a_failure_computes_only_the_missing_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_layout, "CHUNK_BYTES", 4 * ROW_BYTES)  # chunks of 4 rows
    model = tiny_model()
    with pytest.raises(RuntimeError, match="simulated failure"):
        acts(model, TinyDataset(10, fail_at=7), Cache(tmp_path))
    # batches [0,1] [2,3] [4,5] were appended; rows 0-3 form a whole chunk on disk
    cache = Cache(tmp_path)
    assert files(tmp_path, "*.partial.h5") and cache.load(KIND, _key(cache, model, 10)) is None
    data = TinyDataset(10)
    rows = forward_rows(model)
    got = acts(model, data, cache)
    assert data.fetched == [4, 5, 6, 7, 8, 9] and sum(rows) == 6
    assert not files(tmp_path, "*.partial.h5") and cache.notices == []
    clean = acts(tiny_model(), TinyDataset(10), None)
    for layer in LAYERS:
        close(got.array(layer), clean.array(layer))
    np.testing.assert_array_equal(got.labels, clean.labels)


def _key(cache, model, n, **kw):
    from cnnexplain.activations import activation_parts

    parts = activation_parts(LAYERS, TinyDataset(n), model_fingerprint=module_digest(model),
                             preprocessing=Preprocessing(), pool=kw.get("pool"),
                             float16=kw.get("float16", False))
    return cache.key(KIND, **parts)


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_damaged_entry_is_reported_and_rebuilt(tmp_path, damage):
    model, data = tiny_model(), TinyDataset(6)
    first = acts(model, data, Cache(tmp_path))
    expected = {layer: first.array(layer) for layer in LAYERS}
    path = first.entry.path
    if damage == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    else:
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    notes = []
    rows = forward_rows(model)
    again = acts(model, data, Cache(tmp_path, warn=notes.append))
    assert sum(rows) == 6
    assert len(notes) == 1 and "corrupt" in notes[0] and str(path) in notes[0]
    assert "\n" not in notes[0]
    for layer in LAYERS:
        np.testing.assert_array_equal(again.array(layer), expected[layer])


def test_kill_9_mid_write_resumes_without_serving_the_partial(tmp_path):
    root, seen, out = tmp_path / "cache", tmp_path / "seen", tmp_path / "out.npz"
    # chunks of 2 rows, batches of 2: the worker blocks in item 7, after rows 0-5 are on disk
    proc = worker("activations", root, out, "--n", 10, "--block-at", 7, "--seen", seen,
                  "--chunk-bytes", 2 * ROW_BYTES)
    try:
        wait_for(lambda: seen.exists() and "7" in seen.read_text().split(), proc=proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    model, cache = tiny_model(), Cache(root)
    assert not files(root, "*[0-9a-f].h5") and files(root, "*.partial.h5")
    assert cache.load(KIND, _key(cache, model, 10)) is None  # the partial is never an entry
    data = TinyDataset(10)
    got = acts(model, data, cache)
    assert data.fetched == [6, 7, 8, 9] and cache.notices == []
    clean = acts(tiny_model(), TinyDataset(10), None)
    for layer in LAYERS:
        close(got.array(layer), clean.array(layer))


def test_kill_9_at_an_arbitrary_moment_never_breaks_the_next_run(tmp_path):
    root, out = tmp_path / "cache", tmp_path / "out.npz"
    proc = worker("activations", root, out, "--n", 60, "--delay", 0.002, "--chunk-bytes", 1)
    try:
        wait_for(lambda: files(root, "*.partial.h5") or out.exists(), proc=proc)
        time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    got = acts(tiny_model(), TinyDataset(60), Cache(root))
    clean = acts(tiny_model(), TinyDataset(60), None)
    for layer in LAYERS:
        close(got.array(layer), clean.array(layer))


def test_two_processes_on_one_cache_compute_once_and_agree(tmp_path):
    root, seen, go = tmp_path / "cache", tmp_path / "seen", tmp_path / "go"
    procs = [worker("activations", root, tmp_path / f"out{i}.npz", "--n", 8, "--delay", 0.03,
                    "--seen", seen, "--ready", tmp_path / f"ready{i}", "--go", go)
             for i in range(2)]
    try:
        wait_for(lambda: all((tmp_path / f"ready{i}").exists() for i in range(2)))
        go.touch()
        for p in procs:
            assert p.wait(120) == 0, p.stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sorted(map(int, seen.read_text().split())) == list(range(8)), "computed exactly once"
    outs = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
    lone = acts(tiny_model(), TinyDataset(8), None)
    for layer in LAYERS:
        np.testing.assert_array_equal(outs[0][f"layer_{layer}"], outs[1][f"layer_{layer}"])
        close(outs[0][f"layer_{layer}"], lone.array(layer))
    np.testing.assert_array_equal(outs[0]["labels"], lone.labels)
